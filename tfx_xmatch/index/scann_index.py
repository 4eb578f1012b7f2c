"""ScaNNIndex: TFRS' ScaNN layer behind the RetrievalIndex interface.

Fast approximate search, but its ops (``Scann>ScannSearchBatched``, ...) are not part of stock
TensorFlow: saving needs ``tf.saved_model.SaveOptions(namespace_whitelist=["Scann"])``, loading
needs ``import scann`` first (it registers the ops), and TF Serving needs a ScaNN-enabled build.
Use ``PartitionedIndex`` for a portable approximate index.
"""

from __future__ import annotations

import importlib.util
from typing import Callable, Optional, Tuple

import numpy as np
import tensorflow as tf
import tensorflow_recommenders as tfrs

from tfx_xmatch import arguments
from tfx_xmatch.index.retrieval_index import RetrievalIndex

# ScaNN's LUT16 asymmetric hashing trains 16 centres per block and fails on fewer points.
_MIN_CANDIDATES = 16


@tf.keras.utils.register_keras_serializable(package="tfx_xmatch")
class ScaNNIndex(RetrievalIndex):
    """Approximate dot-product top-k with ScaNN (tree partitioning + asymmetric hashing).

    Wraps ``tfrs.layers.factorized_top_k.ScaNN`` (built at ``index()`` time) and passes its
    tuning arguments through; the distance is always the dot product, so scores mean the same
    as for the other kinds.

    ScaNN behaviours the wrapper accounts for:

    * ``k`` goes to ScaNN as a tensor (``final_num_neighbors`` is an op input), so one traced
      function serves every k <= k_max.
    * ScaNN pads rows with fewer results with NaN scores (and index 0); those slots become
      ``-inf`` / ``padding_identifier`` like every other kind.
    * With reordering, ScaNN returns at most ``num_reordering_candidates`` results, so it must be
      at least ``k_max`` (more if calls use ``exclude``, which over-fetches).
    * ScaNN refuses more leaves than candidates; ``num_leaves`` and ``num_leaves_to_search`` are
      capped at the number of candidates. Its hashing needs at least 16 candidates.
    * Re-indexing builds a new searcher: functions traced before ``index()`` must be traced
      again (TFRS replaces the searcher's variables), unlike the stock-op kinds; such a function
      fails with an error saying so (it answered the old searcher's positions under the new
      identifiers). Eager calls answer from the new searcher.
    * The searcher is an op resource: a ``.keras`` file cannot hold it (saving one is refused);
      the TF SavedModel format does.

    Args:
      num_leaves: Tree partitions (int >= 1, default 100).
      num_leaves_to_search: Partitions searched per query (int >= 1, default 10).
      k_max: Largest k a call may ask for (int, default 100); also ScaNN's default
        ``num_neighbors``.
      num_reordering_candidates: If set, ScaNN rescores this many hashed-search results with
        exact dot products (int >= k_max, default None: no reordering).
      training_iterations: k-means iterations of the tree (int, default 12).
      dimensions_per_block: Asymmetric-hashing dimensions per block (int, default 2).
      parallelize_batch_searches: Search the queries of a batch in parallel (default True).
      **kwargs: ``k``, ``padding_identifier``, ``exclude_padding`` and Keras layer arguments,
        see ``RetrievalIndex``.

    Returns:
      As ``RetrievalIndex``: ScaNN's top-k and their identifiers, [B, k] each. Scores are the
      hashed approximations of the dot products, or exact ones for the reordered results.

    Raises:
      ImportError: If the ``scann`` package is not installed.
      ValueError: If an argument is out of range (and ``index()`` on fewer than 16 candidates).

    Example:
      >>> index = ScaNNIndex(num_leaves=10, num_leaves_to_search=3, k_max=10)
      >>> index = index.index(tf.random.normal([1000, 16]))
      >>> scores, ids = index(tf.random.normal([2, 16]), k=10)  # [2, 10] each
      >>> # Saving: tf.saved_model.save(module, path,
      >>> #     options=tf.saved_model.SaveOptions(namespace_whitelist=["Scann"]))
    """

    def __init__(
        self,
        num_leaves: int = 100,
        num_leaves_to_search: int = 10,
        k_max: int = 100,
        num_reordering_candidates: Optional[int] = None,
        training_iterations: int = 12,
        dimensions_per_block: int = 2,
        parallelize_batch_searches: bool = True,
        **kwargs,
    ):
        super().__init__(k_max=k_max, **kwargs)
        if importlib.util.find_spec("scann") is None:
            raise ImportError("ScaNNIndex needs the scann package: pip install scann")
        self.num_leaves = arguments.integer("num_leaves", num_leaves, 1)
        self.num_leaves_to_search = arguments.integer("num_leaves_to_search", num_leaves_to_search, 1)
        self.num_reordering_candidates = arguments.optional_integer(
            "num_reordering_candidates", num_reordering_candidates, 1)
        if self.num_reordering_candidates is not None and self.num_reordering_candidates < self.k_max:
            raise ValueError(
                f"num_reordering_candidates must be >= k_max={self.k_max} (ScaNN returns at most "
                f"that many results), got {num_reordering_candidates!r}"
            )
        self.training_iterations = arguments.integer("training_iterations", training_iterations, 1)
        self.dimensions_per_block = arguments.integer("dimensions_per_block", dimensions_per_block, 1)
        self.parallelize_batch_searches = arguments.boolean("parallelize_batch_searches", parallelize_batch_searches)
        self.scann = None

    def _index(self, candidates: tf.Tensor) -> Callable[[], None]:
        num_candidates = int(candidates.shape[0])
        if num_candidates < _MIN_CANDIDATES:
            # ScaNN's own error ("Number of clusters per block (16) is greater than asymmetric
            # hashing training data size") does not say what to change.
            raise ValueError(
                f"ScaNNIndex needs at least {_MIN_CANDIDATES} candidates (asymmetric hashing "
                f"trains {_MIN_CANDIDATES} centres per block), got {num_candidates}; use "
                "BruteForceIndex for tiny catalogues"
            )
        # The TFRS layer fixes its tree size at construction, and ScaNN rejects more leaves
        # than points, so the layer is made here, once the catalogue size is known.
        searcher = tfrs.layers.factorized_top_k.ScaNN(
            k=self.k_max,
            distance_measure="dot_product",
            num_leaves=min(self.num_leaves, num_candidates),
            num_leaves_to_search=min(self.num_leaves_to_search, num_candidates),
            training_iterations=self.training_iterations,
            dimensions_per_block=self.dimensions_per_block,
            num_reordering_candidates=self.num_reordering_candidates,
            parallelize_batch_searches=self.parallelize_batch_searches,
            name="scann",
        )
        # No identifiers: ScaNN returns row positions and the base class maps them, so every
        # kind handles identifiers, exclusion and padding the same way.
        searcher.index(candidates)

        def store() -> None:
            self.scann = searcher

        return store

    def _top_k(self, queries: tf.Tensor, k: tf.Tensor) -> Tuple[tf.Tensor, tf.Tensor]:
        if not tf.executing_eagerly():
            # A traced function holds the searcher of its trace but reads the current identifiers:
            # after a re-index it would answer old positions under new ids, so it fails instead,
            # before searching. The index's write counter must be what it was at trace time
            # (read then; call holds the index's lock, so no write is under way).
            with tf.init_scope():
                traced_with = int(self._writes.count.numpy())
            check = tf.debugging.assert_equal(
                self._writes.count, tf.constant(traced_with, tf.int64),
                message="ScaNNIndex.index() was called again after this function was traced: its ScaNN "
                        "searcher is the old one; trace the function again")
            with tf.control_dependencies([check]):
                queries = tf.identity(queries)
        scores, positions = self.scann(queries, k=k)
        missing = tf.math.is_nan(scores)
        scores = tf.where(missing, tf.constant(-np.inf, tf.float32), scores)
        positions = tf.where(missing, tf.constant(-1, tf.int32), tf.cast(positions, tf.int32))
        return scores, positions

    def save_own_variables(self, store) -> None:
        """Refuses a ``.keras`` file: the searcher is a ScaNN op resource, which only the TF
        SavedModel format carries (as for TFRS' own ScaNN layer)."""
        if self.identifiers is not None:
            raise ValueError("a ScaNNIndex cannot be saved in a .keras file (its searcher is a ScaNN op "
                             "resource); save in the TF SavedModel format, model.save(directory) or "
                             "tf.saved_model.save, with SaveOptions(namespace_whitelist=['Scann'])")

    def is_exact(self) -> bool:
        """True only for an exhaustive configuration.

        That is: every leaf is searched and every candidate is reordered with exact scores
        (``num_leaves_to_search >= num_leaves``, both capped at the catalogue size, and
        ``num_reordering_candidates`` >= the number of indexed candidates). False before
        ``index()``.

        Returns:
          Whether results equal a brute-force search.
        """
        if self.num_candidates is None:
            return False
        # Compare the leaf counts as built (both are capped at the catalogue size).
        searched = min(self.num_leaves_to_search, self.num_candidates)
        return (
            searched >= min(self.num_leaves, self.num_candidates)
            and self.num_reordering_candidates is not None
            and self.num_reordering_candidates >= self.num_candidates
        )

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            num_leaves=self.num_leaves,
            num_leaves_to_search=self.num_leaves_to_search,
            num_reordering_candidates=self.num_reordering_candidates,
            training_iterations=self.training_iterations,
            dimensions_per_block=self.dimensions_per_block,
            parallelize_batch_searches=self.parallelize_batch_searches,
        )
        config.pop("state", None)  # no .keras file holds its searcher (save_own_variables)
        return config
