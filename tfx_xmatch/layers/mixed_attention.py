"""MixedAttention: T2Diff's user tower over a session, a predicted next item and a long history."""

from __future__ import annotations

import tensorflow as tf

from tfx_xmatch import arguments
from tfx_xmatch.layers.built_attention import built_multi_head_attention
from tfx_xmatch.layers.shapes import require_rank, require_sequence_mask
from tfx_xmatch.layers.target_attention import TargetAttention

POOLINGS = ("mean", "predicted")


@tf.keras.utils.register_keras_serializable(package="tfx_xmatch")
class MixedAttention(tf.keras.layers.Layer):
    """Self-attention over [session ; predicted next item], then target attention over the history.

    1. The session items (with position embeddings) and the reconstructed next item x_hat form
       a sequence; self-attention blocks (residual + layer norm + feed-forward) mix them,
       so every session item sees the anticipated target ("early interaction").
    2. The mixed sequence is pooled into the session vector: the mean over its real positions
       (``pooling="mean"``), or the output at the x_hat position (``pooling="predicted"``), which
       keeps the recency order that a mean blurs.
    3. The session vector queries the long history with ``TargetAttention``.
    4. The user vector is a dense map of [session vector ; history read].

    Args:
      num_heads: Attention heads of both attentions (int, default 1).
      num_blocks: Self-attention blocks over the session (int, default 1).
      dropout: Dropout rate (float in [0, 1), default 0.1).
      max_session_length: The longest session S the layer takes (int, default 10); the position
        table has a row for each session position and one for x_hat.
      pooling: How the mixed sequence becomes the session vector: "mean" or "predicted"
        (str, default "mean").

    Call args:
      session: float [B, S, d] session item embeddings (S <= max_session_length, most recent last).
      session_mask: bool [B, S].
      predicted: float [B, d] the reconstructed next item x_hat.
      history: float [B, H, d] the long-history item embeddings.
      history_mask: bool [B, H].
      training: Python bool.

    Returns:
      float [B, d] user vectors.

    Raises:
      ValueError: On invalid hyperparameters (named, with the value), or at call time on inputs
        of the wrong rank or a session longer than ``max_session_length``.

    Example:
      >>> layer = MixedAttention()
      >>> layer(tf.zeros([2, 10, 8]), tf.ones([2, 10], tf.bool), tf.zeros([2, 8]), tf.zeros([2, 40, 8]),
      ...       tf.ones([2, 40], tf.bool)).shape
      TensorShape([2, 8])
    """

    def __init__(self, num_heads: int = 1, num_blocks: int = 1, dropout: float = 0.1, max_session_length: int = 10,
                 pooling: str = "mean", **kwargs):
        super().__init__(**kwargs)
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.pooling = pooling
        self.num_blocks = arguments.integer("num_blocks", num_blocks, 1)
        self.num_heads = arguments.integer("num_heads", num_heads, 1)
        self.dropout = arguments.real("dropout", dropout, 0.0, 1.0, high_open=True)
        self.max_session_length = arguments.integer("max_session_length", max_session_length, 1)

    def build(self, session_shape):
        require_rank("session", session_shape, "[B, S, d]")
        width = int(session_shape[-1])
        self.positions = self.add_weight(name="session_positions", shape=(self.max_session_length + 1, width),
                                         initializer="glorot_uniform")
        self.blocks = []
        for i in range(self.num_blocks):
            self.blocks.append((
                built_multi_head_attention(width, width, num_heads=self.num_heads,
                                           key_dim=max(1, width // self.num_heads), dropout=self.dropout,
                                           name=f"self_attention_{i}", dtype=self.dtype_policy),
                tf.keras.layers.LayerNormalization(epsilon=1e-6, name=f"attention_norm_{i}",
                                                   dtype=self.dtype_policy),
                tf.keras.Sequential([tf.keras.layers.Dense(width, activation="relu",
                                                           name=f"feed_forward_{i}_hidden", dtype=self.dtype_policy),
                                     tf.keras.layers.Dropout(self.dropout, dtype=self.dtype_policy),
                                     tf.keras.layers.Dense(width, name=f"feed_forward_{i}_output",
                                                           dtype=self.dtype_policy)],
                                    name=f"feed_forward_{i}"),
                tf.keras.layers.LayerNormalization(epsilon=1e-6, name=f"feed_forward_norm_{i}",
                                                   dtype=self.dtype_policy),
            ))
        # The .keras / .weights.h5 savers look into lists of layers, not into the tuples of
        # ``blocks`` (whose paths TF checkpoints of earlier runs hold): the same layers, listed.
        self.block_layers = [layer for block in self.blocks for layer in block]
        self.history_attention = TargetAttention(self.num_heads, dropout=self.dropout, name="history_attention",
                                                 dtype=self.dtype_policy)
        self.combine = tf.keras.layers.Dense(width, name="combine", dtype=self.dtype_policy)
        super().build(session_shape)

    def call(self, session, session_mask, predicted, history, history_mask, training: bool = False) -> tf.Tensor:
        # Keras casts only the first argument to the layer's dtype.
        predicted, history = (tf.cast(tensor, self.compute_dtype) for tensor in (predicted, history))
        session_mask, history_mask = tf.convert_to_tensor(session_mask), tf.convert_to_tensor(history_mask)
        require_rank("session", session, "[B, S, d]")
        require_sequence_mask("session_mask", session_mask, "session", session, "[B, S]")
        require_rank("predicted", predicted, "[B, d]")
        require_rank("history", history, "[B, H, d]")
        require_sequence_mask("history_mask", history_mask, "history", history, "[B, H]")
        sequence = tf.concat([session, predicted[:, tf.newaxis, :]], axis=1)
        mask = tf.concat([session_mask, tf.ones_like(session_mask[:, :1])], axis=1)
        # A longer session would slice the table from a negative start: one row broadcast to
        # every position, or a shape error that does not say why.
        static_length = session.shape[1]
        if static_length is not None and static_length > self.max_session_length:
            raise ValueError(f"sessions are {static_length} items long, more than max_session_length="
                             f"{self.max_session_length}; keep the most recent {self.max_session_length} items")
        if static_length is None:
            tf.debugging.assert_less_equal(tf.shape(session)[1], self.max_session_length,
                                           message=f"sessions are longer than max_session_length={self.max_session_length}")
        length = tf.shape(sequence)[1]
        sequence += self.positions[self.max_session_length + 1 - length:][tf.newaxis]
        pair_mask = tf.logical_and(mask[:, :, tf.newaxis], mask[:, tf.newaxis, :])
        hidden = sequence
        for attention, attention_norm, feed_forward, feed_forward_norm in self.blocks:
            attended = attention(hidden, hidden, attention_mask=pair_mask, training=training)
            hidden = attention_norm(hidden + attended)
            hidden = feed_forward_norm(hidden + feed_forward(hidden, training=training))
        if self.pooling == "predicted":
            session_vector = hidden[:, -1, :]
        else:
            weights = tf.cast(mask, hidden.dtype)[..., tf.newaxis]
            session_vector = tf.reduce_sum(hidden * weights, axis=1) / tf.reduce_sum(weights, axis=1)
        read = self.history_attention(session_vector[:, tf.newaxis, :], history,
                                      history_mask[:, tf.newaxis, :], training=training)
        return self.combine(tf.concat([session_vector, read[:, 0, :]], axis=-1))

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(num_heads=self.num_heads, num_blocks=self.num_blocks, dropout=self.dropout,
                      max_session_length=self.max_session_length, pooling=self.pooling)
        return config
