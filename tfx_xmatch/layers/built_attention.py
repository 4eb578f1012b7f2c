"""A MultiHeadAttention that owns its weights as soon as it is made."""

from __future__ import annotations

import tensorflow as tf


def built_multi_head_attention(query_width: int, value_width: int, **kwargs) -> tf.keras.layers.MultiHeadAttention:
    """A ``tf.keras.layers.MultiHeadAttention`` for rank-3 inputs, with its weights created now.

    Keras builds a MultiHeadAttention at its first call. A layer that makes one in its own
    ``build`` then ends ``build`` without those weights, and a TF-SavedModel-format round trip
    (``model.save("dir")``, ``tf.keras.models.load_model``) restores the saved values into the
    attention it revives, which the first call replaces with freshly initialised ones: the
    reloaded model answers differently, without a warning. Calling it once on zeros of the
    right widths builds it through the public API.

    Args:
      query_width: Width of the queries [B, Q, query_width] (int >= 1).
      value_width: Width of the values (and keys) [B, L, value_width] (int >= 1).
      **kwargs: ``MultiHeadAttention`` arguments (``num_heads``, ``key_dim``, ``dropout``, ``name``...).

    Returns:
      The built layer.
    """
    attention = tf.keras.layers.MultiHeadAttention(**kwargs)
    with tf.init_scope():  # eager even when the caller is traced: weights, not graph tensors
        attention(tf.zeros([1, 1, query_width]), tf.zeros([1, 1, value_width]))
    return attention
