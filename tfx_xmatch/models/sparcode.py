"""SparCode: quantized query codes, all-to-all interaction, sparse inverted index.

Su et al., "Beyond Two-Tower Matching: Learning Sparse Retrievable Cross-Interactions for
Recommendation" (arXiv 2311.18213).

The user's history is encoded (the same SASRec / mean encoder as the two-tower baseline),
turned into K query tokens, and each token is vector-quantized into a code of a shared codebook
(or of its own codebook). An all-to-all interaction network E scores a (code, item) pair from
the codeword and the item's tokens; a query's score of item i is

    score(q, i) = sum_k ReLU(E(code_k, i) + b).

Because the score depends on the query only through its codes, serving needs no network at
all: a sparse inverted index (``SparseCodeIndex``) holds, for every code, the items with a
positive score, and a query sums the posting lists of its codes.

Training computes the code-item table T = ReLU(E(codebook, candidates) + b) once per step —
[codes x candidates], not [queries x candidates] — and scores queries by their bag of codes,
``bag @ T``. The discrete assignment gets a straight-through gradient: the bag is the hard
one-hot count plus ``soft - stop_gradient(soft)``, where ``soft`` is a softmax over codeword
distances, so the retrieval loss reaches the encoder while the forward pass stays exactly the
hard code lookup that serving uses.

Losses: softmax over the candidates (the full catalogue, or in-batch targets plus uniformly
sampled negatives with logQ correction) + ``sparsity_weight`` x mean(T) (an L1 penalty that
empties posting lists) + the quantizer's commitment loss + ``encoder_loss_weight`` x an
auxiliary dot-product softmax on the encoder states (our addition: it trains the encoder at
every position; the codes alone train it too slowly). Codebooks follow an EMA of their
assigned tokens, with dead-code restarts. Each weighted term is logged on its own
(``retrieval_loss``, ``sparsity_loss``, ``quantizer_commitment_loss``, ``encoder_loss``), in
training and validation; the commitment term is a layer loss in training, so it is also what
``regularization_loss`` holds beyond any l2 penalty (TFRS sums ``self.losses`` there).

Cache-aware training (``training_cache_fraction`` f, our addition): the served index keeps only
the globally best fraction of the table, so an item whose score is spread thinly over many codes
loses it all. With f set, a second softmax (weight ``cached_loss_weight``) scores the queries
with the table as such a cache holds it (entries below the step's global top-f threshold read 0),
its gradient reaching only the kept entries: it rewards a target's entries that the cache keeps
and pushes down the kept entries of other items, next to the full-table softmax.

With ``quantize=False`` the same network is the unquantized all-to-all model: continuous
query tokens go straight into E for every candidate. It cannot be served from an inverted
index; it is the accuracy upper bound SparCode is measured against.
"""

from __future__ import annotations

import inspect
from typing import Optional, Sequence

import numpy as np
import tensorflow as tf

from tfx_xmatch import arguments
from tfx_xmatch.index.sparse_code_index import cache_budget
from tfx_xmatch.layers import AllToAllInteraction, VectorQuantizer
from tfx_xmatch.layers.sublayers import build_sublayer
from tfx_xmatch.models.base import RetrievalModel
from tfx_xmatch.models.history_encoding import LossDraws, encode_history, last_position_state, training_targets

USER_TOWERS = ("mean", "sasrec")
LOSSES = ("full_softmax", "sampled_softmax")
TOKENIZERS = ("last_state", "slots", "chunks")


def relu_with_leaky_gradient(x: tf.Tensor, leak: float) -> tf.Tensor:
    """ReLU(x) in the forward pass; gradient 1[x > 0] + leak.

    A target item whose pair scores are all negative would otherwise get no gradient and
    stay unretrievable for good; the leak lets training pull it back while the forward value
    (what the index stores) is exactly the ReLU.
    """
    if not leak:
        return tf.nn.relu(x)
    return tf.nn.relu(x) + leak * (x - tf.stop_gradient(x))


def readable_history(history: tf.Tensor, where: tf.Tensor) -> tf.Tensor:
    """What each of P positions may read: bool [P, L], True at the real items of its user's
    history up to and including the position.

    Args:
      history: int [B, L] item indices (0 = padding).
      where: int64 [P, 2] (user row, position) of each position.
    """
    history = tf.gather(tf.convert_to_tensor(history), where[:, 0])
    upto = tf.range(tf.shape(history)[1], dtype=where.dtype)[tf.newaxis, :] <= where[:, 1:]
    return tf.logical_and(history > 0, upto)


