"""SoftSearchIndex: K searches per user (one per interest) merged by interest probability (SPARC)."""

from __future__ import annotations

from typing import Callable, Optional, Tuple, Union

import numpy as np
import tensorflow as tf

from tfx_xmatch import arguments

from tfx_xmatch.index.retrieval_index import RetrievalIndex


@tf.keras.utils.register_keras_serializable(package="tfx_xmatch")
class SoftSearchIndex(RetrievalIndex):
    """Searches a base index once per interest vector and merges the lists into one top-k.

    A SPARC user has K interest vectors u_1..u_K with probabilities p_1..p_K (the top-K codes of
    its interest tower). Each u_k is searched in the base index; the merged score of an item is
    the log of its mixture probability ``log sum_k p_k softmax_k(item)``, where ``softmax_k`` is
    the softmax of u_k's scores over the ``k_max`` best items of u_k left after the row's
    exclusions (the items further down have little probability under that interest). So an
    item's score depends neither on k nor on how many padding entries the exclusion list
    carries. An item found by several interests appears once, with the probability mass of
    all of them. With K = 1 the order is exactly the base index's (hard search); the scores are
    the base scores minus a per-query constant.

    Queries are float [B, K, d] with K = ``num_interests``; ``log_weights`` [B, K] are
    the interests' log probabilities (renormalised over the K given; default uniform). Uses
    stock TF ops around the base index, so the result is as portable as the base kind.

    Args:
      base: The index searched per interest (a ``RetrievalIndex``, e.g. ``BruteForceIndex``,
        ``ScaNNIndex`` or ``PartitionedIndex``). It is built by this index's ``index()``.
      num_interests: K, the searches per user (int >= 1, default 4).
      temperature: Scores are divided by it before each interest's softmax, like the model's
        own softmax (float > 0, default 1.0).
      k_max: Largest k a call may ask for (int, default 100); at most the base's ``k_max``.
      **kwargs: ``k``, ``padding_identifier``, ``exclude_padding`` and Keras layer arguments,
        see ``RetrievalIndex``.

    Returns:
      Called as ``index(queries, k=None, exclude=None, log_weights=None)`` (see ``call``):
      ``(scores, identifiers)``, float32 [B, k] log mixture probabilities, best first, and
      the matching identifiers; empty slots as in ``RetrievalIndex``.

    Raises:
      ValueError: ``base`` is not a ``RetrievalIndex``, its ``k_max`` is below ``k_max``,
        ``num_interests`` is not an integer >= 1, or ``temperature`` is not positive.

    Example:
      >>> index = SoftSearchIndex(BruteForceIndex(k_max=10), num_interests=4, k_max=10)
      >>> index = index.index(tf.random.normal([100, 8]))
      >>> scores, ids = index(tf.random.normal([2, 4, 8]), k=5, log_weights=tf.math.log([[.4, .3, .2, .1]] * 2))
    """

    def __init__(self, base: RetrievalIndex, num_interests: int = 4, k_max: int = 100, temperature: float = 1.0,
                 **kwargs):
        super().__init__(k_max=k_max, **kwargs)
        self.temperature = arguments.real("temperature", temperature, 0.0, low_open=True)
        self.num_interests = arguments.integer("num_interests", num_interests, 1)
        if not isinstance(base, RetrievalIndex):
            raise ValueError(f"base must be a RetrievalIndex, got {type(base).__name__}")
        if base.k_max < self.k_max:
            raise ValueError(f"base.k_max ({base.k_max}) must be >= k_max ({self.k_max}): every interest "
                             "search fetches up to k_max items")
        self.base = base
        self.item_dimension: Optional[int] = None

    def _index(self, candidates: tf.Tensor) -> Callable[[], None]:
        # The base answers positions 0..N-1; this index maps them to its own identifiers.
        return self.base._index_positions(candidates)

    def _set_catalogue(self, identifiers: tf.Tensor, num_candidates: int, dimension: int) -> None:
        # Queries reach the base class packed as [B, K * (d + 1)], so its width check is ours.
        # Set in the same write: a query between two writes failed on the item width.
        super()._set_catalogue(identifiers, num_candidates, None)
        self.item_dimension = dimension

    def _saved_attributes(self) -> tuple:
        return (*super()._saved_attributes(), "item_dimension")

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(num_interests=self.num_interests, temperature=self.temperature,
                      base={"class_name": type(self.base).__name__, "config": self.base.get_config()})
        return config

    @classmethod
    def from_config(cls, config: dict) -> "SoftSearchIndex":
        from tfx_xmatch.index import INDEX_KINDS  # the registry imports this module

        config = dict(config)
        base = config.pop("base")
        state = config.pop("state", None)
        kinds = {kind.__name__: kind for kind in INDEX_KINDS.values()}
        if base.get("class_name") not in kinds:
            raise ValueError(f"unknown base index class {base.get('class_name')!r}; known: {sorted(kinds)}")
        index = cls(kinds[base["class_name"]].from_config(base["config"]), **config)
        index._expect_state(state)
        return index

    def is_exact(self) -> bool:
        """Whether each interest's search is exact (the base kind's answer).

        Returns:
          ``base.is_exact()``.
        """
        return self.base.is_exact()

    def call(
        self,
        queries: tf.Tensor,
        k: Optional[Union[int, tf.Tensor]] = None,
        exclude: Optional[tf.Tensor] = None,
        log_weights: Optional[tf.Tensor] = None,
    ) -> Tuple[tf.Tensor, tf.Tensor]:
        """Top-k of the merged interest searches, best first.

        Args:
          queries: float [B, K, d] interest vectors.
          k, exclude: As in ``RetrievalIndex.call``.
          log_weights: float [B, K] log probabilities of the interests (default uniform).

        Returns:
          ``(scores, identifiers)`` [B, k]: merged log mixture probabilities and identifiers.

        Raises:
          ValueError: If not indexed, or queries are not [B, K, d] with the candidates' d, or
            ``log_weights`` is not [B, K].
          TypeError: If the queries are not floats.
          tf.errors.InvalidArgumentError: As in ``RetrievalIndex.call``.
        """
        with self._state_lock:  # the item width read here is the searched catalogue's
            return super().call(self._packed(queries, log_weights), k=k, exclude=exclude)

    def _packed(self, queries: tf.Tensor, log_weights: Optional[tf.Tensor]) -> tf.Tensor:
        """Checked queries and log weights as the base class searches them: [B, K * d + K]."""
        self._raise_unless_indexed()
        queries = tf.convert_to_tensor(queries)
        if not queries.dtype.is_floating:
            raise TypeError(f"queries must be a float tensor, got dtype {queries.dtype.name}")
        queries = tf.cast(queries, tf.float32)
        if queries.shape.rank != 3:
            raise ValueError(f"queries must be [B, K, d] interest vectors, got shape {queries.shape}")
        num_interests, width = self.num_interests, queries.shape[2]
        # Keras' SavedModel loader restores the variables but not this Python value; the base
        # search then checks the width.
        dimension = width if self.item_dimension is None else self.item_dimension
        if dimension is None:
            raise ValueError(f"queries must be [B, num_interests={num_interests}, d] with a known d, got shape "
                             f"{queries.shape}")
        if queries.shape[1] in (None, num_interests) and width in (None, dimension):
            # A traced signature may leave K or d unknown, as the other index kinds allow d.
            queries = tf.ensure_shape(queries, [None, num_interests, dimension])  # checked when it runs
            width = dimension
        if queries.shape[1] != num_interests or width != dimension:
            raise ValueError(f"queries must be [B, num_interests={num_interests}, d={self.item_dimension}], "
                             f"got shape {queries.shape}")
        batch = tf.shape(queries)[0]
        if log_weights is None:
            log_weights = tf.zeros([batch, num_interests], tf.float32)
        log_weights = tf.cast(tf.convert_to_tensor(log_weights), tf.float32)
        if log_weights.shape.rank != 2 or log_weights.shape[1] != num_interests:
            raise ValueError(f"log_weights must be [B, {num_interests}], got shape {log_weights.shape}")
        return tf.concat([tf.reshape(queries, [batch, num_interests * width]), log_weights], axis=1)

    def _finiteness_check(self, packed: tf.Tensor) -> tf.Operation:
        """The interest vectors must be finite; a log weight may be -inf (an interest of
        probability 0) but not NaN or +inf, and each row needs one interest of some probability
        (a row of -inf weights came back all padding)."""
        split = packed.shape[1] - self.num_interests  # call packs [B, K * d + K]
        vectors, log_weights = packed[:, :split], packed[:, split:]
        vectors_ok = super()._finiteness_check(vectors)
        usable = tf.logical_and(tf.logical_not(tf.math.is_nan(log_weights)), log_weights < np.inf)
        rows_ok = tf.logical_and(tf.reduce_all(usable, axis=1), tf.reduce_any(log_weights > -np.inf, axis=1))
        weights_ok = tf.debugging.Assert(tf.reduce_all(rows_ok), [
            "log_weights must be finite or -inf, with at least one finite weight per row; first row that is not "
            "(from 0):", tf.where(tf.logical_not(rows_ok))[:1, 0]])
        return tf.group(vectors_ok, weights_ok)

    def _top_k(self, packed: tf.Tensor, k: tf.Tensor) -> Tuple[tf.Tensor, tf.Tensor]:
        vectors, log_weights = self._unpacked(packed)
        scores, positions = self.base._top_k(vectors, tf.constant(self.k_max, tf.int32))
        return self._merged(scores, positions, positions >= 0, log_weights, k)

    def _top_k_excluding(self, packed: tf.Tensor, k: tf.Tensor,
                         exclude: tf.Tensor) -> Tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        # Each interest is searched with the row's exclusions, as K separate searches would be.
        vectors, log_weights = self._unpacked(packed)
        scores, positions = self.base._top_k(vectors, self.k_max + tf.shape(exclude)[1])
        excluded = self._excluded(positions, tf.repeat(exclude, self.num_interests, axis=0))
        scores, positions = self._merged(scores, positions, tf.logical_and(positions >= 0, tf.logical_not(excluded)),
                                         log_weights, k)
        return scores, positions, positions >= 0

    def _unpacked(self, packed: tf.Tensor) -> Tuple[tf.Tensor, tf.Tensor]:
        """Packed rows -> (interest vectors [B * K, d], interest log probabilities [B, K])."""
        num_interests = self.num_interests
        width = (packed.shape[1] - num_interests) // num_interests  # static: call packs [B, K * d + K]
        vectors = tf.reshape(packed[:, : num_interests * width], [-1, width])
        return vectors, tf.nn.log_softmax(packed[:, num_interests * width:], axis=1)

    def _merged(self, scores: tf.Tensor, positions: tf.Tensor, valid: tf.Tensor, log_weights: tf.Tensor,
                k: tf.Tensor) -> Tuple[tf.Tensor, tf.Tensor]:
        """Each interest's k_max best valid items, softmax-normalised over exactly those, merged."""
        batch, num_interests = tf.shape(log_weights)[0], self.num_interests
        masked = tf.where(valid, scores / self.temperature, tf.constant(-np.inf, tf.float32))
        head, order = tf.math.top_k(masked, k=tf.minimum(self.k_max, tf.shape(masked)[1]))
        positions = tf.where(tf.math.is_finite(head), tf.gather(positions, order, batch_dims=1), -1)
        # log softmax_k over each interest's list (an empty list contributes nothing).
        normalizer = tf.reduce_logsumexp(head, axis=1, keepdims=True)
        normalizer = tf.where(tf.math.is_finite(normalizer), normalizer, tf.zeros_like(normalizer))
        listed = tf.shape(head)[1]
        log_mass = tf.reshape(head - normalizer, [batch, num_interests, listed]) + log_weights[:, :, tf.newaxis]
        # Explicit widths: with -1, a batch of 0 rows leaves the reshape undetermined.
        log_mass = tf.reshape(log_mass, [batch, num_interests * listed])
        positions = tf.reshape(positions, [batch, num_interests * listed])
        return merge_duplicates(log_mass, positions, k)


