"""ResidualQuantizer: an RQ-VAE whose codebooks are trained by gradients, jointly with the model."""

from __future__ import annotations

import functools
from typing import Sequence

import tensorflow as tf

from tfx_xmatch import arguments
from tfx_xmatch.layers.row_mask import flat_row_mask, mean_or_zero, select_rows
from tfx_xmatch.layers.sublayers import build_sublayer


@tf.keras.utils.register_keras_serializable(package="tfx_xmatch")
class ResidualQuantizer(tf.keras.layers.Layer):
    """Encoder -> L levels of residual vector quantization -> decoder (Lee et al., 2022; SPARC).

    Level l quantizes what the levels before it left over: ``r_0 = enc(z)``,
    ``c_l = argmin_j ||r_l - e_l[j]||``, ``r_{l+1} = r_l - e_l[c_l]``, and the reconstruction is
    ``z_rec = dec(sum_l e_l[c_l])``. More levels leave a smaller residual.

    Unlike ``VectorQuantizer`` (EMA codebooks that take no gradient), these codebooks are
    trainable weights: SPARC trains them jointly with the retrieval loss so that interest codes
    follow behaviour, not just the geometry of the item embeddings. The quantized sum uses a
    two-way straight-through: its value is ``sum_l e_l[c_l]``, and its gradient reaches both the
    selected codewords and the encoder output (as if quantization were the identity).

    Its loss is returned, not added with ``add_loss``, so that a model can weigh and log it:
    ``reconstruction_weight * ||z_rec - sg(z)||^2`` + ``sum_l ||sg(r_l) - e_l[c_l]||^2`` (codebook)
    + ``commitment_weight * sum_l ||r_l - sg(e_l[c_l])||^2``, each a mean over vectors. The first training call initialises every level's codebook with
    random residuals of the batch, and codewords whose moving usage falls below
    ``dead_code_threshold`` are restarted at random residuals (gradients alone never revive a
    codeword that no vector picks).

    Args:
      num_levels: Residual levels L (int >= 1, default 3).
      num_codewords: Codewords per level K (int >= 2, default 64).
      latent_dim: Width of the codewords (int, default: the input width).
      hidden_units: Hidden widths of the encoder and (mirrored) decoder MLPs (default (): a
        single linear map each).
      commitment_weight: Weight of the commitment loss (float >= 0, default 0.25).
      reconstruction_weight: Weight of the reconstruction loss (float >= 0, default 1.0).
      usage_decay: Decay of the moving codeword usage that detects dead codes (float in (0, 1),
        default 0.99).
      dead_code_threshold: Moving usage (expected assignments per batch) under which a codeword
        is dead (float >= 0, default 0.03; 0 disables restarts).

    Call args:
      inputs: float [..., d] vectors (item embeddings).
      training: Python bool. When True: initialisation, restarts and the metrics
        ``<name>_level<l>_perplexity``, ``<name>_level<l>_dead_codes`` and
        ``<name>_reconstruction_error``.
      track_metrics: Python bool or None (default: ``training``). True without training updates
        the perplexity and reconstruction-error metrics with this batch and nothing else: what
        SPARC's ``compute_loss`` asks for under ``evaluate``. Dead codes are a training-state
        metric (a training step restarts them, so the stored usage never shows one): evaluate
        leaves it at 0. Serving leaves all of them alone.
      vector_mask: bool tensor or None (default None: every vector counts). Which vectors
        count, over the inputs' leading axes (all but the last) or a prefix of them (a scalar,
        or [B] for [B, T, d] inputs). Vectors that do not count (padded positions, a placeholder
        row) are still quantized, but leave the initialisation, the usage, the restarts, the
        metrics and the loss as if they were not in the batch (they still pass through the
        encoder: a NaN among them makes its weight gradients NaN, as in any layer). Not Keras'
        ``mask``, which Keras would fill on its own.

    Returns:
      A dict: ``codes`` int32 [..., L]; ``codewords`` float [..., L, latent] (the selected
      codewords, gradients reach the codebooks); ``quantized`` float [..., latent] (their sum,
      two-way straight-through); ``reconstruction`` float [..., d]; ``loss`` the scalar RQ-VAE
      loss above.

    Raises:
      ValueError: on invalid hyperparameters.

    Example:
      >>> rq = ResidualQuantizer(num_levels=3, num_codewords=16)
      >>> out = rq(tf.random.normal([32, 8]), training=True)
      >>> out["codes"].shape, out["reconstruction"].shape
      (TensorShape([32, 3]), TensorShape([32, 8]))
    """

    def __init__(
        self,
        num_levels: int = 3,
        num_codewords: int = 64,
        latent_dim: int | None = None,
        hidden_units: Sequence[int] = (),
        commitment_weight: float = 0.25,
        reconstruction_weight: float = 1.0,
        usage_decay: float = 0.99,
        dead_code_threshold: float = 0.03,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_levels = arguments.integer("num_levels", num_levels, 1)
        self.num_codewords = arguments.integer("num_codewords", num_codewords, 2)
        self.latent_dim = arguments.optional_integer("latent_dim", latent_dim, 1)
        self.hidden_units = arguments.widths("hidden_units", hidden_units)
        self.commitment_weight = arguments.real("commitment_weight", commitment_weight, 0.0)
        self.reconstruction_weight = arguments.real("reconstruction_weight", reconstruction_weight, 0.0)
        self.usage_decay = arguments.real("usage_decay", usage_decay, 0.0, 1.0, low_open=True, high_open=True)
        self.dead_code_threshold = arguments.real("dead_code_threshold", dead_code_threshold, 0.0)
        # Made here, not by add_metric on the first training call, which would create them
        # inside a traced function when a model loaded from disk is saved.
        self.reconstruction_tracker = tf.keras.metrics.Mean(name=f"{self.name}_reconstruction_error")
        self.level_trackers = [
            (tf.keras.metrics.Mean(name=f"{self.name}_level{level}_perplexity"),
             tf.keras.metrics.Mean(name=f"{self.name}_level{level}_dead_codes"))
            for level in range(self.num_levels)
        ]
        for _, dead_codes_tracker in self.level_trackers:
            # Measured by the training step before it restarts them: nothing for evaluation to
            # measure (a val_ figure read 0, "none dead").
            dead_codes_tracker.training_only = True

    def build(self, input_shape):
        width = int(input_shape[-1])
        latent = self.latent_dim or width

        def mlp(widths, output, name):
            # Sublayers take this layer's dtype policy (Keras gives them the global one otherwise).
            dense = functools.partial(tf.keras.layers.Dense, dtype=self.dtype_policy)
            layers = [dense(u, activation="relu", name=f"{name}_{i}") for i, u in enumerate(widths)]
            return tf.keras.Sequential(layers + [dense(output, name=f"{name}_out")], name=name)

        self.encoder = mlp(self.hidden_units, latent, "encoder")
        self.decoder = mlp(tuple(reversed(self.hidden_units)), width, "decoder")
        # Built here, not on first use: checkpoint restores and BackupAndRestore need the weights.
        build_sublayer(self.encoder, (None, width))
        build_sublayer(self.decoder, (None, latent))
        # Initialisation and restarts assign in replica context: under a distribution strategy
        # the first replica's values must reach every copy, or replicas would code differently.
        first_replica = tf.VariableAggregation.ONLY_FIRST_REPLICA
        self.codebooks = self.add_weight(
            name="codebooks", shape=(self.num_levels, self.num_codewords, latent),
            initializer=tf.keras.initializers.RandomNormal(stddev=0.1), aggregation=first_replica,
        )
        self.usage = self.add_weight(
            name="usage", shape=(self.num_levels, self.num_codewords),
            initializer=tf.keras.initializers.Constant(1.0), trainable=False, aggregation=first_replica,
            autocast=False,  # moving counts: float32 under a mixed policy too
        )
        self.initialized = self.add_weight(name="initialized", shape=(), dtype=tf.bool, initializer="zeros",
                                           trainable=False, aggregation=first_replica)
        super().build(input_shape)

    # ------------------------------------------------------------------ quantization
    def _nearest(self, residual: tf.Tensor, level: int) -> tf.Tensor:
        return self._nearest_in(residual, self.codebooks[level])

    @staticmethod
    def _nearest_in(residual: tf.Tensor, codebook: tf.Tensor) -> tf.Tensor:
        distances = (tf.reduce_sum(tf.square(residual), -1, keepdims=True)
                     - 2.0 * tf.matmul(residual, codebook, transpose_b=True)
                     + tf.reduce_sum(tf.square(codebook), -1)[tf.newaxis, :])
        return tf.argmin(distances, axis=-1, output_type=tf.int32)

    def quantize(self, vectors: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, list]:
        """Flat encoder outputs [n, latent] -> codes [n, L], selected codewords [n, L, latent]
        and the residual entering each level (a list of L [n, latent] tensors)."""
        residual = vectors
        codes, selected, residuals = [], [], []
        for level in range(self.num_levels):
            residuals.append(residual)
            code = self._nearest(tf.stop_gradient(residual), level)
            codeword = tf.gather(self.codebooks[level], code)
            codes.append(code)
            selected.append(codeword)
            residual = residual - tf.stop_gradient(codeword)
        return tf.stack(codes, axis=-1), tf.stack(selected, axis=-2), residuals

    def call(self, inputs: tf.Tensor, training: bool = False, track_metrics: bool | None = None,
             vector_mask: tf.Tensor | None = None) -> dict:
        inputs = tf.convert_to_tensor(inputs)
        leading = tf.shape(inputs)[:-1]
        if vector_mask is not None and inputs.shape.rank is None:
            raise ValueError(f"{self.name}: a vector_mask needs inputs of known rank, got shape {inputs.shape}")
        valid = flat_row_mask(vector_mask, leading, inputs.shape[:-1], self.name)

        def counting(rows):
            return select_rows(rows, valid)

        flat = tf.reshape(inputs, [-1, tf.shape(inputs)[-1]])
        encoded = self.encoder(flat)
        if training:
            self._initialize_from(counting(encoded))
        codes, codewords, residuals = self.quantize(encoded)
        summed = tf.reduce_sum(codewords, axis=1)
        # Value: the codeword sum. Gradient: to the codewords and, straight through, to the encoder.
        quantized = summed + encoded - tf.stop_gradient(encoded)
        reconstruction = self.decoder(quantized)
        counted_residuals = [counting(residual) for residual in residuals]
        loss, error = self._loss(counting(flat), counting(codewords), counted_residuals, counting(reconstruction))
        counted_codes = counting(codes)
        counted = tf.cast(tf.shape(counted_codes)[0] > 0, tf.float32)
        if training:
            self.reconstruction_tracker.update_state(error, sample_weight=counted)
            self._track_usage(counted_codes, counted_residuals)
        elif track_metrics:
            self.reconstruction_tracker.update_state(error, sample_weight=counted)
            for level in range(self.num_levels):
                perplexity_tracker, _ = self.level_trackers[level]
                perplexity_tracker.update_state(_perplexity(self._counts(counted_codes[:, level])),
                                                sample_weight=counted)
        latent = tf.shape(codewords)[-1]
        return {
            "codes": tf.reshape(codes, tf.concat([leading, [self.num_levels]], 0)),
            "codewords": tf.reshape(codewords, tf.concat([leading, [self.num_levels, latent]], 0)),
            "quantized": tf.reshape(quantized, tf.concat([leading, [latent]], 0)),
            "reconstruction": tf.reshape(reconstruction, tf.shape(inputs)),
            "loss": loss,
        }

    def lookup(self, codes: tf.Tensor, level: int = 0) -> tf.Tensor:
        """Codewords of one level for int codes [...]: float [..., latent]."""
        return tf.gather(self.codebooks[level], codes)

    # ------------------------------------------------------------------ training state
    def _initialize_from(self, encoded: tf.Tensor) -> None:
        def initial_codebooks():
            residual = tf.stop_gradient(encoded)
            levels = []
            for level in range(self.num_levels):
                codebook = self._random_rows(residual)
                levels.append(codebook)
                residual = residual - tf.gather(codebook, self._nearest_in(residual, codebook))
            return tf.stack(levels)

        # A batch of no vectors (a replica left empty by a short last batch) initialises nothing.
        keep = tf.logical_or(tf.convert_to_tensor(self.initialized), tf.shape(encoded)[0] == 0)
        # The draw runs only until the codebooks are initialised; the assignment stays out of
        # tf.cond: under a distribution strategy, assigning a first-replica variable is a
        # synchronisation point, which TensorFlow does not allow inside control flow.
        codebooks = tf.cond(keep, lambda: tf.identity(self.codebooks), initial_codebooks)
        self.codebooks.assign(codebooks)
        self.initialized.assign(tf.logical_or(self.initialized, tf.shape(encoded)[0] > 0))

    def _random_rows(self, rows: tf.Tensor) -> tf.Tensor:
        """num_codewords rows drawn at random (with replacement when there are fewer; jitter
        alone from no rows, which the callers discard)."""
        rows = tf.concat([rows, tf.zeros([1, tf.shape(rows)[1]], rows.dtype)], 0)
        picks = tf.random.uniform([self.num_codewords], 0, tf.maximum(tf.shape(rows)[0] - 1, 1), dtype=tf.int32)
        jitter = tf.random.normal([self.num_codewords, tf.shape(rows)[1]], stddev=1e-3, dtype=rows.dtype)
        return tf.gather(rows, picks) + jitter

    def _loss(self, inputs, codewords, residuals, reconstruction) -> tuple[tf.Tensor, tf.Tensor]:
        """(RQ-VAE loss, reconstruction error), means over the given vectors (0 over none)."""
        stacked = tf.stack(residuals, axis=1)  # [n, L, latent]
        codebook_loss = mean_or_zero(tf.reduce_sum(tf.square(tf.stop_gradient(stacked) - codewords), -1))
        commitment = mean_or_zero(tf.reduce_sum(tf.square(stacked - tf.stop_gradient(codewords)), -1))
        error = mean_or_zero(tf.reduce_sum(tf.square(reconstruction - tf.stop_gradient(inputs)), -1))
        return codebook_loss + self.commitment_weight * commitment + self.reconstruction_weight * error, error

    def _track_usage(self, codes: tf.Tensor, residuals: list) -> None:
        usages, codebooks = [], []
        # A batch of no vectors moves no usage and restarts nothing (selected, not under
        # tf.cond: first-replica assignments synchronise the replicas, not allowed in control flow).
        has_vectors = tf.shape(codes)[0] > 0
        counted = tf.cast(has_vectors, tf.float32)
        for level in range(self.num_levels):
            counts = self._counts(codes[:, level])
            usage = tf.where(has_vectors, self.usage[level] * self.usage_decay + counts * (1.0 - self.usage_decay),
                             self.usage[level])
            perplexity_tracker, dead_codes_tracker = self.level_trackers[level]
            perplexity_tracker.update_state(_perplexity(counts), sample_weight=counted)
            dead = tf.logical_and(usage < self.dead_code_threshold, has_vectors)
            dead_codes_tracker.update_state(tf.reduce_mean(tf.cast(dead, tf.float32)), sample_weight=counted)
            codebook = self.codebooks[level]
            if self.dead_code_threshold > 0:
                fresh = self._random_rows(tf.stop_gradient(residuals[level]))
                codebook = tf.where(dead[:, tf.newaxis], fresh, codebook)
                usage = tf.where(dead, tf.ones_like(usage), usage)
            usages.append(usage)
            codebooks.append(codebook)
        # One whole-variable assignment each: sliced assignments of distributed variables fail.
        self.usage.assign(tf.stack(usages))
        if self.dead_code_threshold > 0:
            self.codebooks.assign(tf.stack(codebooks))

    def _counts(self, codes: tf.Tensor) -> tf.Tensor:
        return tf.math.bincount(codes, minlength=self.num_codewords, maxlength=self.num_codewords, dtype=tf.float32)

    def codebook_perplexity(self, codes: tf.Tensor) -> list[float]:
        """Perplexity of each level's code distribution over the given codes [n, L]: a list of L floats
        (1 = one code used, K = all codes used equally).

        Raises:
          ValueError: ``codes`` is empty (its perplexity was NaN).
        """
        if tf.size(codes) == 0:
            raise ValueError("codebook_perplexity needs at least one code, got none")
        values = []
        for level in range(self.num_levels):
            counts = tf.math.bincount(tf.reshape(codes[..., level], [-1]), minlength=self.num_codewords,
                                      dtype=tf.float32)
            probabilities = counts / tf.reduce_sum(counts)
            values.append(float(tf.exp(-tf.reduce_sum(probabilities * tf.math.log(probabilities + 1e-10)))))
        return values

    def dead_codewords(self, codes: tf.Tensor) -> list[float]:
        """Share of each level's codewords that none of the given codes [n, L] uses: a list of L
        floats (0 = every codeword used). Over a catalogue's item codes, what the interests cannot
        reach."""
        codes = tf.convert_to_tensor(codes)
        return [float(tf.reduce_mean(tf.cast(tf.math.bincount(tf.reshape(codes[..., level], [-1]),
                                                               minlength=self.num_codewords) == 0, tf.float32)))
                for level in range(self.num_levels)]

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            num_levels=self.num_levels,
            num_codewords=self.num_codewords,
            latent_dim=self.latent_dim,
            hidden_units=list(self.hidden_units),
            commitment_weight=self.commitment_weight,
            reconstruction_weight=self.reconstruction_weight,
            usage_decay=self.usage_decay,
            dead_code_threshold=self.dead_code_threshold,
        )
        return config


def _perplexity(counts: tf.Tensor) -> tf.Tensor:
    """exp(entropy) of code counts [K]."""
    probabilities = counts / tf.maximum(tf.reduce_sum(counts), 1.0)
    return tf.exp(-tf.reduce_sum(probabilities * tf.math.log(probabilities + 1e-10)))
