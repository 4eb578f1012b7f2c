"""TwoTower: the dot-product retrieval baseline every cross-interaction model is compared to.

Item tower: id embedding (+ item feature embeddings) -> optional MLP. User tower: `mean`
(running mean of the history) or `sasrec` (causal transformer blocks). The item embedding table
is shared by the history input and the output layer, as in SASRec. Every history position is
trained to predict the item that followed it.

Losses:
  * ``full_softmax``: softmax over the whole catalogue at every position (best when the
    catalogue is small enough for a [positions x items] matrix per batch, e.g. ML-1M).
  * ``sampled_softmax``: TFRS ``tasks.Retrieval`` with in-batch negatives (other positions'
    targets) plus optional uniformly sampled extra negatives, logQ correction for both and
    accidental-hit removal; for catalogues too large for the full softmax.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_recommenders as tfrs

from tfx_xmatch.layers.row_mask import mean_or_zero
from tfx_xmatch.models.base import RetrievalModel, light_global_policy
from tfx_xmatch.models.history_encoding import LossDraws, encode_history, last_position_state, training_targets

USER_TOWERS = ("mean", "sasrec")
LOSSES = ("full_softmax", "sampled_softmax")


@tf.keras.utils.register_keras_serializable(package="tfx_xmatch")
class TwoTower(RetrievalModel):
    """Dot-product two-tower retrieval model over item histories.

    Args:
      num_items: Number of real items (indices 1..num_items; 0 is padding).
      embedding_dim: Width of item and user embeddings (int, default 64).
      user_tower: "mean" or "sasrec" (default "sasrec").
      max_length: History window L (int, default 200).
      num_blocks: Transformer blocks of the sasrec tower (int, default 2).
      num_heads: Attention heads of the sasrec tower (int, default 1).
      dropout: Dropout rate of the sasrec tower (float, default 0.2).
      loss: "full_softmax" or "sampled_softmax" (default "full_softmax").
      temperature: Logits are divided by it (float, default 1.0).
      num_sampled_negatives: Extra uniformly sampled negatives per batch for the sampled loss
        (int, default 0: in-batch negatives only).
      max_loss_positions: The sampled loss uses at most this many (random) positions per batch,
        bounding its [positions x positions] score matrix (int, default 4096).
      item_feature_dims: Widths of item feature tables, e.g. {"genres": 18} (default none).
      item_feature_tables: Their values, {name: float [num_items + 1, width]} (default zeros,
        filled from a checkpoint).
      user_feature_cardinalities: Number of categories of each categorical user feature, e.g.
        {"gender": 3}; index 0 means unknown (default none). Each name becomes an input of the
        serving signatures, so it must be one TensorFlow takes there (``ValueError`` otherwise,
        see ``tfx_xmatch.data.dataset.check_user_feature_names``).
      item_hidden_units: Optional item-tower MLP widths (default none).
      l2: L2 penalty on item id embeddings (float, default 0).

    Inputs (a dict): "history" int32 [B, L] left-padded item indices; for training also
    "next_items" int32 [B, L] (the item after each history position, 0 at padding); one int32
    [B] entry per user feature.

    Raises:
      ValueError: On invalid hyperparameters (named, with the value, e.g. "num_heads must be an
        integer >= 1, got 0"), an unknown ``user_tower`` or ``loss``, or item feature tables
        that do not match ``item_feature_dims``; at call time, on histories known to be longer
        than ``max_length``.

    Example:
      >>> model = TwoTower(num_items=100, embedding_dim=16, max_length=20)
      >>> model.compile(optimizer=tf.keras.optimizers.Adam(1e-3))
      >>> scores = model.score_all({"history": tf.zeros([2, 20], tf.int32)})  # [2, 101]
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
        num_sampled_negatives: int = 0,
        max_loss_positions: int = 4096,
        item_feature_dims: Optional[dict[str, int]] = None,
        item_feature_tables: Optional[dict[str, np.ndarray]] = None,
        user_feature_cardinalities: Optional[dict[str, int]] = None,
        item_hidden_units: Sequence[int] = (),
        l2: float = 0.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if user_tower not in USER_TOWERS:
            raise ValueError(f"user_tower must be one of {USER_TOWERS}, got {user_tower!r}")
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        self._set_shared_hyperparameters(
            num_items=num_items, embedding_dim=embedding_dim, user_tower=user_tower, max_length=max_length,
            num_blocks=num_blocks, num_heads=num_heads, dropout=dropout, loss=loss, temperature=temperature,
            num_sampled_negatives=num_sampled_negatives, max_loss_positions=max_loss_positions,
            item_feature_dims=item_feature_dims, user_feature_cardinalities=user_feature_cardinalities,
            item_hidden_units=item_hidden_units, l2=l2,
        )
        self._build_shared_layers(item_feature_tables)
        # Per-example losses, averaged in _sampled_softmax_loss: a Keras loss that reduces by
        # itself ("sum_over_batch_size") refuses to run under a tf.distribute strategy, and the
        # train step here scales each replica's mean by the number of replicas.
        with light_global_policy(self.light_layer_dtype):
            self.retrieval_task = tfrs.tasks.Retrieval(
                loss=tf.keras.losses.CategoricalCrossentropy(from_logits=True, reduction="none"),
                temperature=self.temperature,
                remove_accidental_hits=True,
            )
        # It has no weights; built now, an export of a model that never ran it (full softmax,
        # or reloaded from disk) does not warn "Skipping full serialization ... not built".
        self.retrieval_task.build(None)

    # ---------------------------------------------------------------- towers
    def encode_sequence(self, inputs: dict, training: bool = False,
                        last_position_only: bool = False) -> tf.Tensor:
        """Encodes every history position: float [B, L, d]; with ``last_position_only``, the
        position after the most recent item alone, [B, 1, d] (see ``encode_history``)."""
        return encode_history(self.item_tower, self.encoder, self.user_feature_embeddings, inputs, training,
                              last_position_only)

    def user_embedding(self, inputs: dict, training: bool = False) -> tf.Tensor:
        """The representation after the most recent history item: float [B, d]."""
        return last_position_state(self.encode_sequence, inputs, training=training)

    def score_all(self, inputs: dict) -> tf.Tensor:
        """Scores of every item index for each user: float [B, num_items + 1] (column 0 = padding)."""
        return tf.matmul(self.user_embedding(inputs), self.item_embeddings(), transpose_b=True)

    def call(self, inputs: dict, training: bool = False) -> tf.Tensor:
        return self.user_embedding(inputs, training=training)

    # ---------------------------------------------------------------- training
    def compute_loss(self, inputs: dict, training: bool = False) -> tf.Tensor:
        if isinstance(inputs, (tuple, list)):
            # Keras packs `train_on_batch(x)` as (x,) or (x, y, sample_weight); y is unused.
            inputs = inputs[0]
        sequence = self.encode_sequence(inputs, training=training)
        next_items = training_targets(inputs, self.num_items)
        # Only real positions carry a target; dropping padding here saves most of the
        # softmax cost on short histories.
        is_target = next_items > 0
        queries = tf.boolean_mask(sequence, is_target)
        targets = tf.boolean_mask(next_items, is_target)
        if self.loss_name == "full_softmax":
            return self._full_softmax_loss(queries, targets)
        return self._sampled_softmax_loss(queries, targets, LossDraws(training))

    def _full_softmax_loss(self, queries: tf.Tensor, targets: tf.Tensor) -> tf.Tensor:
        item_table = self.item_embeddings()[1:]
        logits = tf.matmul(queries, item_table, transpose_b=True) / self.temperature
        losses = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=targets - 1, logits=logits)
        return tf.reduce_mean(losses)

    def _sampled_softmax_loss(self, queries: tf.Tensor, targets: tf.Tensor, draws: LossDraws) -> tf.Tensor:
        num_positions = tf.shape(targets)[0]
        keep = draws.shuffle(tf.range(num_positions))[: self.max_loss_positions]
        queries = tf.gather(queries, keep)
        targets = tf.gather(targets, keep)
        kept = tf.cast(tf.shape(targets)[0], tf.float32)
        candidate_ids = targets
        if self.num_sampled_negatives:
            extra = draws.uniform(
                [self.num_sampled_negatives], minval=1, maxval=self.num_items + 1, dtype=targets.dtype
            )
            candidate_ids = tf.concat([targets, extra], axis=0)
        # logQ: the probability that one draw of the mixed sampler (in-batch targets, drawn by
        # popularity, plus uniform extras) yields the candidate, whichever sampler produced this
        # copy of it. It is the expected count scaled into [0, 1], which TFRS clips to.
        num_extra = float(self.num_sampled_negatives)
        sampling_probability = (
            kept * tf.gather(self.item_frequency, candidate_ids) + num_extra / self.num_items
        ) / (kept + num_extra)
        candidates = self.item_tower(candidate_ids)
        # The task makes its logQ and accidental-hit layers at each call.
        with light_global_policy(self.light_layer_dtype):
            losses = self.retrieval_task(
                queries,
                candidates,
                candidate_sampling_probability=sampling_probability,
                candidate_ids=candidate_ids,
                compute_metrics=False,
                compute_batch_metrics=False,
            )
        # As Keras' "sum_over_batch_size": the mean, and 0 for a batch without targets.
        return mean_or_zero(losses)

    # ---------------------------------------------------------------- config
    def get_config(self) -> dict:
        return self._shared_config()
