"""VectorQuantizer: nearest-codeword quantization with EMA codebooks (VQ-VAE)."""

from __future__ import annotations

from typing import Optional

import tensorflow as tf

from tfx_xmatch import arguments
from tfx_xmatch.layers.row_mask import flat_row_mask, mean_or_zero, select_rows


@tf.keras.utils.register_keras_serializable(package="tfx_xmatch")
class VectorQuantizer(tf.keras.layers.Layer):
    """Maps vectors to their nearest codewords, with codebooks learnt by exponential moving average.

    Follows van den Oord et al. (2017) and Razavi et al. (2019, VQ-VAE-2): codebooks receive no
    gradient; each training call moves codeword j to the (Laplace smoothed) running mean of the
    vectors assigned to it, and the encoder is pulled towards its codewords by a commitment loss.
    Gradients reach the inputs through the straight-through estimator.

    Two measures keep codes alive, since a code that no vector picks never moves again:
    the first training call sets every codeword to a random input vector (a random codebook far
    from the data leaves most codes dead from the start), and codewords whose EMA usage falls
    below ``dead_code_threshold`` are restarted at random input vectors of the current batch.

    Input layouts (``M = num_codebooks``, ``N = num_codewords``):
      * ``M == 1``: float ``[..., d]``; codes int32 ``[...]``.
      * ``M > 1``: float ``[..., M, d]``; group m uses codebook m; codes int32 ``[..., M]``.
      * ``M > 1`` with ``product_quantization``: float ``[..., d]``, split into M contiguous
        chunks of ``d / M``; chunk m uses codebook m; codes int32 ``[..., M]``.

    Args:
      num_codewords: Codewords per codebook N (int, >= 2).
      num_codebooks: Number of codebooks M (int, default 1).
      product_quantization: Split each vector into M chunks instead of expecting an M axis
        (bool, default False; ignored when M == 1).
      decay: EMA decay in (0, 1) (float, default 0.99).
      commitment_weight: Weight of the commitment loss (float >= 0, default 0.25).
      epsilon: Laplace smoothing of the EMA cluster sizes (float > 0, default 1e-5).
      dead_code_threshold: EMA cluster size under which a codeword counts as dead (float >= 0,
        default 1.0).
      restart_dead_codes: Restart dead codewords at batch vectors (bool, default True).

    Call args:
      inputs: float tensor in one of the layouts above.
      training: Python bool (default False). When True: data-dependent init on the first call,
        EMA and dead-code updates, the commitment loss (``add_loss``) and the
        ``<name>_perplexity`` and ``<name>_dead_codes`` metrics (``Mean`` metrics the layer
        owns from construction, so ``fit`` shows them and a model that never trained saves).
      track_metrics: Python bool or None (default: ``training``). True without training updates
        the perplexity metric with this batch's codes and nothing else: what a model's
        ``compute_loss`` asks for under ``evaluate``, so that its validation column is measured
        rather than left at 0. Dead codes are a training-state metric (a training step restarts
        them, so the stored state never shows one): evaluate leaves it at 0. Serving leaves
        both alone.
      vector_mask: bool tensor or None (default None: every vector counts). Which vectors
        count, over the inputs' leading axes (all but the last, and all but the M axis in the
        grouped layout) or a prefix of them (a scalar, or [B] for [B, K, d] inputs). Vectors
        that do not count (padded positions, a placeholder row) are still quantized, but leave
        the codebooks, the EMA statistics, the metrics and the commitment loss as if they were
        not in the batch. Not Keras' ``mask``, which Keras would fill on its own.

    Returns:
      ``(quantized, codes)``: ``quantized`` has the shape of ``inputs``, the value of the nearest
      codewords and the gradient of the identity; ``codes`` are int32 indices (ties go to the
      lowest index).

    Raises:
      ValueError: on invalid hyperparameters, a width not divisible by M under product
        quantization, or inputs without an M-sized group axis.

    Example:
      >>> vq = VectorQuantizer(num_codewords=16, num_codebooks=2, product_quantization=True)
      >>> quantized, codes = vq(tf.random.normal([4, 8]), training=True)
      >>> quantized.shape, codes.shape
      (TensorShape([4, 8]), TensorShape([4, 2]))
    """

    def __init__(
        self,
        num_codewords: int,
        num_codebooks: int = 1,
        product_quantization: bool = False,
        decay: float = 0.99,
        commitment_weight: float = 0.25,
        epsilon: float = 1e-5,
        dead_code_threshold: float = 1.0,
        restart_dead_codes: bool = True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_codewords = arguments.integer("num_codewords", num_codewords, 2)
        self.num_codebooks = arguments.integer("num_codebooks", num_codebooks, 1)
        self.product_quantization = arguments.boolean("product_quantization", product_quantization)
        self.decay = arguments.real("decay", decay, 0.0, 1.0, low_open=True, high_open=True)
        self.commitment_weight = arguments.real("commitment_weight", commitment_weight, 0.0)
        self.epsilon = arguments.real("epsilon", epsilon, 0.0, low_open=True)
        self.dead_code_threshold = arguments.real("dead_code_threshold", dead_code_threshold, 0.0)
        self.restart_dead_codes = arguments.boolean("restart_dead_codes", restart_dead_codes)
        self.num_codes = self.num_codebooks * self.num_codewords
        # Made here, not by add_metric on the first training call: a metric first created while
        # a function is traced (saving a model loaded from disk traces the training call) is a
        # variable created on a non-first call, which fails the export.
        self.perplexity_tracker = tf.keras.metrics.Mean(name=f"{self.name}_perplexity")
        self.dead_codes_tracker = tf.keras.metrics.Mean(name=f"{self.name}_dead_codes")
        # Measured by the training step, before it restarts the dead codes (after it none is
        # dead): evaluation has nothing to measure, and a val_ figure read 0, "none dead".
        self.dead_codes_tracker.training_only = True
        # The weighted commitment term, shown on its own: in training it is also a layer loss
        # (in a model's regularization_loss, as TFRS sums self.losses), which names no term.
        self.commitment_tracker = tf.keras.metrics.Mean(name=f"{self.name}_commitment_loss")

    @property
    def _grouped(self) -> bool:
        return self.num_codebooks > 1 and not self.product_quantization

    def _check_shape(self, shape: tf.TensorShape) -> Optional[int]:
        """Validates a static input shape and returns the codeword width (None if unknown)."""
        shape = tf.TensorShape(shape)
        if self._grouped:
            if shape.rank is not None and (shape.rank < 2 or shape[-2] != self.num_codebooks):
                raise ValueError(
                    f"{self.name} with num_codebooks={self.num_codebooks} expects inputs "
                    f"[..., {self.num_codebooks}, d], got shape {shape}"
                )
        elif self.num_codebooks > 1 and shape.rank is not None and shape[-1] is not None:
            if shape[-1] % self.num_codebooks:
                raise ValueError(
                    f"{self.name}: product quantization needs the input width {shape[-1]} to be "
                    f"divisible by num_codebooks={self.num_codebooks}, got shape {shape}"
                )
            return shape[-1] // self.num_codebooks
        return None if shape.rank is None else shape[-1]

    def build(self, input_shape):
        width = self._check_shape(input_shape)
        if width is None:
            raise ValueError(f"{self.name} needs a known input width, got shape {input_shape}")
        self.width = int(width)
        M, N = self.num_codebooks, self.num_codewords
        # State is written only by assign; under a distribution strategy the first replica's
        # update wins (replicas see different batches, so there is no meaningful sum).
        state = dict(trainable=False, aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
        # Placeholder values: the first training call replaces them with batch vectors.
        self.codebooks = self.add_weight(
            name="codebooks", shape=(M, N, self.width), initializer="random_normal", **state
        )
        self.ema_cluster_size = self.add_weight(
            name="ema_cluster_size", shape=(M, N), initializer="zeros", **state
        )
        self.ema_embed_sum = self.add_weight(
            name="ema_embed_sum", shape=(M, N, self.width), initializer="zeros", **state
        )
        self.initialized = self.add_weight(
            name="initialized", shape=(), dtype=tf.bool, initializer="zeros", **state
        )
        super().build(input_shape)

    def _assign(self, vectors: tf.Tensor, codebooks: tf.Tensor) -> tf.Tensor:
        """Nearest codeword per vector: [M, V, w] x [M, N, w] -> int32 [M, V]."""
        # ||x||^2 is the same for every codeword of a row, so it cannot change the argmin.
        distances = tf.reduce_sum(tf.square(codebooks), -1)[:, tf.newaxis, :] - 2.0 * tf.matmul(
            vectors, codebooks, transpose_b=True
        )
        nearest = distances <= tf.reduce_min(distances, -1, keepdims=True)
        # tf.argmin does not promise which of tied minima it returns; this takes the lowest.
        indices = tf.range(self.num_codewords, dtype=tf.int32)
        return tf.reduce_min(tf.where(nearest, indices, self.num_codewords), -1)

    def _assign_counting(self, vectors: tf.Tensor, codebooks: tf.Tensor, valid: Optional[tf.Tensor],
                         training: bool = False) -> tf.Tensor:
        """``_assign``, where a vector that does not count may hold anything: a NaN finds no
        nearest codeword (code N), which must not fail the gather of its codeword.

        A vector that counts and is not finite is named outside training: the gather of code
        N failed with "indices[0,3] = 8 is not in [0, 8)" (a GPU would gather zeros, silently).
        In training it takes the last code and the loss goes NaN, so ``fit`` reaches the end
        of the epoch, where a diverged run is stopped with its best epoch kept.
        """
        codes = self._assign(vectors, codebooks)
        last = self.num_codewords - 1
        if training:
            return tf.minimum(codes, last)
        lost = codes > last  # [M, V]: no distance was a number
        if valid is not None:
            lost = tf.logical_and(lost, valid[tf.newaxis, :])
        check = tf.debugging.Assert(tf.logical_not(tf.reduce_any(lost)), [
            f"{self.name}: an input vector is not finite (NaN or inf) or so large that its distances overflow: "
            "the layers before it diverged or were given NaN; first such vector (from 0):",
            tf.reduce_min(tf.where(tf.reduce_any(lost, 0))[:1])])
        with tf.control_dependencies([check]):
            codes = tf.identity(codes)
        return codes if valid is None else tf.where(valid, codes, tf.minimum(codes, last))

    def _sample(self, vectors: tf.Tensor, distinct: bool) -> tf.Tensor:
        """N batch vectors per codebook, [M, V, w] -> [M, N, w] (zeros when V = 0, which the
        caller discards)."""
        M, N = self.num_codebooks, self.num_codewords
        vectors = tf.concat([vectors, tf.zeros([M, 1, self.width], vectors.dtype)], 1)
        count = tf.maximum(tf.shape(vectors)[1] - 1, 1)
        picks = tf.random.uniform([M, N], maxval=count, dtype=tf.int32)
        if distinct:
            # Use every batch vector once before repeating any, so small batches still cover
            # as much of the data as they can.
            order = tf.argsort(tf.random.uniform([M, count]), axis=-1)
            slots = tf.range(N)
            firsts = tf.gather(order, tf.minimum(slots, count - 1), axis=1)
            picks = tf.where(slots < count, firsts, picks)
        return tf.gather(vectors, picks, batch_dims=1)

    def _perplexity(self, codes: tf.Tensor) -> tf.Tensor:
        """exp(entropy of code usage) per codebook, int [M, V] -> float [M]."""
        usage = tf.reduce_mean(tf.one_hot(codes, self.num_codewords), axis=1)
        entropy = -tf.reduce_sum(tf.math.multiply_no_nan(tf.math.log(usage), usage), -1)
        return tf.exp(entropy)

    def _train_step(self, vectors: tf.Tensor, valid: Optional[tf.Tensor]) -> tuple[tf.Tensor, tf.Tensor]:
        """Init, search, EMA update and restart for [M, V, w] vectors, of which ``valid`` (bool
        [V], None for all) count.

        Returns codes [M, V] and their codewords [M, V, w] from before the EMA update.

        A batch of no vectors that count (a replica left empty by a short last batch under a
        distribution strategy) leaves the state and the usage metrics as they were.
        """
        M, N = self.num_codebooks, self.num_codewords
        everything = vectors
        if valid is not None:
            vectors = tf.boolean_mask(vectors, valid, axis=1)
        has_vectors = tf.shape(vectors)[1] > 0

        def current():
            state = (self.codebooks, self.ema_cluster_size, self.ema_embed_sum)
            return tuple(tf.identity(variable) for variable in state)

        def from_batch():
            # Each codeword starts as the mean of one vector, i.e. the vector itself.
            codebooks = self._sample(vectors, distinct=True)
            return codebooks, tf.ones([M, N], codebooks.dtype), codebooks

        # tf.cond rather than a Python `if`: the flag is a variable, read at run time in graphs.
        initialized = tf.convert_to_tensor(self.initialized)
        codebooks, cluster_size, embed_sum = tf.cond(initialized, current, from_batch)
        before = current()
        self.initialized.assign(tf.logical_or(initialized, has_vectors))

        all_codes = self._assign_counting(everything, codebooks, valid, training=True)
        nearest = tf.gather(codebooks, all_codes, batch_dims=1)
        codes = all_codes if valid is None else tf.boolean_mask(all_codes, valid, axis=1)
        one_hot = tf.one_hot(codes, N, dtype=vectors.dtype)  # [M, V, N]
        cluster_size = self.decay * cluster_size + (1.0 - self.decay) * tf.reduce_sum(one_hot, 1)
        batch_sum = tf.matmul(one_hot, vectors, transpose_a=True)  # [M, N, w]
        embed_sum = self.decay * embed_sum + (1.0 - self.decay) * batch_sum
        total = tf.reduce_sum(cluster_size, -1, keepdims=True)
        # Laplace smoothing keeps an unused codeword from dividing by zero.
        smoothed = (cluster_size + self.epsilon) / (total + N * self.epsilon) * total
        codebooks = embed_sum / smoothed[..., tf.newaxis]

        dead = cluster_size < self.dead_code_threshold
        counted = tf.cast(has_vectors, tf.float32)
        self.dead_codes_tracker.update_state(tf.reduce_mean(tf.cast(dead, tf.float32)), sample_weight=counted)
        if self.restart_dead_codes:
            fresh = self._sample(vectors, distinct=False)
            # Twice the threshold gives a restarted code time to win vectors before it counts as dead.
            grace = 2.0 * self.dead_code_threshold
            codebooks = tf.where(dead[..., tf.newaxis], fresh, codebooks)
            embed_sum = tf.where(dead[..., tf.newaxis], fresh * grace, embed_sum)
            cluster_size = tf.where(dead, grace, cluster_size)
        # Selected, not under tf.cond: a first-replica variable's assignment synchronises the
        # replicas, which TensorFlow does not allow inside control flow.
        codebooks, cluster_size, embed_sum = (tf.where(has_vectors, new, old) for new, old in zip(
            (codebooks, cluster_size, embed_sum), before))
        self.codebooks.assign(codebooks)
        self.ema_cluster_size.assign(cluster_size)
        self.ema_embed_sum.assign(embed_sum)
        perplexity = tf.where(has_vectors, tf.reduce_mean(self._perplexity(codes)), 0.0)
        self.perplexity_tracker.update_state(perplexity, sample_weight=counted)
        return all_codes, nearest

    def call(self, inputs: tf.Tensor, training: Optional[bool] = False,
             track_metrics: Optional[bool] = None,
             vector_mask: Optional[tf.Tensor] = None) -> tuple[tf.Tensor, tf.Tensor]:
        width = self._check_shape(inputs.shape)
        if width is not None and width != self.width:
            raise ValueError(
                f"{self.name} was built for width {self.width}, got inputs of shape {inputs.shape}"
            )
        M = self.num_codebooks
        shape = tf.shape(inputs)
        if vector_mask is not None and inputs.shape.rank is None:
            raise ValueError(f"{self.name}: a vector_mask needs inputs of known rank, got shape {inputs.shape}")
        leading_rank = None if inputs.shape.rank is None else inputs.shape.rank - (2 if self._grouped else 1)
        valid = flat_row_mask(vector_mask, shape[:leading_rank], inputs.shape[:leading_rank], self.name)
        # Every layout flattens to [V, M, w]; codebook-major [M, V, w] makes the search a batched matmul.
        vectors = tf.transpose(tf.reshape(tf.stop_gradient(inputs), [-1, M, self.width]), [1, 0, 2])
        vectors = tf.cast(vectors, self.codebooks.dtype)
        if training:
            codes, nearest = self._train_step(vectors, valid)
        else:
            codes = self._assign_counting(vectors, self.codebooks, valid)
            nearest = tf.gather(self.codebooks, codes, batch_dims=1)
            if track_metrics:
                counted_codes = codes if valid is None else tf.boolean_mask(codes, valid, axis=1)
                has_codes = tf.shape(counted_codes)[1] > 0
                perplexity = tf.where(has_codes, tf.reduce_mean(self._perplexity(counted_codes)), 0.0)
                self.perplexity_tracker.update_state(perplexity, sample_weight=tf.cast(has_codes, tf.float32))

        nearest = tf.cast(tf.reshape(tf.transpose(nearest, [1, 0, 2]), shape), inputs.dtype)
        codes_shape = shape[:-1] if self._grouped or M == 1 else tf.concat([shape[:-1], [M]], 0)
        codes = tf.reshape(tf.transpose(codes), codes_shape)
        if training or track_metrics:
            # Codebooks follow the EMA; this term only pulls the inputs towards their codewords.
            rows = [M * self.width]
            counted_inputs = select_rows(tf.reshape(inputs, [-1] + rows), valid)
            counted_nearest = select_rows(tf.reshape(nearest, [-1] + rows), valid)
            commitment = self.commitment_weight * mean_or_zero(
                tf.square(counted_inputs - tf.stop_gradient(counted_nearest)))
            has_rows = tf.cast(tf.shape(counted_inputs)[0] > 0, tf.float32)
            self.commitment_tracker.update_state(tf.cast(commitment, tf.float32), sample_weight=has_rows)
            if training:
                self.add_loss(commitment)
        # Straight-through estimator: forward value of the codewords, gradient of the identity.
        return inputs + tf.stop_gradient(nearest - inputs), codes

    def codewords(self, codes: tf.Tensor) -> tf.Tensor:
        """Codeword vectors of codes: int [..., M] -> [..., M, width] ([...] -> [..., width] if M == 1)."""
        table = tf.reshape(self.codebooks, [self.num_codes, self.width])
        return tf.gather(table, self.global_codes(codes))

    def global_codes(self, codes: tf.Tensor) -> tf.Tensor:
        """One id space for all codebooks: code c of codebook m becomes m * N + c (int32)."""
        codes = tf.cast(codes, tf.int32)
        if self.num_codebooks == 1:
            return codes
        return codes + tf.range(self.num_codebooks, dtype=tf.int32) * self.num_codewords

    def codebook_perplexity(self, codes: tf.Tensor) -> tf.Tensor:
        """exp(entropy of the code usage in ``codes``) per codebook: float [M], between 1 and N.

        Raises:
          ValueError: ``codes`` is empty (its perplexity was NaN).
        """
        codes = tf.transpose(tf.reshape(tf.cast(codes, tf.int32), [-1, self.num_codebooks]))
        if codes.shape[1] == 0:
            raise ValueError("codebook_perplexity needs at least one code, got none")
        return self._perplexity(codes)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            num_codewords=self.num_codewords,
            num_codebooks=self.num_codebooks,
            product_quantization=self.product_quantization,
            decay=self.decay,
            commitment_weight=self.commitment_weight,
            epsilon=self.epsilon,
            dead_code_threshold=self.dead_code_threshold,
            restart_dead_codes=self.restart_dead_codes,
        )
        return config
