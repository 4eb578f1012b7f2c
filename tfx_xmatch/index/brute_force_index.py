"""BruteForceIndex: exact top-k by scoring every candidate (matmul + top_k, stock TF ops)."""

from __future__ import annotations

import functools
from typing import Callable, Tuple

import tensorflow as tf

from tfx_xmatch.index.retrieval_index import RetrievalIndex


@tf.keras.utils.register_keras_serializable(package="tfx_xmatch")
class BruteForceIndex(RetrievalIndex):
    """Exact dot-product top-k: one [B, N] score matrix per query batch.

    Uses only stock TensorFlow ops, so a SavedModel holding it runs on stock TF Serving, CPU or
    GPU. Cost grows linearly with the catalogue; use ``PartitionedIndex`` or ``ScaNNIndex``
    when that is too slow.

    Args:
      k_max: Largest k a call may ask for (int, default 100).
      **kwargs: ``k``, ``padding_identifier``, ``exclude_padding`` and Keras layer arguments,
        see ``RetrievalIndex``.

    Returns:
      As ``RetrievalIndex``: the exact top-k dot products of the whole catalogue and their
      identifiers, [B, k] each.

    Example:
      >>> index = BruteForceIndex(k_max=10).index(tf.random.normal([100, 8]), tf.range(100, 200))
      >>> scores, ids = index(tf.random.normal([2, 8]), k=tf.constant(5))  # [2, 5] each
    """

    def __init__(self, k_max: int = 100, **kwargs):
        super().__init__(k_max=k_max, **kwargs)
        self.candidates = None

    def _index(self, candidates: tf.Tensor) -> Callable[[], None]:
        return functools.partial(self._assign_states, {"candidates": candidates})

    def _top_k(self, queries: tf.Tensor, k: tf.Tensor) -> Tuple[tf.Tensor, tf.Tensor]:
        scores = tf.matmul(queries, self.candidates, transpose_b=True)
        # top_k needs k <= N; the base class pads the missing columns.
        return tf.math.top_k(scores, k=tf.minimum(k, tf.shape(scores)[1]))

    def is_exact(self) -> bool:
        """Always True: every candidate is scored.

        Returns:
          True.
        """
        return True