def merge_duplicates(log_mass: tf.Tensor, positions: tf.Tensor, k: tf.Tensor) -> Tuple[tf.Tensor, tf.Tensor]:
    """Per row, sums the probability mass of entries with the same position (logsumexp of their
    log masses) and returns the best ``k`` distinct positions.

    Args:
      log_mass: float [B, n] log masses (-inf for empty entries).
      positions: int32 [B, n] candidate positions (-1 for empty entries).
      k: scalar int32; at most n results per row.

    Returns:
      ``(scores [B, m], positions [B, m])`` with m = min(k, n), best first; -1 marks empty slots.
    """
    batch, width = tf.shape(positions)[0], tf.shape(positions)[1]
    positions = tf.where(tf.math.is_finite(log_mass), positions, -tf.ones_like(positions))
    order = tf.argsort(positions, axis=1, stable=True)
    positions = tf.gather(positions, order, batch_dims=1)
    log_mass = tf.gather(log_mass, order, batch_dims=1)
    starts = tf.concat([tf.ones([batch, 1], tf.bool), positions[:, 1:] != positions[:, :-1]], axis=1)
    segments = tf.cumsum(tf.cast(starts, tf.int32), axis=1) - 1 + tf.range(batch)[:, tf.newaxis] * width
    segments = tf.reshape(segments, [-1])
    flat_mass = tf.reshape(log_mass, [-1])
    num_segments = batch * width
    peak = tf.math.unsorted_segment_max(flat_mass, segments, num_segments)
    peak = tf.where(tf.math.is_finite(peak), peak, tf.zeros_like(peak))
    shifted = tf.where(tf.math.is_finite(flat_mass), tf.exp(flat_mass - tf.gather(peak, segments)), 0.0)
    total = tf.math.unsorted_segment_sum(shifted, segments, num_segments)
    merged = tf.where(total > 0, peak + tf.math.log(tf.maximum(total, 1e-30)), -np.inf)
    merged_positions = tf.math.unsorted_segment_max(tf.reshape(positions, [-1]), segments, num_segments)
    merged = tf.reshape(tf.where(merged_positions >= 0, merged, -np.inf), [batch, width])
    merged_positions = tf.reshape(tf.maximum(merged_positions, -1), [batch, width])
    scores, best = tf.math.top_k(merged, k=tf.minimum(k, width))
    best_positions = tf.gather(merged_positions, best, batch_dims=1)
    return scores, tf.where(tf.math.is_finite(scores), best_positions, -tf.ones_like(best_positions))
