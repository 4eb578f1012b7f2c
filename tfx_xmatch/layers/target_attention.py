"""TargetAttention: a target-dependent query attending over an encoded history."""

from __future__ import annotations

import tensorflow as tf

from tfx_xmatch import arguments
from tfx_xmatch.layers.built_attention import built_multi_head_attention
from tfx_xmatch.layers.shapes import require_rank


@tf.keras.utils.register_keras_serializable(package="tfx_xmatch")
class TargetAttention(tf.keras.layers.Layer):
    """Multi-head attention of target queries over history states (DIN-style, as in SPARC).

    Each query (e.g. the target item's interest codeword) weighs the history positions it may
    see; the output is the weighted history projected back to the state width. The query
    reaches the output only through the attention weights, never as a value, so a query that
    describes the target cannot be copied into the user vector (in training the query is built
    from the very item the user vector must retrieve).

    Args:
      num_heads: Attention heads (int >= 1, default 1).
      key_dim: Width per head (int >= 1, default: the query width divided by ``num_heads``).
      dropout: Dropout on the attention weights (float in [0, 1), default 0.0).
      state_width: d, the width of the history states (int >= 1, default: the query width). The
        attention's weights are made in ``build``, which sees only the queries, so a history of
        another width must be announced here.

    Call args:
      queries: float [B, Q, q] target queries.
      states: float [B, L, d] encoded history (d = ``state_width``).
      mask: bool [B, Q, L]: which history positions each query may attend to. A query whose
        row is all False gets a zero output.
      training: Python bool.

    Returns:
      float [B, Q, q].

    Raises:
      ValueError: On invalid hyperparameters (named, with the value), or at call time on
        queries, states or a mask of another rank than [B, Q, q], [B, L, d] and [B, Q, L], or
        states of another width than ``state_width``.

    Example:
      >>> attention = TargetAttention(num_heads=2, state_width=16)
      >>> out = attention(tf.random.normal([2, 3, 8]), tf.random.normal([2, 5, 16]), tf.ones([2, 3, 5], tf.bool))
      >>> out.shape
      TensorShape([2, 3, 8])
    """

    def __init__(self, num_heads: int = 1, key_dim: int | None = None, dropout: float = 0.0,
                 state_width: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.num_heads = arguments.integer("num_heads", num_heads, 1)
        self.key_dim = arguments.optional_integer("key_dim", key_dim, 1)
        self.dropout = arguments.real("dropout", dropout, 0.0, 1.0, high_open=True)
        self.state_width = arguments.optional_integer("state_width", state_width, 1)

    def build(self, queries_shape):
        require_rank("queries", queries_shape, "[B, Q, q]")
        width = int(queries_shape[-1])
        self.attention = built_multi_head_attention(
            width, self.state_width or width, num_heads=self.num_heads,
            key_dim=self.key_dim or max(1, width // self.num_heads), dropout=self.dropout, name="attention",
            dtype=self.dtype_policy)
        super().build(queries_shape)

    def call(self, queries: tf.Tensor, states: tf.Tensor, mask: tf.Tensor, training: bool = False) -> tf.Tensor:
        mask, states = tf.convert_to_tensor(mask), tf.convert_to_tensor(states)
        require_rank("queries", queries, "[B, Q, q]")
        require_rank("states", states, "[B, L, d]")
        # A [B, L] mask (one row for every query) failed inside the attention's softmax.
        require_rank("mask", mask, "[B, Q, L]")
        expected = self.state_width or queries.shape[-1]
        if states.shape[-1] is not None and states.shape[-1] != expected:
            raise ValueError(f"history states are {states.shape[-1]} wide but the attention was built for "
                             f"{expected}; construct TargetAttention(state_width={states.shape[-1]})")
        attended = self.attention(queries, states, states, attention_mask=mask, training=training)
        # Keras spreads a fully masked row uniformly over the history; such a query has nothing to see.
        has_context = tf.reduce_any(mask, axis=-1, keepdims=True)
        return attended * tf.cast(has_context, attended.dtype)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(num_heads=self.num_heads, key_dim=self.key_dim, dropout=self.dropout,
                      state_width=self.state_width)
        return config
