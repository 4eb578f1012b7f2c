"""SPARC: multi-interest retrieval with jointly trained RQ-VAE interest codes and soft search.

Item tower: id (+ feature) embedding z, quantized by an RQ-VAE (``ResidualQuantizer``, L levels
of K codewords) into codes, codewords and a reconstruction z_rec. The RQ-VAE is trained with
the rest of the model: the retrieval loss reaches its codebooks through the attention queries.

User tower: the SASRec (or mean) encoding s_t of the history, plus ``TargetAttention`` over the
history whose query is an *interest*: in training the target item's level-1 codeword e0 or its
reconstruction z_rec (mixed 50/50 per position, ``codeword_query_rate``), at serving an
interest code predicted by the probabilistic interest tower. Our addition: a share of training
positions (``predicted_query_rate``) take the codeword of a code drawn from the interest
tower's own (detached) distribution instead, so the user vector is also trained under the
interests that serving will give it. Without it, on ML-1M the teacher-forced model fitted
training (retrieval loss 6.57 after 4 epochs, two-tower 6.75) while serving with predicted
interests stayed at val HR@10 0.04 (two-tower 0.13): the interest tower was right 9% of the
time and the user vector had learnt to trust its interest. User vector u = s_t + W attn.
Item score = u . z, so the item side is a plain embedding table that any dense index serves.

Probabilistic interest tower: a softmax over the K level-1 codes from s_t (read under
stop-gradient), trained on the target item's code. Serving ("soft search"): its top-K codes give K user vectors, each searched in a
dense index, merged by interest probability (``SoftSearchIndex``); hard search is K = 1.

Losses (each weight configurable, each logged during ``fit``):
  * ``retrieval_loss``: softmax of u . z over the catalogue (``full_softmax``) or over in-batch
    targets plus uniform negatives with logQ correction (``sampled_softmax``);
  * ``rqvae_loss``: reconstruction + codebook + commitment (``rqvae_weight``);
  * ``bpr_loss``: codeword shuffling, -log sigmoid(u(true interest) . z - u(shuffled codeword) . z)
    for the target z (``bpr_weight``): the user vector must depend on the interest it is given;
  * ``contrastive_loss``: in-batch InfoNCE between u and the target z
    (``user_item_contrastive_loss``, weight ``contrastive_weight``) plus InfoNCE between z and
    z_rec (``reconstruction_contrastive_loss``, weight ``reconstruction_contrastive_weight``);
  * ``interest_loss``: cross-entropy of the interest tower against the target's level-1 code
    (``interest_weight``); ``interest_accuracy`` is its top-1 accuracy;
  * ``mixture_loss`` (``mixture_interests`` > 0, weight ``mixture_weight``): the retrieval softmax
    of the interest tower's top ``mixture_interests`` user vectors mixed by probability;
  * ``backbone_loss`` (our addition, ``backbone_loss_weight`` > 0): the two-tower's softmax on the
    encoder state s_t alone, at every position.

With ``detach_interests`` (our addition) every interest loss reads the encoder states and the
item embeddings through stop-gradient, so the encoder and the item table learn the backbone loss
alone, exactly as the two-tower's do, and the interest branch (target attention, projection,
RQ-VAE, interest tower) learns a per-interest correction on top of them.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import tensorflow as tf

from tfx_xmatch import arguments
from tfx_xmatch.layers import ResidualQuantizer, TargetAttention
from tfx_xmatch.layers.sublayers import build_sublayer
from tfx_xmatch.models.base import RetrievalModel
from tfx_xmatch.models.history_encoding import (
    LossDraws, dot_product_softmax_loss, encode_history, frozen_tower, last_position_state, training_targets,
)

USER_TOWERS = ("mean", "sasrec")
LOSSES = ("full_softmax", "sampled_softmax")


def codeword_shuffle_bpr(true_scores: tf.Tensor, shuffled_scores: tf.Tensor) -> tf.Tensor:
    """BPR of the target's score under its true interest against a shuffled codeword:
    mean softplus(shuffled - true) = -log sigmoid(true - shuffled); log 2 when they tie."""
    return tf.reduce_mean(tf.nn.softplus(shuffled_scores - true_scores))


@tf.keras.utils.register_keras_serializable(package="tfx_xmatch")
class SPARC(RetrievalModel):
    """Soft probabilistic multi-interest retrieval via codebooks (SPARC, arXiv 2508.09090).

    Args:
      num_items: Number of real items (indices 1..num_items; 0 is padding).
      embedding_dim: Width of item, codeword and user vectors (int, default 64).
      user_tower: "mean" or "sasrec" history encoder (default "sasrec").
      max_length: History window L (int, default 200).
      num_blocks, num_heads, dropout: SASRec encoder settings (defaults 2, 1, 0.2).
      loss: "full_softmax" or "sampled_softmax" (default "full_softmax").
      temperature: Retrieval logits are divided by it (float, default 1.0).
      num_sampled_negatives: Uniform extra negatives of the sampled loss (int, default 1024).
      max_loss_positions: Positions per batch used by the sampled loss (int, default 4096).
      item_feature_dims, item_feature_tables, user_feature_cardinalities, item_hidden_units, l2:
        Item and user features, as in ``TwoTower``.
      num_levels: RQ-VAE levels (int, default 3).
      num_codewords: Codewords per level K; the interests are the level-1 codes (int, default 64).
      rq_hidden_units: Hidden widths of the RQ-VAE encoder/decoder (default (): linear).
      commitment_weight: RQ-VAE commitment weight (float, default 0.25).
      attention_heads: Heads of the target attention (int, default 1).
      codeword_query_rate: Share of teacher-forced training positions whose attention query is
        the target's codeword e0 rather than its reconstruction z_rec (float in [0, 1], default 0.5).
      predicted_query_rate: Share of training positions whose query is the codeword of a code
        drawn from the interest tower instead of the target's (float in [0, 1], default 0.5).
      serving_interests: K of ``score_all`` (validation) and the default of ``interest_vectors``
        (int >= 1, default 4).
      rqvae_weight, bpr_weight, contrastive_weight, interest_weight: Loss weights (floats >= 0,
        defaults 1.0, 0.1, 0.01, 1.0). The InfoNCE terms work on cosines at temperature 0.1,
        so their gradients are ~10x a dot-product loss's: at 0.1 they held ML-1M validation
        HR@10 at 0.046 after 3 epochs, against 0.085 without them (two-tower: 0.081).
      reconstruction_contrastive_weight: Weight of the z-z_rec InfoNCE (float >= 0, default None:
        ``contrastive_weight``, so both terms share it).
      contrastive_temperature: Temperature of both InfoNCE losses (float > 0, default 0.1).
      max_contrastive_positions: Positions per batch in the BPR, contrastive and mixture losses
        (int, default 1024).
      mixture_interests: M > 0 adds the soft-search likelihood as a loss: at sampled positions,
        -log sum_m p_m softmax(u_m . z_target) over the interest tower's top-M codes (p
        renormalised over them), every softmax over the whole catalogue. It is what soft
        search serves, and its gradient also reaches the interest tower, towards the interests
        whose user vector ranks the target well (int >= 0, default 0: off).
      mixture_weight: Weight of that loss (float >= 0, default 1.0).
      backbone_loss_weight: Weight of the softmax on the encoder state alone (float >= 0,
        default 0.0: off).
      detach_interests: The interest losses do not train the encoder or the item table (bool,
        default False); needs ``backbone_loss_weight`` > 0, the only loss left to train them.

    Inputs (a dict): "history" int32 [B, L] left-padded item indices; for training also
    "next_items" int32 [B, L]; one int32 [B] entry per user feature.

    Raises:
      ValueError: on invalid hyperparameters (the message quotes the value), and from
        ``compile(jit_compile=True)``: the training step cannot be compiled with XLA.

    Example:
      >>> model = SPARC(num_items=100, embedding_dim=16, max_length=20, num_codewords=8)
      >>> model.compile(optimizer=tf.keras.optimizers.Adam(1e-3))
      >>> vectors, log_probs = model.interest_vectors({"history": tf.ones([2, 20], tf.int32)}, 4)
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
        max_loss_positions: int = 4096,
        item_feature_dims: Optional[dict[str, int]] = None,
        item_feature_tables: Optional[dict[str, np.ndarray]] = None,
        user_feature_cardinalities: Optional[dict[str, int]] = None,
        item_hidden_units: Sequence[int] = (),
        l2: float = 0.0,
        num_levels: int = 3,
        num_codewords: int = 64,
        rq_hidden_units: Sequence[int] = (),
        commitment_weight: float = 0.25,
        attention_heads: int = 1,
        codeword_query_rate: float = 0.5,
        predicted_query_rate: float = 0.5,
        serving_interests: int = 4,
        rqvae_weight: float = 1.0,
        bpr_weight: float = 0.1,
        contrastive_weight: float = 0.01,
        reconstruction_contrastive_weight: Optional[float] = None,
        interest_weight: float = 1.0,
        contrastive_temperature: float = 0.1,
        max_contrastive_positions: int = 1024,
        mixture_interests: int = 0,
        mixture_weight: float = 1.0,
        backbone_loss_weight: float = 0.0,
        detach_interests: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if user_tower not in USER_TOWERS:
            raise ValueError(f"user_tower must be one of {USER_TOWERS}, got {user_tower!r}")
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        arguments.real("contrastive_temperature", contrastive_temperature, 0.0, low_open=True)
        for name, value in (("rqvae_weight", rqvae_weight), ("bpr_weight", bpr_weight),
                            ("contrastive_weight", contrastive_weight), ("interest_weight", interest_weight),
                            ("reconstruction_contrastive_weight",
                             contrastive_weight if reconstruction_contrastive_weight is None
                             else reconstruction_contrastive_weight),
                            ("mixture_weight", mixture_weight),
                            ("backbone_loss_weight", backbone_loss_weight)):
            arguments.real(name, value, 0.0)
        num_codewords = arguments.integer("num_codewords", num_codewords, 2)
        serving_interests = arguments.integer("serving_interests", serving_interests, 1)
        max_contrastive_positions = arguments.integer("max_contrastive_positions", max_contrastive_positions, 1)
        mixture_interests = arguments.integer("mixture_interests", mixture_interests, 0)
        codeword_query_rate = arguments.real("codeword_query_rate", codeword_query_rate, 0.0, 1.0)
        predicted_query_rate = arguments.real("predicted_query_rate", predicted_query_rate, 0.0, 1.0)
        detach_interests = arguments.boolean("detach_interests", detach_interests)
        for name, value in (("serving_interests", serving_interests), ("mixture_interests", mixture_interests)):
            if value > num_codewords:
                raise ValueError(f"{name} ({value!r}) cannot exceed num_codewords ({num_codewords!r})")
        if detach_interests and backbone_loss_weight <= 0:
            raise ValueError("detach_interests=True needs backbone_loss_weight > 0 (nothing else would train the "
                             f"encoder and the item table); got backbone_loss_weight={backbone_loss_weight!r}")
        self._set_shared_hyperparameters(
            num_items=num_items, embedding_dim=embedding_dim, user_tower=user_tower, max_length=max_length,
            num_blocks=num_blocks, num_heads=num_heads, dropout=dropout, loss=loss, temperature=temperature,
            num_sampled_negatives=num_sampled_negatives, max_loss_positions=max_loss_positions,
            item_feature_dims=item_feature_dims, user_feature_cardinalities=user_feature_cardinalities,
            item_hidden_units=item_hidden_units, l2=l2,
        )
        # The sublayers check these too, but under their own argument names (num_heads,
        # hidden_units, ...): checked here, the message names what the caller passed.
        self.num_levels = arguments.integer("num_levels", num_levels, 1)
        self.num_codewords = num_codewords
        self.rq_hidden_units = arguments.widths("rq_hidden_units", rq_hidden_units)
        self.commitment_weight = arguments.real("commitment_weight", commitment_weight, 0.0)
        self.attention_heads = arguments.integer("attention_heads", attention_heads, 1)
        self.codeword_query_rate = codeword_query_rate
        self.predicted_query_rate = predicted_query_rate
        self.serving_interests = serving_interests
        self.rqvae_weight = float(rqvae_weight)
        self.bpr_weight = float(bpr_weight)
        self.contrastive_weight = float(contrastive_weight)
        self.reconstruction_contrastive_weight = float(
            contrastive_weight if reconstruction_contrastive_weight is None else reconstruction_contrastive_weight)
        self.interest_weight = float(interest_weight)
        self.contrastive_temperature = float(contrastive_temperature)
        self.max_contrastive_positions = max_contrastive_positions
        self.mixture_interests = mixture_interests
        self.mixture_weight = float(mixture_weight)
        self.backbone_loss_weight = float(backbone_loss_weight)
        self.detach_interests = detach_interests

        self._build_shared_layers(item_feature_tables)
        self.rqvae = ResidualQuantizer(
            self.num_levels, self.num_codewords, hidden_units=self.rq_hidden_units,
            commitment_weight=self.commitment_weight, name="rqvae", dtype=self.light_layer_dtype,
        )
        self.target_attention = TargetAttention(self.attention_heads, dropout=self.dropout, name="target_attention",
                                                dtype=self.dtype_policy)
        # Zero-initialised: training starts from the plain sequence encoder's user vector.
        self.interest_projection = tf.keras.layers.Dense(
            self.embedding_dim, kernel_initializer="zeros", name="interest_projection", dtype=self.light_layer_dtype)
        self.interest_tower = tf.keras.Sequential([
            tf.keras.layers.Dense(self.embedding_dim, activation="relu", name="interest_hidden",
                                  dtype=self.light_layer_dtype),
            tf.keras.layers.Dense(self.num_codewords, name="interest_logits", dtype=self.light_layer_dtype),
        ], name="interest_tower")
        self.trackers = {name: tf.keras.metrics.Mean(name=name) for name in (
            "retrieval_loss", "rqvae_loss", "bpr_loss", "contrastive_loss", "user_item_contrastive_loss",
            "reconstruction_contrastive_loss", "interest_loss", "interest_accuracy")
            # Only the terms this model has: a mixture loss logged as a constant 0 read as a solved term.
            + (("mixture_loss",) if self.mixture_interests else ())
            + (("backbone_loss",) if self.backbone_loss_weight > 0 else ())}

    def compile(self, *args, jit_compile: Optional[bool] = None, **kwargs) -> None:
        self._refuse_jit_compile(jit_compile)
        super().compile(*args, jit_compile=jit_compile, **kwargs)

    @property
    def jit_compile(self) -> Optional[bool]:
        return self._jit_compile

    @jit_compile.setter
    def jit_compile(self, value: Optional[bool]) -> None:
        self._refuse_jit_compile(value)
        tf.keras.Model.jit_compile.fset(self, value)

    def _refuse_jit_compile(self, value: Optional[bool]) -> None:
        if value:
            # Refused here rather than at the first step, where XLA fails with "Input 0 to node
            # random_uniform_2 ... must be a compile-time constant", which names no setting.
            raise ValueError(
                f"{type(self).__name__} cannot train with jit_compile={value!r}: its loss works on the batch's "
                "target positions and packs them per user, shapes that depend on the data and that XLA must know "
                "when it compiles. Compile without jit_compile; export_retrieval_model(..., jit_compile=True) "
                "compiles the serving side")

    # ---------------------------------------------------------------- item side
    def item_codes(self, item_indices: Optional[tf.Tensor] = None) -> tf.Tensor:
        """RQ-VAE codes of items: int32 [I, num_levels]; default every real item (1..num_items)."""
        if item_indices is None:
            item_indices = tf.range(1, self.num_items + 1)
        return self.rqvae(self.item_tower(item_indices))["codes"]

    # ---------------------------------------------------------------- user side
    def encode_sequence(self, inputs: dict, training: bool = False,
                        last_position_only: bool = False) -> tf.Tensor:
        """Encodes every history position: float [B, L, d]; with ``last_position_only``, the
        position after the most recent item alone, [B, 1, d] (see ``encode_history``)."""
        return encode_history(self.item_tower, self.encoder, self.user_feature_embeddings, inputs, training,
                              last_position_only)

    def _attend(self, queries: tf.Tensor, states: tf.Tensor, mask: tf.Tensor, base: tf.Tensor,
                training: bool = False) -> tf.Tensor:
        """User vectors base + W attn(queries over states): float [B, Q, d]."""
        attended = self.target_attention(queries, states, mask, training=training)
        return base + self.interest_projection(attended)

    def _level1_codewords(self, codes: tf.Tensor) -> tf.Tensor:
        if not self.rqvae.built:  # serving may run before any item went through the RQ-VAE
            build_sublayer(self.rqvae, tf.TensorShape([None, self.embedding_dim]))
        return self.rqvae.lookup(codes, level=0)

    def interest_log_probs(self, inputs: dict) -> tf.Tensor:
        """Log probabilities of the level-1 interest codes: float [B, num_codewords]."""
        return tf.nn.log_softmax(self.interest_tower(last_position_state(self.encode_sequence, inputs)), axis=-1)

    def interest_vectors(self, inputs: dict, num_interests: Optional[int] = None) -> tuple[tf.Tensor, tf.Tensor]:
        """The user's top interests: (vectors float [B, K, d], log probabilities float [B, K]).

        Args:
          inputs: The model inputs (padded "history" and user features).
          num_interests: K, the number of interest codes (default ``serving_interests``).
        """
        num_interests = self.serving_interests if num_interests is None else int(num_interests)
        if not 1 <= num_interests <= self.num_codewords:
            raise ValueError(f"num_interests must be in [1, {self.num_codewords}], got {num_interests!r}")
        states = self.encode_sequence(inputs)
        log_probs = tf.nn.log_softmax(self.interest_tower(states[:, -1, :]), axis=-1)
        top = tf.math.top_k(log_probs, k=num_interests)
        queries = self._level1_codewords(top.indices)  # [B, K, d]
        seen = tf.convert_to_tensor(inputs["history"]) > 0
        mask = tf.repeat(seen[:, tf.newaxis, :], num_interests, axis=1)
        vectors = self._attend(queries, states, mask, states[:, -1:, :])
        return tf.ensure_shape(vectors, [None, num_interests, self.embedding_dim]), top.values

    def user_embedding(self, inputs: dict, training: bool = False) -> tf.Tensor:
        """Hard search's user vector (the most probable interest): float [B, d]."""
        return self.interest_vectors(inputs, 1)[0][:, 0, :]

    def score_all(self, inputs: dict, num_interests: Optional[int] = None) -> tf.Tensor:
        """Exact soft-search scores of every item index: float [B, num_items + 1] (column 0 = padding).

        The log mixture probability ``log sum_k p_k softmax(u_k . z)`` over the K most probable
        interests (p renormalised over them), each softmax over the whole catalogue.
        """
        vectors, log_probs = self.interest_vectors(inputs, num_interests)
        logits = tf.einsum("bkd,id->bki", vectors, self.item_embeddings()) / self.temperature
        padding = tf.one_hot(0, self.num_items + 1, on_value=-np.inf, off_value=0.0)
        log_softmax = tf.nn.log_softmax(logits + padding, axis=-1)
        weights = tf.nn.log_softmax(log_probs, axis=-1)[:, :, tf.newaxis]
        return tf.reduce_logsumexp(weights + log_softmax, axis=1)

    def call(self, inputs: dict, training: bool = False) -> tf.Tensor:
        return self.user_embedding(inputs, training=training)

    # ---------------------------------------------------------------- training
    def compute_loss(self, inputs: dict, training: bool = False) -> tf.Tensor:
        if isinstance(inputs, (tuple, list)):
            inputs = inputs[0]
        states = self.encode_sequence(inputs, training=training)
        history = tf.convert_to_tensor(inputs["history"])
        next_items = training_targets(inputs, self.num_items)
        is_target = next_items > 0
        where = tf.where(is_target)
        targets = tf.gather_nd(next_items, where)
        target_z = self.item_tower(targets)  # [P, d]
        draws = LossDraws(training)
        softmax = {**self._softmax_settings(), "draws": draws}
        backbone = tf.constant(0.0)
        if self.backbone_loss_weight > 0:
            backbone = dot_product_softmax_loss(tf.gather_nd(states, where), targets, self.item_tower, **softmax)
        items = self.item_tower
        if self.detach_interests:
            # The interest branch reads what the backbone loss learns without moving it.
            states, target_z = tf.stop_gradient(states), tf.stop_gradient(target_z)
            items = frozen_tower(self.item_tower)
        quantized = self.rqvae(target_z, training=training, track_metrics=True, vector_mask=self.step_has_rows())
        codes = quantized["codes"][:, 0]
        codeword = quantized["codewords"][:, 0, :]
        use_codeword = draws.uniform(tf.shape(codes)) < self.codeword_query_rate
        queries = tf.where(use_codeword[:, tf.newaxis], codeword, quantized["reconstruction"])
        # The interest tower reads the encoder but does not train it: the encoder's state is
        # the retrieval query, and a 64-way code classifier pulling on it cost the two-tower's
        # first-epoch quality on Beauty (val HR@10 0.008 vs 0.019).
        interest_logits = self.interest_tower(tf.stop_gradient(tf.gather_nd(states, where)))
        drawn = draws.categorical(tf.stop_gradient(interest_logits), 1, dtype=tf.int32)[:, 0]
        use_drawn = draws.uniform(tf.shape(codes)) < self.predicted_query_rate
        queries = tf.where(use_drawn[:, tf.newaxis], self._level1_codewords(drawn), queries)

        present = history > 0
        users = self._user_vectors_at(queries[:, tf.newaxis, :], where, states, present, training)[:, 0, :]

        retrieval = dot_product_softmax_loss(users, targets, items, **softmax)
        interest = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels=tf.stop_gradient(codes), logits=interest_logits))
        accuracy = tf.reduce_mean(tf.cast(tf.equal(tf.argmax(interest_logits, -1, output_type=tf.int32), codes),
                                          tf.float32))

        # The auxiliary losses use a random subset of the positions whose query was the target's
        # own codeword e0 (BPR: the true e0 must beat a shuffled one); they shape, the softmax
        # ranks. A batch without such a position (possible with few positions) uses them all.
        own_codeword = tf.logical_and(tf.logical_not(use_drawn), use_codeword)
        rows = tf.cast(tf.where(own_codeword)[:, 0], tf.int32)
        rows = tf.cond(tf.size(rows) > 0, lambda: rows, lambda: tf.range(tf.shape(targets)[0]))
        keep = draws.shuffle(rows)[: self.max_contrastive_positions]
        sub_where, sub_targets = tf.gather(where, keep), tf.gather(targets, keep)
        sub_users, sub_z = tf.gather(users, keep), tf.gather(target_z, keep)
        shuffled = self._level1_codewords(self.shuffled_codes(tf.gather(codes, keep), draws))
        shuffled_users = self._user_vectors_at(shuffled[:, tf.newaxis, :], sub_where, states, present,
                                               training)[:, 0, :]
        bpr = codeword_shuffle_bpr(tf.reduce_sum(sub_users * sub_z, -1), tf.reduce_sum(shuffled_users * sub_z, -1))
        user_item = self._info_nce(sub_users, sub_z, sub_targets)
        reconstruction = self._info_nce(sub_z, tf.gather(quantized["reconstruction"], keep), sub_targets)

        mixture = tf.constant(0.0)
        if self.mixture_interests:
            sample = draws.shuffle(tf.range(tf.shape(targets)[0]))[: self.max_contrastive_positions]
            mixture = self._mixture_loss(tf.gather(interest_logits, sample), tf.gather(where, sample),
                                         tf.gather(targets, sample), states, present, items, training)

        for name, value in (("retrieval_loss", retrieval), ("rqvae_loss", quantized["loss"]), ("bpr_loss", bpr),
                            ("contrastive_loss", user_item + reconstruction),
                            ("user_item_contrastive_loss", user_item),
                            ("reconstruction_contrastive_loss", reconstruction), ("interest_loss", interest),
                            ("interest_accuracy", accuracy), ("mixture_loss", mixture), ("backbone_loss", backbone)):
            if name in self.trackers:
                self.track(self.trackers[name], value)
        return (retrieval + self.rqvae_weight * quantized["loss"] + self.bpr_weight * bpr
                + self.contrastive_weight * user_item + self.reconstruction_contrastive_weight * reconstruction
                + self.interest_weight * interest
                + self.mixture_weight * mixture + self.backbone_loss_weight * backbone)

    def _mixture_loss(self, interest_logits, where, targets, states, present, items, training) -> tf.Tensor:
        """-log sum_m p_m softmax(u_m . z)[target] over the top-M interests (what soft search serves)."""
        top = tf.math.top_k(interest_logits, k=self.mixture_interests)
        log_weights = tf.nn.log_softmax(top.values, axis=-1)  # [P, M]
        users = self._user_vectors_at(self._level1_codewords(top.indices), where, states, present, training)
        logits = tf.einsum("pmd,id->pmi", users, items(tf.range(1, self.num_items + 1))) / self.temperature
        target_log_probs = tf.gather(tf.nn.log_softmax(logits, axis=-1), targets - 1, axis=2, batch_dims=1)
        return -tf.reduce_mean(tf.reduce_logsumexp(log_weights + target_log_probs, axis=1))

    def shuffled_codes(self, codes: tf.Tensor, draws: Optional[LossDraws] = None) -> tf.Tensor:
        """A random level-1 code different from each of ``codes`` (int32 [P]): the BPR negatives.
        ``draws`` makes the draw (default: the usual random op)."""
        draws = draws or LossDraws(training=True)
        shift = draws.uniform(tf.shape(codes), 1, self.num_codewords, dtype=codes.dtype)
        return (codes + shift) % self.num_codewords

    def _user_vectors_at(self, queries, where, states, present, training) -> tf.Tensor:
        """User vectors at the positions ``where`` (int64 [P, 2] of [B, L]), one per query: queries
        float [P, Q, d] -> float [P, Q, d]. Position (b, t) attends to row b's items at 0..t.

        Each row's positions are packed into slots of a [B, S * Q] query grid, S being the most
        positions any row has, so one attention call serves every position and query. All
        positions cost what a [B, L, L] causal attention costs; the 1024 sampled ones of the
        auxiliary losses cost ~S / L of it, not a full pass each.
        """
        rows = tf.cast(where[:, 0], tf.int32)
        batch, length = tf.shape(states)[0], tf.shape(states)[1]
        num_queries, width = tf.shape(queries)[1], self.embedding_dim
        counts = tf.math.bincount(rows, minlength=batch, maxlength=batch)
        order = tf.argsort(rows, stable=True)
        slot_in_order = tf.range(tf.size(rows)) - tf.gather(tf.cumsum(counts, exclusive=True), tf.gather(rows, order))
        slots = tf.scatter_nd(order[:, tf.newaxis], slot_in_order, tf.shape(rows))
        cells = tf.stack([rows, slots], axis=1)
        num_slots = tf.reduce_max(counts)
        grid = tf.scatter_nd(cells, queries, tf.stack([batch, num_slots, num_queries, width]))
        # Slot (b, s) holding position t sees columns 0..t of row b; an empty slot sees nothing.
        ends = tf.scatter_nd(cells, tf.cast(where[:, 1], tf.int32) + 1, tf.stack([batch, num_slots]))
        visible = tf.logical_and(tf.range(length)[tf.newaxis, tf.newaxis, :] < ends[:, :, tf.newaxis],
                                 present[:, tf.newaxis, :])
        attended = self.target_attention(tf.reshape(grid, tf.stack([batch, num_slots * num_queries, width])),
                                         states, tf.repeat(visible, num_queries, axis=1), training=training)
        attended = tf.gather_nd(tf.reshape(attended, tf.stack([batch, num_slots, num_queries, width])), cells)
        return tf.gather_nd(states, where)[:, tf.newaxis, :] + self.interest_projection(attended)

    def _info_nce(self, anchors: tf.Tensor, positives: tf.Tensor, item_ids: tf.Tensor) -> tf.Tensor:
        """In-batch InfoNCE on cosine similarity; other rows of the same item are not negatives."""
        anchors, positives = tf.math.l2_normalize(anchors, -1), tf.math.l2_normalize(positives, -1)
        logits = tf.matmul(anchors, positives, transpose_b=True) / self.contrastive_temperature
        same_item = tf.equal(item_ids[:, tf.newaxis], item_ids[tf.newaxis, :])
        diagonal = tf.eye(tf.shape(item_ids)[0], dtype=tf.bool)
        logits = tf.where(tf.logical_and(same_item, tf.logical_not(diagonal)), -1e9, logits)
        labels = tf.range(tf.shape(item_ids)[0])
        return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits))

    # ---------------------------------------------------------------- config
    def get_config(self) -> dict:
        return {
            **self._shared_config(),
            "num_levels": self.num_levels,
            "num_codewords": self.num_codewords,
            "rq_hidden_units": list(self.rq_hidden_units),
            "commitment_weight": self.commitment_weight,
            "attention_heads": self.attention_heads,
            "codeword_query_rate": self.codeword_query_rate,
            "predicted_query_rate": self.predicted_query_rate,
            "mixture_interests": self.mixture_interests,
            "mixture_weight": self.mixture_weight,
            "serving_interests": self.serving_interests,
            "rqvae_weight": self.rqvae_weight,
            "bpr_weight": self.bpr_weight,
            "contrastive_weight": self.contrastive_weight,
            "reconstruction_contrastive_weight": self.reconstruction_contrastive_weight,
            "interest_weight": self.interest_weight,
            "contrastive_temperature": self.contrastive_temperature,
            "max_contrastive_positions": self.max_contrastive_positions,
            "backbone_loss_weight": self.backbone_loss_weight,
            "detach_interests": self.detach_interests,
        }
