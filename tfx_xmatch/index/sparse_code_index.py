"""SparseCodeIndex: a budgeted inverted index over discrete query codes (SparCode-style serving).

A SparCode-style model represents a query by a few of C discrete codes and scores item i as
``sum_k T[code_k, i]``, T being a [C, N] table of non-negative (ReLU) code-item scores. This
index stores T sparsely: per code, a posting list of (item, score) pairs holding only positive
scores, best first, capped by a cache budget. A query gathers the posting lists of its codes,
sums the scores per item and takes the top k, so its cost depends on the lengths of the gathered
lists, never on the catalogue size. Every query-time op (Where, RaggedGather, Unique,
UnsortedSegmentSum, RaggedTensorToTensor, TopKV2, ...) is registered in stock TensorFlow.

Fit to ``RetrievalIndex``: the candidate "embedding" of item i is its column of code scores
(``candidates = T^T``, float [N, C]) and a query is a non-negative code-weight vector (float
[B, C], e.g. a sum of one-hot codes), so the exact score is ``queries @ candidates^T`` and a
``BruteForceIndex`` on the same inputs is the exact oracle.

Layout (code-major CSR): code c owns entries ``posting_splits[c]:posting_splits[c + 1]`` of
``posting_items`` (row positions into the indexed candidates) and ``posting_scores``, sorted by
score descending, ties by row. Entries are ranked by (score desc, row asc, code asc) everywhere,
so the kept set does not depend on how the candidates were chunked or batched.
"""

from __future__ import annotations

import functools
import math
import numbers
from fractions import Fraction
from typing import Callable, Optional, Tuple

import numpy as np
import tensorflow as tf

from tfx_xmatch.arguments import is_integer
from tfx_xmatch.index.retrieval_index import RetrievalIndex, TensorLike

# Query row and item share one int64 key (row * 2^32 + item); items are int32 positions.
_KEY_BASE = 2**32


