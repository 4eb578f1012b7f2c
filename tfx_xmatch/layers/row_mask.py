"""Which vectors of a batch count: the ``mask`` argument of the quantizer layers.

A quantizer's training state (codebook initialisation, EMA statistics, usage, restarts), its
metrics and its losses should only see real vectors: not padded positions of a sequence, and
not the placeholder row a model scores for a replica that a short last batch left empty.
"""

from __future__ import annotations

from typing import Optional

import tensorflow as tf


def flat_row_mask(mask: Optional[tf.Tensor], leading_shape: tf.Tensor, leading_rank: int,
                  layer_name: str) -> Optional[tf.Tensor]:
    """One bool per vector, in row-major order of the leading axes: bool [prod(leading_shape)].

    Args:
      mask: None (every vector counts), or a bool tensor over the leading axes or a prefix of
        them: a scalar (all or none), [B] for vectors [B, K, d], [B, K] for the same vectors.
      leading_shape: int32 [leading_rank], the dynamic shape of the leading axes.
      leading_rank: The number of leading axes (the static rank of the vectors' batch axes).
      layer_name: Named in errors.

    Returns:
      None when ``mask`` is None, else the flat bool mask.

    Raises:
      ValueError: ``mask`` is not bool, or has more axes than the leading ones, or static sizes
        that differ from theirs.
    """
    if mask is None:
        return None
    mask = tf.convert_to_tensor(mask)
    if mask.dtype != tf.bool:
        raise ValueError(f"{layer_name}: mask must be bool (True where a vector counts), got {mask.dtype.name}")
    rank = mask.shape.rank
    if rank is None or rank > leading_rank:
        raise ValueError(f"{layer_name}: mask must cover the inputs' {leading_rank} leading axes or a prefix of "
                         f"them, got a mask of shape {mask.shape}")
    static = tf.get_static_value(leading_shape)
    if static is not None:
        for axis, (size, expected) in enumerate(zip(mask.shape, static)):
            if size is not None and size != expected:
                raise ValueError(f"{layer_name}: mask of shape {mask.shape} does not match the inputs' leading "
                                 f"axes {[int(size) for size in static]} (axis {axis}: {size} against {expected})")
    expanded = tf.reshape(mask, tf.concat([tf.shape(mask), tf.ones([leading_rank - rank], tf.int32)], 0))
    return tf.reshape(tf.broadcast_to(expanded, leading_shape), [-1])


def masked_mean(values: tf.Tensor, weights: Optional[tf.Tensor] = None) -> tf.Tensor:
    """The mean of ``values`` [n] weighed by ``weights`` [n] (default 1 each): 0 over no weight,
    where a plain mean would be NaN (a batch of no vectors, or of none that count)."""
    if weights is None:
        weights = tf.ones_like(values)
    return tf.math.divide_no_nan(tf.reduce_sum(values * weights), tf.reduce_sum(weights))
