"""MeanPoolingEncoder: the running mean of a history's item embeddings."""

from __future__ import annotations

import tensorflow as tf

from tfx_xmatch import arguments
from tfx_xmatch.layers.shapes import require_rank, require_sequence_mask


@tf.keras.utils.register_keras_serializable(package="tfx_xmatch")
class MeanPoolingEncoder(tf.keras.layers.Layer):
    """Position t is a projection of the mean embedding of items 0..t (padding excluded).

    The running (causal) mean lets the mean tower train on every position like SASRec does,
    so the two towers differ only in how they summarise a history.

    Args:
      projection: Whether to apply a learned linear map after the mean (bool, default True).

    Call args:
      item_embeddings: float [B, L, d].
      padding_mask: bool [B, L], True where there is a real item.
      training: Python bool (unused; accepted for a uniform encoder interface).
      last_position_only: Python bool (default False). Return the last position alone, float
        [B, 1, d] (the mean over the whole history), as ``SASRecEncoder`` does.

    Returns:
      float [B, L, d], or [B, 1, d] with ``last_position_only``.

    Raises:
      ValueError: On a ``projection`` that is not a bool (the string "no" was taken as True);
        at call time, on item embeddings that are not [B, L, d] or a padding mask that is not [B, L].

    Example:
      >>> encoder = MeanPoolingEncoder(projection=False)
      >>> encoder(tf.ones([1, 3, 2]), tf.constant([[False, True, True]])).numpy()[0, :, 0]
      array([0., 1., 1.], dtype=float32)
    """

    def __init__(self, projection: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.projection = arguments.boolean("projection", projection)

    def build(self, input_shape):
        require_rank("item_embeddings", input_shape, "[B, L, d]")
        width = int(input_shape[-1])
        self.dense = None
        if self.projection:
            self.dense = tf.keras.layers.Dense(width, name="projection", dtype=self.dtype_policy)
        super().build(input_shape)

    def call(self, item_embeddings: tf.Tensor, padding_mask: tf.Tensor, training: bool = False,
             last_position_only: bool = False) -> tf.Tensor:
        padding_mask = tf.convert_to_tensor(padding_mask)
        require_rank("item_embeddings", item_embeddings, "[B, L, d]")
        require_sequence_mask("padding_mask", padding_mask, "item_embeddings", item_embeddings)
        mask = tf.cast(padding_mask, item_embeddings.dtype)[..., tf.newaxis]
        if last_position_only:
            running_sum = tf.reduce_sum(item_embeddings * mask, axis=1, keepdims=True)
            running_count = tf.maximum(tf.reduce_sum(mask, axis=1, keepdims=True), 1.0)
            mask = mask[:, -1:]
        else:
            running_sum = tf.cumsum(item_embeddings * mask, axis=1)
            running_count = tf.maximum(tf.cumsum(mask, axis=1), 1.0)
        pooled = running_sum / running_count
        if self.dense is not None:
            pooled = self.dense(pooled)
        return pooled * mask

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(projection=self.projection)
        return config