@tf.keras.utils.register_keras_serializable(package="tfx_xmatch")
class SparseCodeIndex(RetrievalIndex):
    """Top-k over a sparse inverted index of code-item scores, under a cache budget.

    Candidate scores are expected to be ReLU outputs (>= 0): entries <= 0 (and NaN) are never
    stored, and an item found in none of a query's posting lists is never returned (its score
    would be 0). Query weights are expected to be >= 0; only their non-zero entries are read.

    Budget: ``max_items_per_code`` L keeps each code's L best positive entries;
    ``cache_fraction`` f keeps the ``ceil(f * C * N)`` globally best positive entries of the
    table; with both, the global cap picks the best entries among each code's L best. With
    neither, every positive entry is kept and the index is exact. Results are always exact
    for the stored (pruned) table.

    Building is NumPy, in chunks of ``build_batch_size`` rows, keeping only a running per-code
    top-L / global top-M (compacted whenever the buffer exceeds twice the budget), so with a
    budget ``index_from_dataset`` indexes catalogues far larger than memory would allow as a
    dense [N, C] table.

    Args:
      k_max: Largest k a call may ask for (int, default 100).
      max_items_per_code: Posting-list length cap L (int >= 1), or None for no cap.
      cache_fraction: Fraction f in (0, 1] of all C * N scores to keep, or None for no cap.
      build_batch_size: Candidate rows processed per build step (int >= 1, default 4096).
      **kwargs: ``k``, ``padding_identifier``, ``exclude_padding`` and Keras layer arguments,
        see ``RetrievalIndex``.

    Returns:
      Called on float [B, C] query code weights: ``(scores, identifiers)``, float32 [B, k]
      weighted sums of the stored scores of each item over the query's codes, best first, and
      their identifiers. Items in none of the query's posting lists are never returned: their
      slots hold ``-inf`` and ``padding_identifier``.

    Raises:
      ValueError: If an argument is out of range (the message quotes it).

    Example:
      >>> table = tf.nn.relu(tf.random.normal([1000, 64]))  # [N items, C codes]
      >>> index = SparseCodeIndex(k_max=10, max_items_per_code=50).index(table)
      >>> codes = tf.reduce_sum(tf.one_hot([[3, 17, 17], [5, 8, 40]], 64), axis=1)  # [2, 64]
      >>> scores, ids = index(codes, k=10)  # [2, 10] each
    """

    def __init__(
        self,
        k_max: int = 100,
        max_items_per_code: Optional[int] = None,
        cache_fraction: Optional[float] = None,
        build_batch_size: int = 4096,
        **kwargs,
    ):
        super().__init__(k_max=k_max, **kwargs)
        if max_items_per_code is not None and (
            not is_integer(max_items_per_code) or max_items_per_code < 1
        ):
            raise ValueError(
                f"max_items_per_code must be an integer >= 1 or None, got {max_items_per_code!r}"
            )
        if cache_fraction is not None and (
            isinstance(cache_fraction, bool)
            or not isinstance(cache_fraction, numbers.Real)
            or not 0 < cache_fraction <= 1
        ):
            raise ValueError(f"cache_fraction must be in (0, 1] or None, got {cache_fraction!r}")
        if not is_integer(build_batch_size) or build_batch_size < 1:
            raise ValueError(f"build_batch_size must be an integer >= 1, got {build_batch_size!r}")
        self.max_items_per_code = None if max_items_per_code is None else int(max_items_per_code)
        self.cache_fraction = None if cache_fraction is None else float(cache_fraction)
        self.build_batch_size = int(build_batch_size)
        self.posting_items = self.posting_scores = self.posting_splits = None
        # Build statistics (None before index()): positive table entries seen, entries kept,
        # and the most entries buffered at once while building.
        self.num_positive_entries: Optional[int] = None
        self.num_postings: Optional[int] = None
        self.peak_buffered_entries: Optional[int] = None

    # ------------------------------------------------------------------ building
    def _index(self, candidates: tf.Tensor) -> Callable[[], None]:
        table = candidates.numpy()
        builder = self._builder(*table.shape)
        for start in range(0, len(table), self.build_batch_size):
            builder.add(table[start : start + self.build_batch_size])
        return functools.partial(self._store, builder.finish(), builder)

    def index_from_dataset(
        self, dataset: tf.data.Dataset, num_candidates: Optional[int] = None
    ) -> "SparseCodeIndex":
        """Builds the index by streaming a dataset; ends as ``index()`` on the concatenation.

        Only the running top entries (or, without a budget, the positive entries) are kept
        while iterating; identifiers, if given, are concatenated ([N], small).

        Args:
          dataset: Batches of float [n, C] candidate rows, or of ``(identifiers [n],
            rows [n, C])`` tuples.
          num_candidates: Total number of rows N, needed up front by ``cache_fraction``.
            Default: counted by a first pass over the dataset when ``cache_fraction`` is set.

        Returns:
          self.

        Raises:
          ValueError: If elements are neither tensors nor 2-tuples, shapes are wrong or vary,
            the dataset is empty, or it holds other than ``num_candidates`` rows.
          TypeError: If dtypes are wrong (see ``index()``).
          RuntimeError: If called inside ``tf.function``.
        """
        self._require_eager("index_from_dataset()")
        is_pair = self._dataset_is_pair(dataset)
        if num_candidates is not None and (
            not is_integer(num_candidates) or num_candidates < 1
        ):
            raise ValueError(
                f"num_candidates must be an integer >= 1 or None, got {num_candidates!r}"
            )
        if self.cache_fraction is not None and num_candidates is None:
            num_candidates = int(
                dataset.reduce(
                    tf.constant(0, tf.int64),
                    lambda total, element: total
                    + tf.shape(tf.nest.flatten(element)[-1], out_type=tf.int64)[0],
                )
            )
        builder, dimension, id_batches, seen = None, None, [], 0
        for element in dataset:
            ids, rows = element if is_pair else (None, element)
            if rows.shape.rank == 2 and rows.shape[0] == 0:
                continue
            rows = self._checked_candidates(rows)
            if builder is None:
                dimension = int(rows.shape[1])
                builder = self._builder(num_candidates or 0, dimension)
            elif int(rows.shape[1]) != dimension:
                raise ValueError(
                    f"dataset rows have {rows.shape[1]} columns, earlier ones {dimension}"
                )
            if is_pair:
                id_batches.append(self._checked_identifiers(ids, int(rows.shape[0])))
            rows = rows.numpy()
            for start in range(0, len(rows), self.build_batch_size):
                builder.add(rows[start : start + self.build_batch_size])
            seen += len(rows)
        if builder is None:
            raise ValueError("the candidate dataset is empty")
        if num_candidates is not None and seen != num_candidates:
            raise ValueError(
                f"num_candidates is {num_candidates} but the dataset holds {seen} rows"
            )
        identifiers = self._checked_identifiers(tf.concat(id_batches, 0) if is_pair else None, seen)
        postings = builder.finish()
        with self._writing():
            self._store(postings, builder)
            self._set_catalogue(identifiers, seen, dimension)
        return self

    def _builder(self, num_candidates: int, num_codes: int) -> "_PostingBuilder":
        total = cache_budget(self.cache_fraction, num_codes, num_candidates)
        return _PostingBuilder(num_codes, self.max_items_per_code, total)

    def load_postings(
        self,
        items: TensorLike,
        scores: TensorLike,
        splits: TensorLike,
        identifiers: Optional[TensorLike] = None,
        *,
        num_candidates: Optional[int] = None,
        num_positive_entries: Optional[int] = None,
    ) -> "SparseCodeIndex":
        """Restores posting lists built elsewhere (e.g. by the Beam ``build_index`` pipeline).

        The index then answers exactly as one whose ``index()`` produced these lists. The
        budget is not re-applied: the lists are stored as given.

        Args:
          items: int [nnz] row positions in [0, N), code-major (see the module docstring).
          scores: float [nnz] scores, > 0, best first within each code.
          splits: int [C + 1] code offsets into ``items``, from 0 to nnz, non-decreasing.
          identifiers: [N] identifiers (see ``index()``); default ``0..N-1``.
          num_candidates: N; default the length of ``identifiers`` (one of the two is needed).
          num_positive_entries: Positive entries of the whole table, for ``is_exact()``;
            default unknown (``is_exact()`` then says whether a budget is configured).

        Returns:
          self.

        Raises:
          ValueError: If shapes, splits or item positions are inconsistent (the message
            quotes them), or neither ``identifiers`` nor ``num_candidates`` is given.
          RuntimeError: If called inside ``tf.function``.
        """
        self._require_eager("load_postings()")
        items, scores = np.asarray(items), np.asarray(scores, np.float32)
        splits = np.asarray(splits)
        if identifiers is None and num_candidates is None:
            raise ValueError("load_postings() needs identifiers or num_candidates")
        if num_candidates is None:
            num_candidates = int(tf.shape(identifiers)[0])
        if items.ndim != 1 or items.dtype.kind not in "iu" or items.shape != scores.shape:
            raise ValueError(f"items and scores must be vectors of one length, items integers; got "
                             f"items {items.dtype}{list(items.shape)}, scores {list(scores.shape)}")
        if (splits.ndim != 1 or len(splits) < 2 or splits[0] != 0 or splits[-1] != len(items)
                or np.any(np.diff(splits) < 0)):
            raise ValueError(f"splits must rise from 0 to {len(items)} (the number of items), "
                             f"got {splits.tolist()[:10]}{'...' if len(splits) > 10 else ''}")
        if len(items) and (items.min() < 0 or items.max() >= num_candidates):
            raise ValueError(f"items must be row positions in [0, {num_candidates}), got values in "
                             f"[{items.min()}, {items.max()}]")
        identifiers = self._checked_identifiers(identifiers, int(num_candidates))
        with self._writing():
            self._assign_states({"posting_items": items.astype(np.int32), "posting_scores": scores,
                                 "posting_splits": splits.astype(np.int64)})
            self.num_positive_entries, self.num_postings = num_positive_entries, len(items)
            self.peak_buffered_entries = None
            self._set_catalogue(identifiers, int(num_candidates), len(splits) - 1)
        return self

    def _store(self, postings: Tuple[np.ndarray, np.ndarray, np.ndarray], builder: "_PostingBuilder") -> None:
        """Stores finished posting lists (items, scores, splits) and the build statistics."""
        items, scores, splits = postings
        self._assign_states({"posting_items": items, "posting_scores": scores, "posting_splits": splits})
        self.num_positive_entries, self.num_postings = builder.positives, len(items)
        self.peak_buffered_entries = builder.peak

    # ------------------------------------------------------------------ querying
    def _top_k(self, queries: tf.Tensor, k: tf.Tensor) -> Tuple[tf.Tensor, tf.Tensor]:
        hits = tf.where(tf.not_equal(queries, 0.0))  # [P, 2] (row, code), row-major
        weights = tf.gather_nd(queries, hits)
        splits = self.posting_splits
        items = tf.RaggedTensor.from_row_splits(self.posting_items, splits, validate=False)
        scores = tf.RaggedTensor.from_row_splits(self.posting_scores, splits, validate=False)
        items, scores = tf.gather(items, hits[:, 1]), tf.gather(scores, hits[:, 1])  # [P, None]
        lengths = items.row_lengths()
        entry_scores = scores.flat_values * tf.repeat(weights, lengths)
        keys = tf.repeat(hits[:, 0], lengths) * _KEY_BASE + tf.cast(items.flat_values, tf.int64)
        # One score per (row, item); keys first appear in row order, as value_rowids need.
        unique_keys, segments = tf.unique(keys)
        summed = tf.math.unsorted_segment_sum(entry_scores, segments, tf.size(unique_keys))
        row_ids, nrows = unique_keys // _KEY_BASE, tf.shape(queries, out_type=tf.int64)[0]
        dense_scores = tf.RaggedTensor.from_value_rowids(
            summed, row_ids, nrows=nrows, validate=False
        ).to_tensor(default_value=-np.inf)
        dense_items = tf.RaggedTensor.from_value_rowids(
            tf.cast(unique_keys % _KEY_BASE, tf.int32), row_ids, nrows=nrows, validate=False
        ).to_tensor(default_value=-1)
        top_scores, top = tf.math.top_k(dense_scores, k=tf.minimum(k, tf.shape(dense_scores)[1]))
        return top_scores, tf.gather(dense_items, top, batch_dims=1)

    # ------------------------------------------------------------------ reporting
    def _saved_attributes(self) -> tuple:
        return (*super()._saved_attributes(), "num_positive_entries", "num_postings", "peak_buffered_entries")

    def is_exact(self) -> bool:
        """True iff no budget cap removed a positive entry.

        Results then equal a brute-force search restricted to positive scores. Before
        ``index()``: True iff no cap is configured.

        Returns:
          Whether every positive table entry is stored.
        """
        if self.num_postings is None or self.num_positive_entries is None:
            return self.max_items_per_code is None and self.cache_fraction is None
        return self.num_postings == self.num_positive_entries

    def posting_list_lengths(self) -> np.ndarray:
        """Entries stored per code.

        Returns:
          int64 [C] posting-list lengths.

        Raises:
          ValueError: If ``index()`` was not called.
        """
        if self.posting_splits is None:
            raise ValueError("SparseCodeIndex.index() must be called before reading its postings")
        return np.diff(self.posting_splits.numpy())

    def memory_bytes(self) -> int:
        """Bytes of the posting lists (items, scores, splits) and the identifiers.

        String identifiers count their UTF-8 bytes (no per-string overhead).

        Returns:
          The size in bytes.

        Raises:
          ValueError: If ``index()`` was not called.
        """
        lengths = self.posting_list_lengths()
        total = 8 * int(lengths.sum()) + 8 * (len(lengths) + 1)
        if self.identifiers.dtype == tf.string:
            return total + int(tf.reduce_sum(tf.strings.length(self.identifiers)))
        return total + 8 * self.num_candidates

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            max_items_per_code=self.max_items_per_code,
            cache_fraction=self.cache_fraction,
            build_batch_size=self.build_batch_size,
        )
        return config


