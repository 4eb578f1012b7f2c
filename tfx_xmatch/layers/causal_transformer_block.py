"""CausalTransformerBlock: the SASRec self-attention block."""

from __future__ import annotations

import tensorflow as tf

from tfx_xmatch import arguments
from tfx_xmatch.layers.built_attention import built_multi_head_attention


@tf.keras.utils.register_keras_serializable(package="tfx_xmatch")
class CausalTransformerBlock(tf.keras.layers.Layer):
    """Pre-norm transformer block where position t attends only to positions ≤ t.

    Pre-norm (LayerNorm before attention and feed-forward) trains stably without warm-up,
    which matters because the models here are trained from scratch with plain Adam.

    Args:
      num_heads: Attention heads (int, default 1).
      ffn_units: Width of the feed-forward hidden layer; default None means the model width.
      dropout: Dropout rate on attention weights and residual branches (float, default 0.2).

    Call args:
      inputs: float [B, L, d] sequence.
      padding_mask: bool [B, L], True where there is a real item. Padded positions are
        neither attended to nor kept (their output is zero).
      training: Python bool.

    Returns:
      float [B, L, d].
    """

    def __init__(self, num_heads: int = 1, ffn_units: int | None = None, dropout: float = 0.2, **kwargs):
        super().__init__(**kwargs)
        if num_heads < 1:
            raise ValueError(f"num_heads must be at least 1, got {num_heads!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.num_heads = int(num_heads)
        self.ffn_units = None if ffn_units is None else arguments.integer("ffn_units", ffn_units, 1)
        self.dropout = float(dropout)

    def build(self, input_shape):
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

    def call(self, inputs: tf.Tensor, padding_mask: tf.Tensor, training: bool = False) -> tf.Tensor:
        length = tf.shape(inputs)[1]
        causal = tf.linalg.band_part(tf.ones((length, length), tf.bool), -1, 0)
        attention_mask = tf.logical_and(causal[tf.newaxis], padding_mask[:, tf.newaxis, :])
        normed = self.attention_norm(inputs)
        attended = self.attention(normed, normed, attention_mask=attention_mask, training=training)
        hidden = inputs + self.residual_dropout(attended, training=training)
        feed_forward = self.ffn_out(self.ffn_hidden(self.ffn_norm(hidden)))
        outputs = hidden + self.residual_dropout(feed_forward, training=training)
        return outputs * tf.cast(padding_mask, outputs.dtype)[..., tf.newaxis]

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(num_heads=self.num_heads, ffn_units=self.ffn_units, dropout=self.dropout)
        return config
