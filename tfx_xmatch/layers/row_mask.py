"""Which vectors of a batch count: the ``vector_mask`` argument of the quantizer layers.

A quantizer's training state (codebook initialisation, EMA statistics, usage, restarts), its
metrics and its losses should only see real vectors: not padded positions of a sequence, and
not the placeholder row a model scores for a replica that a short last batch left empty.

Named ``vector_mask``, not ``mask``: Keras fills a ``mask`` argument on its own from an input's
``_keras_mask`` (an ``Embedding(mask_zero=True)`` upstream), which would change what a layer
learns without the caller asking.
"""

from __future__ import annotations

from typing import Optional

import tensorflow as tf


def flat_row_mask(mask: Optional[tf.Tensor], leading_shape: tf.Tensor, static_leading: tf.TensorShape,
                  layer_name: str) -> Optional[tf.Tensor]:
    """One bool per vector, in row-major order of the leading axes: bool [prod(leading_shape)].

    Args:
      mask: None (every vector counts), or a bool tensor over the leading axes or a prefix of
        them: a scalar (all or none), [B] for vectors [B, K, d], [B, K] for the same vectors.
      leading_shape: int32 [rank], the dynamic shape of the leading axes.
      static_leading: The static shape of the leading axes (known rank; sizes may be None).
      layer_name: Named in errors.

    Returns:
      None when ``mask`` is None, else the flat bool mask.

    Raises:
      ValueError: ``mask`` is not bool, has more axes than the leading ones, or a static size
        that differs from theirs.
      tf.errors.InvalidArgumentError: (when the check runs) a size that differs from theirs at
        run time; a mask axis is never broadcast.
    """
    if mask is None:
        return None
    mask = tf.convert_to_tensor(mask)
    if mask.dtype != tf.bool:
        raise ValueError(f"{layer_name}: vector_mask must be bool (True where a vector counts), got {mask.dtype.name}")
    rank, leading_rank = mask.shape.rank, static_leading.rank
    if rank is None or rank > leading_rank:
        raise ValueError(f"{layer_name}: vector_mask must cover the inputs' {leading_rank} leading axes or a prefix "
                         f"of them, got a mask of shape {mask.shape}")
    for axis, (size, expected) in enumerate(zip(mask.shape, static_leading)):
        if size is not None and expected is not None and size != expected:
            raise ValueError(f"{layer_name}: vector_mask of shape {mask.shape} does not match the inputs' leading "
                             f"axes {static_leading} (axis {axis}: {size} against {expected})")
    check = tf.debugging.assert_equal(
        tf.shape(mask), leading_shape[:rank],
        message=f"{layer_name}: vector_mask does not match the leading axes of the inputs")
    with tf.control_dependencies([check]):
        expanded = tf.reshape(mask, tf.concat([tf.shape(mask), tf.ones([leading_rank - rank], tf.int32)], 0))
    return tf.reshape(tf.broadcast_to(expanded, leading_shape), [-1])


def select_rows(rows: tf.Tensor, valid: Optional[tf.Tensor]) -> tf.Tensor:
    """The rows (along the first axis) that count; all of them when ``valid`` is None.

    Selected rather than weighed by 0: 0 times an inf or NaN in a row that does not count
    is NaN, and its gradient would be too."""
    return rows if valid is None else tf.boolean_mask(rows, valid)


def mean_or_zero(values: tf.Tensor) -> tf.Tensor:
    """The mean of every entry of ``values``: 0 over none, where a plain mean would be NaN (a
    batch of no vectors, or of none that count)."""
    return tf.math.divide_no_nan(tf.reduce_sum(values), tf.cast(tf.size(values), values.dtype))