class _PostingBuilder:
    """Running kept entries (code, row, score) of a [N, C] table fed in row chunks (NumPy).

    Entries are ranked by (score desc, row asc, code asc). Rows arrive in increasing order, so
    a new entry can never beat an equal-scored kept one: the admission thresholds (the L-th
    best score of each full code, the M-th best overall) are strict and stay valid between
    compactions, which run when the buffer holds more than twice the budget.
    """

    def __init__(self, num_codes: int, per_code: Optional[int], total: Optional[int]):
        self.num_codes, self.per_code, self.total = num_codes, per_code, total
        caps = [cap for cap in (per_code and per_code * num_codes, total) if cap]
        self.capacity = min(caps) if caps else None
        self.parts = []  # (codes int32, rows int32, scores float32) not yet compacted
        self.size = self.next_row = self.positives = self.peak = 0
        self.threshold = np.zeros(num_codes, np.float32)  # admit only scores above it

    def add(self, block: np.ndarray) -> None:
        scores = block.T  # [C, n]: np.nonzero yields code-major entries
        self.positives += int(np.count_nonzero(scores > 0))
        codes, rows = np.nonzero(scores > self.threshold[:, None])
        self.parts.append(
            (codes.astype(np.int32), (rows + self.next_row).astype(np.int32), scores[codes, rows])
        )
        self.next_row += len(block)
        self.size += len(codes)
        self.peak = max(self.peak, self.size)
        if self.capacity is not None and self.size > 2 * self.capacity:
            self._compact()

    def _compact(self) -> None:
        codes, rows, scores = (np.concatenate(part) for part in zip(*self.parts))
        codes, rows, scores = prune_entries(
            codes, rows, scores, self.num_codes, self.per_code, self.total
        )
        self.threshold[:] = 0
        if self.per_code is not None:  # still sorted by code, then score desc
            counts = np.bincount(codes, minlength=self.num_codes)
            full = counts >= self.per_code
            self.threshold[full] = scores[(np.cumsum(counts) - 1)[full]]
        if self.total is not None and len(scores) >= self.total:
            self.threshold = np.maximum(self.threshold, scores.min())
        self.parts, self.size = [(codes, rows, scores)], len(codes)

    def finish(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Returns (items int32 [nnz], scores float32 [nnz], splits int64 [C + 1]), code-major."""
        if not self.parts:
            self.parts = [(np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.float32))]
        self._compact()
        return entries_to_postings(*self.parts[0], self.num_codes)


def cache_budget(
    cache_fraction: Optional[float], num_codes: int, num_candidates: int
) -> Optional[int]:
    """Entries a ``cache_fraction`` keeps of a [num_candidates, num_codes] table (None: no cap)."""
    if cache_fraction is None:
        return None
    # Fraction of the decimal value (0.1 -> 1/10): ceil(0.1 * 1000) is 100, not 101.
    return math.ceil(Fraction(repr(float(cache_fraction))) * num_codes * num_candidates)


def prune_entries(
    codes: np.ndarray,
    rows: np.ndarray,
    scores: np.ndarray,
    num_codes: int,
    per_code: Optional[int],
    total: Optional[int],
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Applies the budget to (code, row, score) entries; ranking (score desc, row asc, code asc).

    Keeps each code's ``per_code`` best entries, then the ``total`` best of those (either cap
    may be None). Pruning any partition of a table's entries this way and pruning the union of
    the kept entries again gives the same set as pruning the table at once: the budgeted
    merge of the Beam ``build_index`` pipeline relies on it.

    Args:
      codes, rows, scores: Parallel [n] arrays (codes in [0, num_codes)).
      num_codes: C.
      per_code: L, or None.
      total: M, or None.

    Returns:
      The kept (codes, rows, scores); sorted by code, then rank, when ``per_code`` is set.
    """
    if per_code is not None:
        order = np.lexsort((rows, -scores, codes))
        codes, rows, scores = codes[order], rows[order], scores[order]
        counts = np.bincount(codes, minlength=num_codes)
        starts = np.cumsum(counts) - counts
        keep = np.arange(len(codes)) - np.repeat(starts, counts) < per_code
        codes, rows, scores = codes[keep], rows[keep], scores[keep]
    if total is not None and len(scores) > total:
        keep = _best(scores, rows, codes, total)
        codes, rows, scores = codes[keep], rows[keep], scores[keep]
    return codes, rows, scores


def entries_to_postings(
    codes: np.ndarray, rows: np.ndarray, scores: np.ndarray, num_codes: int
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Kept entries as code-major posting lists, each best first (ties by row).

    Returns:
      (items int32 [nnz], scores float32 [nnz], splits int64 [C + 1]).
    """
    order = np.lexsort((rows, -scores, codes))
    splits = np.concatenate([[0], np.cumsum(np.bincount(codes, minlength=num_codes))])
    return rows[order].astype(np.int32), scores[order].astype(np.float32), splits.astype(np.int64)


def _best(scores: np.ndarray, rows: np.ndarray, codes: np.ndarray, count: int) -> np.ndarray:
    """Mask of the ``count`` best entries by (score desc, row asc, code asc)."""
    kth = np.partition(scores, len(scores) - count)[len(scores) - count]
    keep = scores > kth
    ties = np.flatnonzero(scores == kth)
    keep[ties[np.lexsort((codes[ties], rows[ties]))[: count - int(keep.sum())]]] = True
    return keep