@tf.keras.utils.register_keras_serializable(package="tfx_xmatch")
class SparCode(RetrievalModel):
    """SparCode retrieval model over item histories.

    Args:
      num_items: Number of real items (indices 1..num_items; 0 is padding).
      embedding_dim: Width of item, history and token embeddings (int, default 64).
      user_tower: History encoder, "sasrec" or "mean" (default "sasrec").
      max_length: History window L (int, default 200).
      num_blocks, num_heads, dropout: SASRec encoder settings (defaults 2, 1, 0.2).
      loss: "full_softmax" (every item is a candidate) or "sampled_softmax" (in-batch
        targets plus ``num_sampled_negatives`` uniform items, logQ-corrected). Default
        "full_softmax".
      temperature: Logits are divided by it (float, default 1.0).
      num_sampled_negatives: Uniform extra negatives per step for the sampled loss (int,
        default 1024).
      max_loss_positions: History positions (chosen at random) the code path trains per step
        (int, default 2048); bounds its [positions x codes] assignment and [positions x
        candidates] score matrices.
      item_feature_dims, item_feature_tables, user_feature_cardinalities, item_hidden_units,
        l2: As in ``TwoTower``. Item features become extra item tokens of the interaction.
      num_query_tokens: K, query tokens (and codes) per user (int, default 8).
      tokenizer: How the K tokens are made (str, default "last_state"). "last_state": a linear
        map of the encoder state after the last item. "slots": K learned slots, each shifted by
        its own linear map of that state, attend over the encoded history (causally, the positions up to the one
        being predicted), so each token can read a different part of it. "chunks": the
        encoder state, scaled to norm sqrt(d), cut into K contiguous chunks of d / K; chunk k
        is token k, placed in its own d / K coordinates of an otherwise zero d-vector and
        quantized by codebook k (needs ``num_codebooks=K``). This is product quantization of
        the state: the tokenizer has no weights, so with ``detach_code_path`` the codes need no
        assignment gradient and training scores them by lookup, which keeps K x N codes (e.g.
        32 x 256) affordable.
      num_codewords: N, codewords per codebook (int, default 512).
      num_codebooks: 1 (all tokens share one codebook, N codes in all) or K (token k uses
        codebook k, K x N codes). Default 1.
      quantize: False trains the unquantized all-to-all upper bound (default True).
      interaction_units: Hidden widths of the interaction MLP (default (64,)).
      commitment_weight: Weight of the quantizer's commitment loss (float, default 0.25).
      codebook_decay: EMA decay of the codebooks (float, default 0.99).
      sparsity_weight: Weight of the L1 penalty on the code-item scores (float, default 1e-3).
      assignment_temperature: Temperature of the soft assignment whose gradient trains the
        encoder, on the mean squared per-dimension codeword distance (float, default 0.1).
      relu_leak: Gradient leak of the score ReLU during training (float, default 0.01).
      encoder_loss_weight: Weight of an auxiliary dot-product softmax that trains the history
        encoder at every position (float, default 1.0; 0 turns it off). Serving never uses it.
      detach_code_path: The code path (tokenizer, quantizer, interaction) reads the encoder
        states and item tokens under stop-gradient, so the encoder and item embeddings are
        trained by the auxiliary loss alone (bool, default True). Trained jointly on ML-1M, the
        code path's gradients slowed the encoder to half the two-tower's validation HR@10
        after 10 epochs (0.11 vs 0.23).
      training_cache_fraction: Adds a softmax over the scores a cache of this fraction of the
        code-item table serves (float in (0, 1], default None: off; see "Cache-aware training"
        above). Only with ``quantize=True``; match it to the index's ``cache_fraction``. With
        ``loss="sampled_softmax"`` the fraction is taken of the step's candidates, not of the
        whole catalogue.
      cached_loss_weight: Weight of that softmax (float >= 0, default 1.0).
      serving_cache_fraction: The cache fraction the model will be served with (float in
        (0, 1], default None: the whole table). ``score_all`` then scores through such a cache,
        so validation and model selection measure the served path rather than the whole
        table, and it is the default ``cache_fraction`` of a "sparse_code" export. Only with
        ``quantize=True``.

    Inputs (a dict): "history" int32 [B, L] left-padded item indices; for training also
    "next_items" int32 [B, L]; one int32 [B] entry per user feature.

    Raises:
      ValueError: On invalid hyperparameters (named, with the value); an unknown ``user_tower``,
        ``loss`` or ``tokenizer``; ``num_codebooks`` other than 1 or ``num_query_tokens``
        (exactly ``num_query_tokens`` with ``tokenizer="chunks"``, which also needs
        ``embedding_dim`` divisible by it); a cache fraction without ``quantize=True``; or
        ``detach_code_path`` without ``encoder_loss_weight`` > 0. Later, ``user_embedding`` and
        ``build_index`` of an unquantized model (it has no codes).

    Example:
      >>> model = SparCode(num_items=100, embedding_dim=16, max_length=20, num_codewords=32)
      >>> model.compile(optimizer=tf.keras.optimizers.Adam(1e-3))
      >>> codes = model.query_codes({"history": tf.ones([2, 20], tf.int32)})  # int32 [2, 8]
    """

    def __init__(
        self,
        num_items: int,
        embedding_dim: int = 64,
        user_tower: str = "sasrec",
        max_length: int = 200,
        num_blocks: int = 2,
        num_heads: int = 1,
        dropout: float = 0.2,
        loss: str = "full_softmax",
        temperature: float = 1.0,
        num_sampled_negatives: int = 1024,
        max_loss_positions: int = 2048,
        item_feature_dims: Optional[dict[str, int]] = None,
        item_feature_tables: Optional[dict[str, np.ndarray]] = None,
        user_feature_cardinalities: Optional[dict[str, int]] = None,
        item_hidden_units: Sequence[int] = (),
        l2: float = 0.0,
        num_query_tokens: int = 8,
        tokenizer: str = "last_state",
        num_codewords: int = 512,
        num_codebooks: int = 1,
        quantize: bool = True,
        interaction_units: Sequence[int] = (64,),
        commitment_weight: float = 0.25,
        codebook_decay: float = 0.99,
        sparsity_weight: float = 1e-3,
        assignment_temperature: float = 0.1,
        relu_leak: float = 0.01,
        encoder_loss_weight: float = 1.0,
        detach_code_path: bool = True,
        training_cache_fraction: Optional[float] = None,
        cached_loss_weight: float = 1.0,
        serving_cache_fraction: Optional[float] = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if user_tower not in USER_TOWERS:
            raise ValueError(f"user_tower must be one of {USER_TOWERS}, got {user_tower!r}")
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        num_query_tokens = arguments.integer("num_query_tokens", num_query_tokens, 1)
        if tokenizer not in TOKENIZERS:
            raise ValueError(f"tokenizer must be one of {TOKENIZERS}, got {tokenizer!r}")
        num_codebooks = arguments.integer("num_codebooks", num_codebooks, 1)
        if num_codebooks not in (1, num_query_tokens):
            raise ValueError(f"num_codebooks must be 1 or num_query_tokens={num_query_tokens}, got {num_codebooks!r}")
        if tokenizer == "chunks" and num_codebooks != num_query_tokens:
            raise ValueError(f"tokenizer='chunks' quantizes chunk k with codebook k: num_codebooks must be "
                             f"num_query_tokens={num_query_tokens}, got {num_codebooks!r}")
        for name, value in (("sparsity_weight", sparsity_weight), ("relu_leak", relu_leak),
                            ("cached_loss_weight", cached_loss_weight), ("encoder_loss_weight", encoder_loss_weight)):
            arguments.real(name, value, 0.0)
        arguments.real("assignment_temperature", assignment_temperature, 0.0, low_open=True)
        quantize = arguments.boolean("quantize", quantize)
        cache_fractions = {"training_cache_fraction": training_cache_fraction,
                           "serving_cache_fraction": serving_cache_fraction}
        for name, value in cache_fractions.items():
            if value is not None:
                cache_fractions[name] = arguments.real(name, value, 0.0, 1.0, low_open=True)
                if not quantize:
                    raise ValueError(f"{name} needs quantize=True: an unquantized model has no cache")
        self._set_shared_hyperparameters(
            num_items=num_items, embedding_dim=embedding_dim, user_tower=user_tower, max_length=max_length,
            num_blocks=num_blocks, num_heads=num_heads, dropout=dropout, loss=loss, temperature=temperature,
            num_sampled_negatives=num_sampled_negatives, max_loss_positions=max_loss_positions,
            item_feature_dims=item_feature_dims, user_feature_cardinalities=user_feature_cardinalities,
            item_hidden_units=item_hidden_units, l2=l2,
        )
        # After the shared checks: "64" % 8 formats a string instead of refusing embedding_dim by name.
        if tokenizer == "chunks" and self.embedding_dim % num_query_tokens:
            raise ValueError(f"tokenizer='chunks' cuts the state into num_query_tokens={num_query_tokens} equal "
                             f"chunks: embedding_dim={embedding_dim!r} is not divisible by it")
        self.num_query_tokens = num_query_tokens
        self.tokenizer_kind = tokenizer
        # The sublayers check these too, but under their own argument names (decay,
        # hidden_units, ...): checked here, the message names what the caller passed.
        self.num_codewords = arguments.integer("num_codewords", num_codewords, 2)
        self.num_codebooks = num_codebooks
        self.quantize = quantize
        self.interaction_units = arguments.widths("interaction_units", interaction_units, allow_empty=False)
        self.commitment_weight = arguments.real("commitment_weight", commitment_weight, 0.0)
        self.codebook_decay = arguments.real("codebook_decay", codebook_decay, 0.0, 1.0, low_open=True, high_open=True)
        self.sparsity_weight = float(sparsity_weight)
        self.assignment_temperature = float(assignment_temperature)
        self.relu_leak = float(relu_leak)
        self.encoder_loss_weight = float(encoder_loss_weight)
        self.detach_code_path = arguments.boolean("detach_code_path", detach_code_path)
        self.training_cache_fraction = cache_fractions["training_cache_fraction"]
        self.cached_loss_weight = float(cached_loss_weight)
        self.serving_cache_fraction = cache_fractions["serving_cache_fraction"]
        if self.detach_code_path and not self.encoder_loss_weight:
            raise ValueError("detach_code_path=True needs encoder_loss_weight > 0: nothing else would "
                             "train the encoder")

        self._build_shared_layers(item_feature_tables)
        if self.tokenizer_kind != "chunks":
            self.tokenizer = tf.keras.layers.Dense(self.num_query_tokens * self.embedding_dim, name="tokenizer",
                                                   dtype=self.light_layer_dtype)
        if self.tokenizer_kind == "slots":
            self.token_slots = self.add_weight(name="token_slots", shape=(self.num_query_tokens, self.embedding_dim),
                                               initializer="glorot_uniform", autocast=False)
            # Single-head attention written out so keys and values are projected once per user,
            # not once per training position reading that user's history.
            light = self.light_layer_dtype
            self.slot_query = tf.keras.layers.Dense(self.embedding_dim, name="slot_query", dtype=light)
            self.slot_key = tf.keras.layers.Dense(self.embedding_dim, name="slot_key", dtype=light)
            self.slot_value = tf.keras.layers.Dense(self.embedding_dim, name="slot_value", dtype=light)
            self.slot_output = tf.keras.layers.Dense(self.embedding_dim, name="slot_output", dtype=light)
        # Tokens on a common scale keep codeword distances (and the assignment temperature)
        # meaningful whatever the encoder's output scale.
        self.token_norm = tf.keras.layers.LayerNormalization(epsilon=1e-6, center=False, scale=False,
                                                             name="token_norm", dtype=self.light_layer_dtype)
        self.quantizer = VectorQuantizer(
            self.num_codewords, num_codebooks=self.num_codebooks, decay=self.codebook_decay,
            commitment_weight=self.commitment_weight, name="quantizer", dtype=self.light_layer_dtype,
        )
        if self.quantize:
            # Its shape is known now. Built here, its state exists before the first training step:
            # a quantizer first built inside a mirrored train step (model.fit under
            # MirroredStrategy with 2+ replicas) fails when its initialization is lifted out.
            build_sublayer(self.quantizer, tf.TensorShape([None, self.num_query_tokens, self.embedding_dim])
                           if self.num_codebooks > 1 else tf.TensorShape([None, self.embedding_dim]))
        # Built with the model (query tokens are d wide; an item has its id token and one per
        # feature table): a model restored from a .keras file that only ran call() would
        # otherwise skip these weights and draw new ones at the first score.
        self.interaction = AllToAllInteraction(self.interaction_units, num_item_tokens=1 + len(self.item_feature_dims),
                                               name="interaction", dtype=self.dtype_policy)
        build_sublayer(self.interaction, tf.TensorShape([None, self.embedding_dim]))
        self.score_bias = self.add_weight(name="score_bias", shape=(), initializer="zeros", autocast=False)
        self.retrieval_loss_tracker = tf.keras.metrics.Mean(name="retrieval_loss")
        self.sparsity_tracker = tf.keras.metrics.Mean(name="positive_score_fraction")
        self.sparsity_loss_tracker = tf.keras.metrics.Mean(name="sparsity_loss")  # its weighted term of the loss
        self.encoder_loss_tracker = tf.keras.metrics.Mean(name="encoder_loss")
        if self.training_cache_fraction is not None:
            self.cached_loss_tracker = tf.keras.metrics.Mean(name="cached_retrieval_loss")

    # ---------------------------------------------------------------- query side
    @property
    def num_codes(self) -> int:
        """Size of the code id space: num_codebooks x num_codewords."""
        return self.num_codebooks * self.num_codewords

    def encode_sequence(self, inputs: dict, training: bool = False,
                        last_position_only: bool = False) -> tf.Tensor:
        """Encodes every history position: float [B, L, d]; with ``last_position_only``, the
        position after the most recent item alone, [B, 1, d] (see ``encode_history``)."""
        return encode_history(self.item_tower, self.encoder, self.user_feature_embeddings, inputs, training,
                              last_position_only)

    def query_tokens(self, states: tf.Tensor, sequence: Optional[tf.Tensor] = None,
                     history_mask: Optional[tf.Tensor] = None, rows: Optional[tf.Tensor] = None) -> tf.Tensor:
        """K continuous query tokens [P, K, d] of P positions.

        Args:
          states: float [P, d], the encoder state at each position (after its last item).
          sequence: float [B, L, d], the encoded histories the positions read (the "slots"
            tokenizer only).
          history_mask: bool [P, L], True at the history positions each position may read.
          rows: int [P], the row of ``sequence`` each position reads (default: row p).

        Raises:
          ValueError: If the "slots" tokenizer is given no history.
        """
        if self.tokenizer_kind == "chunks":
            return self._chunk_tokens(states)
        tokens = tf.reshape(self.tokenizer(states), [-1, self.num_query_tokens, self.embedding_dim])
        if self.tokenizer_kind == "slots":
            if sequence is None or history_mask is None:
                raise ValueError("the 'slots' tokenizer needs the encoded sequence and history_mask")
            queries = tokens + self.token_slots[tf.newaxis]
            keys, values = self.slot_key(sequence), self.slot_value(sequence)  # [B, L, d]
            if rows is not None:
                keys, values = tf.gather(keys, rows), tf.gather(values, rows)  # [P, L, d]
            logits = tf.einsum("pkd,pld->pkl", self.slot_query(queries), keys) / float(self.embedding_dim) ** 0.5
            readable = tf.convert_to_tensor(history_mask)[:, tf.newaxis, :]
            # A position with nothing readable gets uniform weights over padding, not NaN.
            logits += (1.0 - tf.cast(readable, logits.dtype)) * -1e9
            read = tf.einsum("pkl,pld->pkd", tf.nn.softmax(logits, axis=-1), values)
            tokens = queries + self.slot_output(read)
        return self.token_norm(tokens)

    def _chunk_tokens(self, states: tf.Tensor) -> tf.Tensor:
        """Tokens [P, K, d] of the "chunks" tokenizer: token k holds chunk k of the state (scaled
        to norm sqrt(d)) in its own coordinates and zeros elsewhere.

        A positive scale per user does not change the user's ranking, and a common norm lets one
        codebook per chunk serve every user. Zeros outside the chunk keep codeword k zero there
        too (its EMA averages such tokens), so distances are distances between chunks, and E
        reads each code as the chunk it stands for.
        """
        scaled = tf.math.l2_normalize(states, axis=-1) * float(self.embedding_dim) ** 0.5
        chunks = tf.reshape(scaled, [-1, self.num_query_tokens, 1, self.embedding_dim // self.num_query_tokens])
        own_chunk = tf.eye(self.num_query_tokens, dtype=scaled.dtype)[tf.newaxis, :, :, tf.newaxis]  # [1, K, K, 1]
        return tf.reshape(chunks * own_chunk, [-1, self.num_query_tokens, self.embedding_dim])

    @property
    def codes_need_assignment_gradient(self) -> bool:
        """Whether the retrieval loss must reach the tokens through a soft assignment: only when
        something trainable (a tokenizer, or the encoder) produces them."""
        return self.tokenizer_kind != "chunks" or not self.detach_code_path

    def last_position_tokens(self, inputs: dict, training: bool = False) -> tf.Tensor:
        """Query tokens [B, K, d] after each user's last item (what serving quantizes)."""
        if self.tokenizer_kind != "slots":  # the other tokenizers read the last state alone
            return self.query_tokens(last_position_state(self.encode_sequence, inputs, training=training))
        sequence = self.encode_sequence(inputs, training=training)
        return self.query_tokens(sequence[:, -1, :], sequence, tf.convert_to_tensor(inputs["history"]) > 0)

    def _quantize(self, tokens: tf.Tensor, training: bool = False, track_metrics: bool = False) -> tf.Tensor:
        """Global code ids [P, K] of tokens [P, K, d] (EMA and restarts when training; the
        quantizer's usage metrics also when ``track_metrics``, as under ``evaluate``)."""
        quantizer_input = tokens if self.num_codebooks > 1 else tf.reshape(tokens, [-1, self.embedding_dim])
        _, codes = self.quantizer(quantizer_input, training=training, track_metrics=track_metrics,
                                  vector_mask=self.step_has_rows())
        codes = tf.reshape(codes, [-1, self.num_query_tokens])
        if self.num_codebooks > 1:
            codes = self.quantizer.global_codes(codes)
        return codes

    def query_codes(self, inputs: dict) -> tf.Tensor:
        """The codes of each user's most recent state: int32 [B, K] in [0, num_codes)."""
        return self._quantize(self.last_position_tokens(inputs))

    def code_bag(self, codes: tf.Tensor) -> tf.Tensor:
        """How often each code occurs among a query's codes: float [B, num_codes]."""
        return tf.reduce_sum(tf.one_hot(codes, self.num_codes, dtype=tf.float32), axis=1)

    def user_embedding(self, inputs: dict, training: bool = False) -> tf.Tensor:
        """The query as served: its bag of codes, float [B, num_codes].

        Scores are ``user_embedding @ item_embeddings().T``, which is exactly what a
        ``SparseCodeIndex`` (or any dot-product index) over ``item_embeddings`` answers.
        """
        if not self.quantize:
            raise ValueError("an unquantized SparCode (quantize=False) has no code bag; use score_all")
        return self.code_bag(self.query_codes(inputs))

    # ---------------------------------------------------------------- item side
    def all_codewords(self) -> tf.Tensor:
        """Every codeword in global code order: float [num_codes, d]."""
        return tf.reshape(self.quantizer.codebooks, [self.num_codes, -1])

    def pair_scores(self, query_tokens: tf.Tensor, item_indices: tf.Tensor, training: bool = False) -> tf.Tensor:
        """ReLU(E(token, item) + b) for every token row and item: float [P, I] (>= 0)."""
        item_tokens = self.item_tower.tokens(item_indices)
        if self.detach_code_path:
            item_tokens = tf.stop_gradient(item_tokens)
        pre_activation = self.full_precision(self.interaction(query_tokens, item_tokens)) + self.score_bias
        return relu_with_leaky_gradient(pre_activation, self.relu_leak if training else 0.0)

    def code_item_scores(self, item_indices: Optional[tf.Tensor] = None, batch_size: int = 8192) -> tf.Tensor:
        """The code-item table T: float [num_codes, I] for ``item_indices`` (default every index,
        padding included as column 0 with score 0), computed in item chunks when I is known."""
        if item_indices is None:
            item_indices = tf.range(self.num_items + 1)
        item_indices = tf.convert_to_tensor(item_indices)
        codewords = tf.stop_gradient(self.all_codewords())
        length = item_indices.shape[0]
        if length is None:  # traced with an unknown length (e.g. a serving signature): one chunk
            table = self.pair_scores(codewords, item_indices)
        else:
            table = tf.concat([self.pair_scores(codewords, item_indices[start:start + batch_size])
                               for start in range(0, max(int(length), 1), batch_size)], axis=1)
        return table * tf.cast(item_indices > 0, table.dtype)[tf.newaxis, :]

    def item_embeddings(self, item_indices: Optional[tf.Tensor] = None) -> tf.Tensor:
        """Items' columns of code scores: float [I, num_codes] for ``item_indices`` (default
        every index, row 0 = padding)."""
        return tf.transpose(self.code_item_scores(item_indices))

    def encoder_item_embeddings(self) -> tf.Tensor:
        """The item vectors the auxiliary encoder loss scores the encoder states against: float
        [num_items + 1, d] (row 0 = padding).

        ``encode_sequence(inputs)[:, -1, :] @ encoder_item_embeddings().T`` is the two-tower
        inside SparCode, with the code path switched off: the ablation that shows what the codes
        add to (or lose from) their own encoder. Serving never uses it.
        """
        return self.item_tower(tf.range(self.num_items + 1))

    def build_index(self, index, batch_size: int = 4096, verbose: int = 1):
        """Fills ``index`` with every item's code-score column, streamed in item chunks.

        A ``SparseCodeIndex`` keeps only its budget while streaming, so the [items x codes]
        table is never held whole; other kinds get the concatenated table.

        Args:
          index: A ``RetrievalIndex`` (normally a ``SparseCodeIndex``); identifiers are the item
            indices 1..num_items (int64).
          batch_size: Items scored per chunk (int, default 4096).
          verbose: 1 shows a progress bar, 0 is silent.

        Returns:
          ``index``, filled.

        Raises:
          ValueError: If the model is unquantized (it has no codes to index).
        """
        if not self.quantize:
            raise ValueError("an unquantized SparCode (quantize=False) has no codes to index")
        progress = tf.keras.utils.Progbar(self.num_items, verbose=verbose, unit_name="item")

        def chunks():
            for start in range(1, self.num_items + 1, batch_size):
                indices = tf.range(start, min(start + batch_size, self.num_items + 1), dtype=tf.int64)
                rows = self.item_embeddings(tf.cast(indices, tf.int32))
                progress.add(int(indices.shape[0]))
                yield indices, rows

        signature = (tf.TensorSpec([None], tf.int64), tf.TensorSpec([None, self.num_codes], tf.float32))
        dataset = tf.data.Dataset.from_generator(chunks, output_signature=signature)
        if "num_candidates" in inspect.signature(index.index_from_dataset).parameters:
            return index.index_from_dataset(dataset, num_candidates=self.num_items)
        return index.index_from_dataset(dataset)

    # ---------------------------------------------------------------- scoring
    def score_all(self, inputs: dict, table: Optional[tf.Tensor] = None) -> tf.Tensor:
        """Scores of every item index: float [B, num_items + 1] (column 0 = padding).

        Quantized models score through their codes: what the index serves at a 100% cache or,
        with ``serving_cache_fraction`` set, at that cache (items it does not hold score 0).
        ``quantize=False`` models run the all-to-all network for every item.

        Args:
          inputs: The user inputs (``history`` and any user features).
          table: ``scoring_table()``, when the caller scores many batches with the same weights
            (an evaluation pass) and computes it once; default None, computed here.
        """
        if not self.quantize:
            return self.score_all_unquantized(inputs)
        if table is None:
            table = self.scoring_table()
        return tf.matmul(self.user_embedding(inputs), table)

    def scoring_table(self) -> Optional[tf.Tensor]:
        """The code-item table ``score_all`` multiplies the users' code bags by: float
        [num_codes, num_items + 1], cut to ``serving_cache_fraction`` when it is set; None for
        an unquantized model, which scores without codes.

        It depends on the weights only, not on the users, and costs every code against every item
        through the interaction network (plus a top-k over the table with a serving cache).
        """
        if not self.quantize:
            return None
        table = self.code_item_scores()
        if self.serving_cache_fraction is not None:
            # The index's budget counts real items only, so the padding column stays out of it.
            table = tf.pad(self.as_cached(table[:, 1:], self.serving_cache_fraction), [[0, 0], [1, 0]])
        return table

    def score_all_unquantized(self, inputs: dict, batch_size: int = 64) -> tf.Tensor:
        """Scores with continuous query tokens (no codes): float [B, num_items + 1].

        Runs E on every (token, item) pair, so it is exact but costs B x K x items; users are
        processed ``batch_size`` at a time to bound memory.
        """
        tokens = self.last_position_tokens(inputs)
        items = tf.range(self.num_items + 1)
        num_users = tf.shape(tokens)[0]
        # Fixed-size chunks through map_fn, so the batch size may be unknown when traced.
        padded = tf.pad(tokens, [[0, (-num_users) % batch_size], [0, 0], [0, 0]])
        chunks = tf.reshape(padded, [-1, batch_size * self.num_query_tokens, self.embedding_dim])

        def score_chunk(chunk: tf.Tensor) -> tf.Tensor:
            pairs = tf.reshape(self.pair_scores(chunk, items), [batch_size, self.num_query_tokens, -1])
            return tf.reduce_sum(pairs, axis=1)

        scores = tf.map_fn(score_chunk, chunks, fn_output_signature=tf.float32)
        scores = tf.reshape(scores, [-1, self.num_items + 1])[:num_users]
        return scores * tf.cast(items > 0, scores.dtype)[tf.newaxis, :]

    def call(self, inputs: dict, training: bool = False) -> tf.Tensor:
        """The user's codes (int32 [B, K]); continuous tokens [B, K, d] if unquantized."""
        if not self.quantize:
            return self.last_position_tokens(inputs, training=training)
        return self.query_codes(inputs)

    # ---------------------------------------------------------------- training
    def _soft_bag(self, tokens: tf.Tensor) -> tf.Tensor:
        """Softmax assignment of tokens [P, K, d] over codewords, summed into a bag [P, num_codes]."""
        codebooks = tf.stop_gradient(self.quantizer.codebooks)  # [M, N, d]
        if self.num_codebooks == 1:
            cross = tf.einsum("pkd,nd->pkn", tokens, codebooks[0])  # every token vs. the one codebook
        else:
            cross = tf.einsum("pkd,knd->pkn", tokens, codebooks)  # token k vs. codebook k
        squared = (tf.reduce_sum(tf.square(tokens), axis=-1)[..., tf.newaxis] - 2.0 * cross
                   + tf.reduce_sum(tf.square(codebooks), axis=-1)[tf.newaxis, :, :])
        distance = squared / float(self.embedding_dim)
        soft = tf.nn.softmax(-distance / self.assignment_temperature, axis=-1)  # [P, K, N]
        if self.num_codebooks == 1:
            return tf.reduce_sum(soft, axis=1)
        return tf.reshape(soft, [-1, self.num_codes])

    def _candidates(self, targets: tf.Tensor,
                    draws: LossDraws) -> tuple[tf.Tensor, tf.Tensor, Optional[tf.Tensor]]:
        """(candidate item indices [C], label position of each target [P], logQ [C] or None)."""
        if self.loss_name == "full_softmax":
            return tf.range(1, self.num_items + 1, dtype=targets.dtype), targets - 1, None
        extra = draws.uniform([self.num_sampled_negatives], 1, self.num_items + 1, dtype=targets.dtype)
        candidates, positions = tf.unique(tf.concat([targets, extra], axis=0))
        labels = positions[: tf.shape(targets)[0]]
        # One draw of the mixed sampler (targets by popularity, extras uniform) yields the item
        # with this probability; every candidate appears once after the unique.
        kept = tf.cast(tf.shape(targets)[0], tf.float32)
        num_extra = float(self.num_sampled_negatives)
        probability = (kept * tf.gather(self.item_frequency, candidates) + num_extra / self.num_items) / (kept + num_extra)
        return candidates, labels, tf.math.log(probability)

    def compute_loss(self, inputs: dict, training: bool = False) -> tf.Tensor:
        if isinstance(inputs, (tuple, list)):
            inputs = inputs[0]
        sequence = self.encode_sequence(inputs, training=training)
        next_items = training_targets(inputs, self.num_items)
        is_target = next_items > 0
        all_states = tf.boolean_mask(sequence, is_target)
        all_targets = tf.boolean_mask(next_items, is_target)
        draws = LossDraws(training)
        keep = draws.shuffle(tf.range(tf.shape(all_targets)[0]))[: self.max_loss_positions]
        states, targets = tf.gather(all_states, keep), tf.gather(all_targets, keep)
        code_states, code_sequence = states, sequence
        if self.detach_code_path:
            code_states, code_sequence = tf.stop_gradient(states), tf.stop_gradient(sequence)
        if self.tokenizer_kind == "slots":
            # Each kept position reads its own user's history up to itself.
            where = tf.gather(tf.where(is_target), keep)  # [P, 2] (row, position), in boolean_mask's order
            tokens = self.query_tokens(code_states, code_sequence, readable_history(inputs["history"], where),
                                       rows=where[:, 0])
        else:
            tokens = self.query_tokens(code_states)
        candidates, labels, log_q = self._candidates(targets, draws)
        encoder_loss = self._encoder_loss(all_states, all_targets, states, candidates, labels, log_q)

        if self.quantize:
            # The codewords the tokens are assigned to, read before the EMA update and
            # restarts that quantizing in training applies.
            codewords = tf.stop_gradient(tf.identity(self.all_codewords()))
            if self.codes_need_assignment_gradient:
                soft = self._soft_bag(tokens)
                codes = self._quantize(tokens, training=training, track_metrics=True)
                # Forward: the hard bag (what serving uses); backward: the soft assignment's gradient.
                bag = self.code_bag(codes) + soft - tf.stop_gradient(soft)
                score_codes = lambda table: tf.matmul(bag, table)  # noqa: E731
            else:
                codes = self._quantize(tokens, training=training, track_metrics=True)
                score_codes = lambda table: self.lookup_scores(codes, table)  # noqa: E731
            table = self.pair_scores(codewords, candidates, training=training)
            logits = score_codes(table)
            cached_logits = None if self.training_cache_fraction is None else score_codes(self.as_cached(table))
            sparsity = tf.reduce_mean(table)
            self.track(self.sparsity_tracker, tf.reduce_mean(tf.cast(table > 0, tf.float32)))
        else:
            pairs = self.pair_scores(tf.reshape(tokens, [-1, self.embedding_dim]), candidates, training=training)
            pairs = tf.reshape(pairs, [-1, self.num_query_tokens, tf.shape(candidates)[0]])
            logits, cached_logits = tf.reduce_sum(pairs, axis=1), None
            sparsity = tf.reduce_mean(pairs)
            self.track(self.sparsity_tracker, tf.reduce_mean(tf.cast(pairs > 0, tf.float32)))

        def softmax_loss(logits):
            logits = logits / self.temperature
            if log_q is not None:
                logits -= log_q[tf.newaxis, :]
            return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits))

        retrieval = softmax_loss(logits)
        self.track(self.retrieval_loss_tracker, retrieval)
        self.track(self.sparsity_loss_tracker, self.sparsity_weight * sparsity)
        loss = retrieval + self.sparsity_weight * sparsity + self.encoder_loss_weight * encoder_loss
        if cached_logits is not None:
            cached = softmax_loss(cached_logits)
            self.track(self.cached_loss_tracker, cached)
            loss += self.cached_loss_weight * cached
        return loss

    def lookup_scores(self, codes: tf.Tensor, table: tf.Tensor) -> tf.Tensor:
        """``code_bag(codes) @ table`` without the dense [P, num_codes] bag: float [P, C].

        The bag has K non-zeros per row, so a sparse product costs P x K x C instead of
        P x num_codes x C (with 32 x 256 codes, 256 times less); repeated codes add up, as in
        the bag. Its gradient reaches ``table`` only.
        """
        codes = tf.cast(codes, tf.int64)
        rows = tf.repeat(tf.range(tf.shape(codes, out_type=tf.int64)[0]), self.num_query_tokens)
        bag = tf.sparse.reorder(tf.sparse.SparseTensor(
            tf.stack([rows, tf.reshape(codes, [-1])], axis=1), tf.ones_like(rows, dtype=table.dtype),
            dense_shape=tf.stack([tf.shape(codes, out_type=tf.int64)[0], self.num_codes])))
        return tf.sparse.sparse_dense_matmul(bag, table)

    def as_cached(self, table: tf.Tensor, fraction: Optional[float] = None) -> tf.Tensor:
        """The code-item ``table`` [C, I] as a cache of ``fraction`` (default
        ``training_cache_fraction``) serves it.

        Entries below the ``ceil(f * C * I)``-th largest read 0 (a ``SparseCodeIndex`` with
        ``cache_fraction=f`` keeps the same entries, up to ties); the gradient reaches the kept
        entries only.
        """
        fraction = self.training_cache_fraction if fraction is None else fraction
        flat = tf.reshape(tf.stop_gradient(table), [-1])
        if flat.shape[0] is not None:  # the index's own count, exact
            budget = tf.constant(max(cache_budget(fraction, 1, int(flat.shape[0])), 1), tf.int32)
        else:
            size = tf.cast(tf.size(flat), tf.float32)
            budget = tf.maximum(tf.cast(tf.math.ceil(fraction * size), tf.int32), 1)
        threshold = tf.math.top_k(flat, k=tf.minimum(budget, tf.size(flat))).values[-1]
        return table * tf.cast(table >= threshold, table.dtype)

    def _encoder_loss(self, all_states, all_targets, states, candidates, labels, log_q) -> tf.Tensor:
        """Dot-product softmax of the encoder states against the item embeddings.

        The codes reach the encoder only through a straight-through assignment gradient, which
        alone trains it slowly (val HR@10 0.05 after 6 ML-1M epochs, against 0.19 for the
        two-tower). This auxiliary loss trains the encoder at every position the way the
        two-tower does, so the tokens it produces are informative from the start; scores are
        still served from codes only.
        """
        if not self.encoder_loss_weight:
            return tf.constant(0.0)
        if self.loss_name == "full_softmax":
            # Every position, as in the two-tower: with a subset of 8,192 positions the encoder
            # trailed the two-tower's by half after 8 ML-1M epochs (val HR@10 0.10 vs 0.21).
            logits = tf.matmul(all_states, self.item_tower(tf.range(1, self.num_items + 1)), transpose_b=True)
            loss = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=all_targets - 1, logits=logits)
        else:
            logits = tf.matmul(states, self.item_tower(candidates), transpose_b=True) - log_q[tf.newaxis, :]
            loss = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
        loss = tf.reduce_mean(loss)
        self.track(self.encoder_loss_tracker, loss)
        return loss

    # ---------------------------------------------------------------- config
    def get_config(self) -> dict:
        return {
            **self._shared_config(),
            "num_query_tokens": self.num_query_tokens,
            "tokenizer": self.tokenizer_kind,
            "num_codewords": self.num_codewords,
            "num_codebooks": self.num_codebooks,
            "quantize": self.quantize,
            "interaction_units": list(self.interaction_units),
            "commitment_weight": self.commitment_weight,
            "codebook_decay": self.codebook_decay,
            "sparsity_weight": self.sparsity_weight,
            "assignment_temperature": self.assignment_temperature,
            "relu_leak": self.relu_leak,
            "encoder_loss_weight": self.encoder_loss_weight,
            "detach_code_path": self.detach_code_path,
            "training_cache_fraction": self.training_cache_fraction,
            "cached_loss_weight": self.cached_loss_weight,
            "serving_cache_fraction": self.serving_cache_fraction,
        }
