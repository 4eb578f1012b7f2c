"""CausalTransformerBlock: the SASRec self-attention block."""

from __future__ import annotations

import tensorflow as tf

from tfx_xmatch import arguments
from tfx_xmatch.layers.built_attention import built_multi_head_attention
from tfx_xmatch.layers.shapes import require_rank, require_sequence_mask


@tf.keras.utils.register_keras_serializable(package="tfx_xmatch")
class CausalTransformerBlock(tf.keras.layers.Layer):
    """Pre-norm transformer block where position t attends only to positions ≤ t.

    Pre-norm (LayerNorm before attention and feed-forward) trains stably without warm-up,
    which matters because the models here are trained from scratch with plain Adam.

    Args:
      num_heads: Attention heads (int >= 1, default 1); must divide the model width d.
      ffn_units: Width of the feed-forward hidden layer (int >= 1, default None: the model width).
      dropout: Dropout rate on attention weights and residual branches (float in [0, 1), default 0.2).

    Call args:
      inputs: float [B, L, d] sequence.
      padding_mask: bool [B, L], True where there is a real item. Padded positions are
        neither attended to nor kept (their output is zero).
      training: Python bool.
      last_position_only: Python bool (default False). Compute the output of the last position
        alone, which still attends over the whole sequence: float [B, 1, d], equal to the last
        row of the full output. Serving needs only that row, and it costs one query's attention
        and feed-forward instead of L.

    Returns:
      float [B, L, d], or [B, 1, d] with ``last_position_only``.

    Raises:
      ValueError: On invalid hyperparameters (named, with the value); when built, on a model
        width d that ``num_heads`` does not divide; at call time, on inputs that are not
        [B, L, d] or a padding mask that is not [B, L].

    Example:
      >>> block = CausalTransformerBlock(num_heads=2, dropout=0.0)
      >>> block(tf.random.normal([2, 5, 8]), tf.ones([2, 5], tf.bool)).shape
      TensorShape([2, 5, 8])
    """

    def __init__(self, num_heads: int = 1, ffn_units: int | None = None, dropout: float = 0.2, **kwargs):
        super().__init__(**kwargs)
        self.num_heads = arguments.integer("num_heads", num_heads, 1)
        self.ffn_units = arguments.optional_integer("ffn_units", ffn_units, 1)
        self.dropout = arguments.real("dropout", dropout, 0.0, 1.0, high_open=True)

    def build(self, input_shape):
        require_rank("inputs", input_shape, "[B, L, d]")
        width = int(input_shape[-1])
        if width % self.num_heads:
            raise ValueError(f"model width {width} is not divisible by num_heads={self.num_heads}")
        # Sublayers take this layer's dtype policy (Keras gives them the global one otherwise).
        self.attention_norm = tf.keras.layers.LayerNormalization(epsilon=1e-6, name="attention_norm",
                                                                 dtype=self.dtype_policy)
        self.attention = built_multi_head_attention(
            width, width, num_heads=self.num_heads, key_dim=width // self.num_heads, dropout=self.dropout,
            name="attention", dtype=self.dtype_policy)
        self.ffn_norm = tf.keras.layers.LayerNormalization(epsilon=1e-6, name="ffn_norm", dtype=self.dtype_policy)
        self.ffn_hidden = tf.keras.layers.Dense(self.ffn_units or width, activation="relu", name="ffn_hidden",
                                                dtype=self.dtype_policy)
        self.ffn_out = tf.keras.layers.Dense(width, name="ffn_out", dtype=self.dtype_policy)
        self.residual_dropout = tf.keras.layers.Dropout(self.dropout, dtype=self.dtype_policy)
        super().build(input_shape)

    def call(self, inputs: tf.Tensor, padding_mask: tf.Tensor, training: bool = False,
             last_position_only: bool = False) -> tf.Tensor:
        padding_mask = tf.convert_to_tensor(padding_mask)
        require_rank("inputs", inputs, "[B, L, d]")
        require_sequence_mask("padding_mask", padding_mask, "inputs", inputs)
        normed = self.attention_norm(inputs)
        if last_position_only:
            # The last position may attend to every position: its causal row is all True.
            attention_mask = padding_mask[:, tf.newaxis, :]
            residual, query, padding_mask = inputs[:, -1:], normed[:, -1:], padding_mask[:, -1:]
        else:
            length = tf.shape(inputs)[1]
            causal = tf.linalg.band_part(tf.ones((length, length), tf.bool), -1, 0)
            attention_mask = tf.logical_and(causal[tf.newaxis], padding_mask[:, tf.newaxis, :])
            residual, query = inputs, normed
        attended = self.attention(query, normed, attention_mask=attention_mask, training=training)
        hidden = residual + self.residual_dropout(attended, training=training)
        feed_forward = self.ffn_out(self.ffn_hidden(self.ffn_norm(hidden)))
        outputs = hidden + self.residual_dropout(feed_forward, training=training)
        return outputs * tf.cast(padding_mask, outputs.dtype)[..., tf.newaxis]

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(num_heads=self.num_heads, ffn_units=self.ffn_units, dropout=self.dropout)
        return config
