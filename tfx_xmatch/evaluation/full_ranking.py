"""Full-ranking next-item evaluation (the SASRec protocol): every item is a candidate.

Protocol, per example (a user history and the held-out next item, the *target*):

- Candidates are all real items 1..num_items. Column 0 of the scores is the padding item and is
  never a candidate.
- With ``mask_history=True`` (the default) every item of the user's FULL history (not only the
  window the model saw) is removed from the candidates, except the target itself, which is always
  ranked. This is the standard protocol: the negatives are the items the user has not seen, and
  a target the user re-consumes is still a fair question.
- ``rank`` is the number of other candidates scored at least as high as the target (0-based):
  with ``tie_policy="pessimistic"`` (the default) ties count against the target, so a collapsed
  model that scores every item alike gets no credit and is never selected as the best epoch;
  with ``"optimistic"`` only strictly higher scores count. Constant scores therefore give rank 0 (optimistic) or rank ``#candidates - 1``
  (pessimistic); reporting both brackets a model that produces many ties.

Per example and cutoff K: HR@K = Recall@K = 1[rank < K]; NDCG@K = 1/log2(rank + 2) if rank < K;
MRR@K = 1/(rank + 1) if rank < K; P@K = HR@K / K (one relevant item). TailRecall@K is HR@K over
the examples whose target lies outside the most popular ``head_fraction`` of the catalogue.
Coverage@K = |union of the top-K lists of all examples| / num_items.

The evaluator can also be fed the top-k lists a served model returned
(``update_from_top_k``; the rank is then the target's position in its list) and two evaluators
over disjoint examples can be merged (``merge``), which is how the Beam ``evaluate`` pipeline
(``tfx_xmatch.pipelines.evaluate``) uses this class as its combiner's accumulator.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Optional, Union

import numpy as np
import tensorflow as tf

from tfx_xmatch.data.dataset import PAD_INDEX, EvalExamples, pad_histories
from tfx_xmatch.data.tfrecord import read_eval_examples

ArrayLike = Union[np.ndarray, tf.Tensor]
SeenLike = Union[np.ndarray, tf.Tensor, tf.RaggedTensor]

TIE_POLICIES = ("optimistic", "pessimistic")


def _is_int(value: Any) -> bool:
    # bool is an int subclass, but ks=(True,) is certainly a bug.
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, tf.Tensor):
        return value.numpy()
    return np.asarray(value)


class FullRankingEvaluator:
    """Accumulates full-ranking retrieval metrics over batches of users.

    Memory stays bounded by one batch of scores ([B, num_items + 1]); the accumulated state is a
    histogram of target ranks below max(ks) (which makes the means exact and independent of how
    the examples are batched) and one coverage bitmap per K.

    Coverage uses each example's top-K after masking, with ties broken by the lower item index
    (``tf.math.top_k``'s order). Candidates scored ``-inf`` are never counted as returned: a
    ``-inf`` score is how a model says "do not retrieve this item".

    Args:
      num_items: Number of real items; scores have ``num_items + 1`` columns.
      ks: Cutoffs, positive ints ``<= num_items`` (duplicates are dropped, order is sorted).
      mask_history: Remove the items of each user's history from the candidates (the target is
        always kept).
      item_popularity: Optional training popularity per item index, shape [num_items + 1]
        (index 0 is ignored). Enables TailRecall@K and ``num_tail_examples``.
      head_fraction: Fraction of the catalogue, taken from the most popular end, that counts as
        the *head*: the ``floor(head_fraction * num_items)`` most popular items (ties in
        popularity go to the lower item index) are head, every other item is tail. Must be in
        [0, 1).
      tie_policy: ``"pessimistic"`` (default: ties count against the target) or
        ``"optimistic"`` (ties count for it).

    Raises:
      ValueError: On a non-positive ``num_items``, empty or out-of-range ``ks``, a wrongly shaped
        or non-finite ``item_popularity``, ``head_fraction`` outside [0, 1), or an unknown
        ``tie_policy``.

    Example:
      >>> evaluator = FullRankingEvaluator(num_items=3, ks=(1, 2))
      >>> scores = np.array([[9.0, 0.1, 0.7, 0.3]])    # column 0 = padding, never ranked
      >>> evaluator.update(scores, targets=[3], seen=[[1, 0]])  # item 1 seen -> masked
      array([1])
      >>> evaluator.result()["HR@1"], evaluator.result()["HR@2"]
      (0.0, 1.0)
    """

    def __init__(
        self,
        num_items: int,
        ks: Iterable[int] = (10, 20, 50),
        mask_history: bool = True,
        item_popularity: Optional[ArrayLike] = None,
        head_fraction: float = 0.2,
        tie_policy: str = "pessimistic",
    ) -> None:
        if not _is_int(num_items) or num_items <= 0:
            raise ValueError(f"num_items must be a positive int, got {num_items!r}")
        self.num_items = int(num_items)

        if isinstance(ks, (str, bytes)) or not isinstance(ks, Iterable):
            raise ValueError(f"ks must be an iterable of ints, e.g. (10, 20), got {ks!r}")
        ks_list = list(ks)
        if not ks_list:
            raise ValueError(f"ks must contain at least one cutoff, got {ks!r}")
        for k in ks_list:
            if not _is_int(k) or not 1 <= k <= self.num_items:
                raise ValueError(
                    f"every k must be an int in [1, num_items={self.num_items}], got {k!r} "
                    f"in ks={ks!r}"
                )
        self.ks: tuple[int, ...] = tuple(sorted({int(k) for k in ks_list}))
        self.max_k = self.ks[-1]

        self.mask_history = bool(mask_history)

        if tie_policy not in TIE_POLICIES:
            raise ValueError(f"tie_policy must be one of {TIE_POLICIES}, got {tie_policy!r}")
        self.tie_policy = tie_policy

        if isinstance(head_fraction, bool) or not isinstance(head_fraction, (int, float)) or not (
            0.0 <= float(head_fraction) < 1.0
        ):
            raise ValueError(f"head_fraction must be a number in [0, 1), got {head_fraction!r}")
        self.head_fraction = float(head_fraction)

        self._is_tail: Optional[np.ndarray] = None
        if item_popularity is not None:
            self._is_tail = self._tail_items(_to_numpy(item_popularity))

        self.reset()

    def _tail_items(self, popularity: np.ndarray) -> np.ndarray:
        expected = (self.num_items + 1,)
        if popularity.shape != expected:
            raise ValueError(
                f"item_popularity must have shape {expected} (num_items + 1, index 0 = padding), "
                f"got {popularity.shape}"
            )
        if not np.issubdtype(popularity.dtype, np.number) or np.issubdtype(
            popularity.dtype, np.complexfloating
        ):
            raise ValueError(f"item_popularity must be real numbers, got dtype {popularity.dtype}")
        if not np.all(np.isfinite(popularity[1:])):
            bad = int(np.flatnonzero(~np.isfinite(popularity[1:]))[0]) + 1
            raise ValueError(
                f"item_popularity must be finite, got {popularity[bad].item()!r} for item {bad}"
            )
        if np.any(popularity[1:] < 0):
            bad = int(np.flatnonzero(popularity[1:] < 0)[0]) + 1
            raise ValueError(
                f"item_popularity must be counts >= 0, got {popularity[bad].item()!r} for item {bad}"
            )
        items = np.arange(1, self.num_items + 1)
        # lexsort sorts by the last key first: most popular first, lower index wins ties.
        by_popularity = items[np.lexsort((items, -popularity[1:].astype(np.float64)))]
        # The epsilon keeps 0.3 * 10 = 3.0000000000000004 from flooring like 2.9999999999999996.
        num_head = int(math.floor(self.head_fraction * self.num_items + 1e-9))
        is_tail = np.ones(self.num_items + 1, dtype=bool)
        is_tail[PAD_INDEX] = False
        is_tail[by_popularity[:num_head]] = False
        return is_tail

    @property
    def is_tail(self) -> Optional[np.ndarray]:
        """Which item indices are tail items: bool [num_items + 1] (a copy), None without
        ``item_popularity``. ``is_tail[targets]`` picks the examples TailRecall@K averages over."""
        return None if self._is_tail is None else self._is_tail.copy()

    def reset(self) -> None:
        """Forgets every example seen so far."""
        # rank_counts[r] = #examples with rank r for r < max_k; the last bin holds rank >= max_k.
        self._rank_counts = np.zeros(self.max_k + 1, dtype=np.int64)
        self._tail_rank_counts = np.zeros(self.max_k + 1, dtype=np.int64)
        self._covered = {k: np.zeros(self.num_items + 1, dtype=bool) for k in self.ks}

    @property
    def num_examples(self) -> int:
        """Examples accumulated since construction or the last ``reset()``."""
        return int(self._rank_counts.sum())

    def update(
        self, scores: ArrayLike, targets: ArrayLike, seen: Optional[SeenLike] = None
    ) -> np.ndarray:
        """Ranks one batch of examples and adds them to the running metrics.

        Args:
          scores: float [B, num_items + 1] (tf.Tensor or NumPy), higher = better. Column 0 (the
            padding item) is ignored. NaN is rejected among the candidates; ``-inf`` is allowed.
          targets: int [B], each in 1..num_items.
          seen: Items to mask per example (used when ``mask_history``): an int [B, S] array or
            tensor padded with 0, or a tf.RaggedTensor [B, None]. Repeats are fine. May be None
            only when ``mask_history=False``; it is ignored then.

        Returns:
          int64 [B] 0-based rank of each target under the evaluator's tie policy.

        Raises:
          ValueError: On wrongly shaped inputs, non-integer or out-of-range targets or seen
            items, NaN candidate scores, or a missing ``seen`` while ``mask_history`` is on.

        Example:
          >>> evaluator = FullRankingEvaluator(num_items=4, ks=(2,), mask_history=False)
          >>> evaluator.update(np.array([[0.0, 4.0, 3.0, 2.0, 1.0]]), targets=np.array([3]))
          array([2])
        """
        num_columns = self.num_items + 1
        if not isinstance(scores, tf.Tensor):
            # Through NumPy, a list of Python floats stays float64: tf.convert_to_tensor alone
            # would round it to float32 and create ties that count against the target.
            scores = np.asarray(scores)
        scores = tf.convert_to_tensor(scores)
        if scores.shape.rank != 2 or scores.shape[1] != num_columns:
            raise ValueError(
                f"scores must have shape [batch, num_items + 1 = {num_columns}], "
                f"got {scores.shape.as_list() if scores.shape.rank is not None else scores.shape}"
            )
        if scores.dtype.is_integer:
            # float64 holds every integer score up to 2**53 exactly, so no new ties appear.
            scores = tf.cast(scores, tf.float64)
        elif scores.dtype in (tf.float16, tf.bfloat16):
            scores = tf.cast(scores, tf.float32)
        elif not scores.dtype.is_floating:
            raise ValueError(f"scores must be real numbers, got dtype {scores.dtype.name}")
        batch_size = int(scores.shape[0])

        targets_np = self._checked_targets(targets, batch_size, "scores")
        if batch_size == 0:
            return np.zeros(0, dtype=np.int64)
        targets_t = tf.constant(targets_np.astype(np.int64))

        # [B, N+1] bool, True where the item may be ranked against the target.
        target_hot = tf.one_hot(targets_t, num_columns, on_value=True, off_value=False)
        excluded = tf.one_hot(
            tf.fill([batch_size], tf.constant(PAD_INDEX, tf.int64)), num_columns,
            on_value=True, off_value=False,
        )
        if self.mask_history:
            if seen is None:
                raise ValueError(
                    "seen is required when mask_history=True (pass the users' full histories, "
                    "or construct the evaluator with mask_history=False)"
                )
            excluded = tf.logical_or(excluded, self._seen_mask(seen, batch_size))
        # The target is always ranked, even when it is in the history.
        candidate = tf.logical_or(tf.logical_not(excluded), target_hot)

        nan_candidate = tf.logical_and(tf.math.is_nan(scores), candidate)
        if bool(tf.reduce_any(nan_candidate)):
            row, column = tf.where(nan_candidate)[0].numpy().tolist()
            raise ValueError(f"scores contain NaN (row {row}, item {column}); cannot rank it")

        target_scores = tf.gather(scores, targets_t[:, None], batch_dims=1)  # [B, 1]
        if self.tie_policy == "optimistic":
            # A -inf target was not retrieved at all: it ranks behind every candidate, not level
            # with the other unretrieved items (which would make it a hit when few were returned).
            beats_target = tf.logical_or(scores > target_scores,
                                         tf.logical_and(tf.math.is_inf(target_scores), target_scores < 0))
            beats_target = tf.logical_and(beats_target, tf.logical_not(target_hot))
        else:
            # ">=" also matches the target itself, which must not count against itself.
            beats_target = tf.logical_and(scores >= target_scores, tf.logical_not(target_hot))
        ranks = tf.reduce_sum(
            tf.cast(tf.logical_and(beats_target, candidate), tf.int64), axis=1
        ).numpy()

        self._add_ranks(ranks, targets_np)

        masked = tf.where(candidate, scores, tf.constant(-np.inf, dtype=scores.dtype))
        top_values, top_items = tf.math.top_k(masked, k=self.max_k, sorted=True)
        # Rows with fewer than max_k candidates pad their top-k with masked (-inf) items.
        returned = tf.logical_and(
            tf.gather(candidate, top_items, batch_dims=1), top_values > -np.inf
        ).numpy()
        self._add_coverage(top_items.numpy(), returned)
        return ranks.astype(np.int64)

    def update_from_top_k(self, top_items: ArrayLike, targets: ArrayLike) -> np.ndarray:
        """Adds one batch of examples from the top-k lists a retrieval model returned.

        This is the counterpart of ``update`` for a model that cannot give a score for every item
        (a served SavedModel's ``top_k`` signature): each row is taken as the model's final answer,
        whatever masking it applied. The rank of a target is its position among the row's
        returned items (0-based; empty slots and repeats of an earlier item take no position), or
        "at least max_k" when it is not among the first ``max(ks)`` of them, so ``tie_policy``
        plays no part (the list's order already broke ties), and ``mask_history`` only records
        what the caller promises the lists went through.

        Args:
          top_items: int [B, W] item indices, best first, W >= max(ks). 0 (padding) marks an
            empty slot (fewer results than asked, or a result the caller discarded, e.g. one
            scored ``-inf``); it never counts as returned.
          targets: int [B], each in 1..num_items.

        Returns:
          int64 [B] 0-based rank of each target, ``max(ks)`` for a target not in its first
          ``max(ks)`` entries. That last value means "at least max(ks)", so these ranks answer
          metrics at a cutoff up to max(ks) only: ``per_example_gain(ranks, "HR@K")`` with a
          larger K would count those targets as hits.

        Raises:
          ValueError: On wrongly shaped lists (fewer than max(ks) columns), non-integer or
            out-of-range items or targets.

        Example:
          >>> evaluator = FullRankingEvaluator(num_items=5, ks=(1, 2))
          >>> evaluator.update_from_top_k(np.array([[4, 2], [3, 0]]), targets=np.array([2, 5]))
          array([1, 2])
          >>> evaluator.result()["HR@2"], evaluator.result()["Coverage@2"]
          (0.5, 0.6)
        """
        items = _to_numpy(top_items)
        if items.ndim != 2 or items.shape[1] < self.max_k:
            raise ValueError(
                f"top_items must have shape [batch, width >= max(ks) = {self.max_k}], "
                f"got {items.shape}"
            )
        batch_size = items.shape[0]
        targets_np = self._checked_targets(targets, batch_size, "top_items")
        if batch_size == 0:
            return np.zeros(0, dtype=np.int64)
        if items.size and not np.issubdtype(items.dtype, np.integer):
            raise ValueError(f"top_items must be integer item indices, got dtype {items.dtype}")
        bad = np.argwhere((items < 0) | (items > self.num_items))
        if len(bad):
            row, column = bad[0].tolist()
            raise ValueError(
                f"top_items must be item indices in [0, {self.num_items}] (0 = empty slot), got "
                f"{items[row, column].item()!r} at row {row}, column {column}"
            )
        items = self._returned_first(items.astype(np.int64))[:, : self.max_k]
        hit = items == targets_np[:, None]
        # argmax finds the first hit; rows without one get max_k, the "rank >= max_k" bin.
        ranks = np.where(hit.any(axis=1), hit.argmax(axis=1), self.max_k).astype(np.int64)
        self._add_ranks(ranks, targets_np)
        self._add_coverage(items, items != PAD_INDEX)
        return ranks

    @staticmethod
    def _returned_first(items: np.ndarray) -> np.ndarray:
        """Each row's returned items (not 0, not a repeat of an earlier entry) moved to the
        front in their order, the rest of the row 0: [B, W] -> [B, W]."""
        earlier = np.tril(np.ones((items.shape[1],) * 2, bool), -1)  # [j, i]: i comes before j
        repeated = ((items[:, :, None] == items[:, None, :]) & earlier[np.newaxis]).any(axis=2)
        returned = (items != PAD_INDEX) & ~repeated
        order = np.argsort(~returned, axis=1, kind="stable")
        return np.where(np.take_along_axis(returned, order, axis=1), np.take_along_axis(items, order, axis=1),
                        PAD_INDEX)

    def merge(self, other: "FullRankingEvaluator") -> "FullRankingEvaluator":
        """Adds the examples accumulated by ``other`` (over different examples) to this one.

        The result equals one evaluator fed both sets of examples: rank histograms add and
        coverage bitmaps are OR-ed. ``other`` is left unchanged.

        Args:
          other: An evaluator with the same ``num_items``, ``ks``, ``mask_history``,
            ``tie_policy`` and tail items (same popularity and ``head_fraction``, or neither
            has popularity).

        Returns:
          ``self``, so merges chain.

        Raises:
          TypeError: If ``other`` is not a FullRankingEvaluator.
          ValueError: If the two were configured differently (the setting is named).

        Example:
          >>> a, b = FullRankingEvaluator(3, ks=(1,)), FullRankingEvaluator(3, ks=(1,))
          >>> _ = a.update_from_top_k(np.array([[1]]), np.array([1]))
          >>> _ = b.update_from_top_k(np.array([[2]]), np.array([3]))
          >>> a.merge(b).result()["HR@1"], a.result()["Coverage@1"]
          (0.5, 0.6666666666666666)
        """
        if not isinstance(other, FullRankingEvaluator):
            raise TypeError(f"can only merge another FullRankingEvaluator, got {type(other).__name__}")
        for setting in ("num_items", "ks", "mask_history", "tie_policy"):
            mine, theirs = getattr(self, setting), getattr(other, setting)
            if mine != theirs:
                raise ValueError(f"cannot merge evaluators with different {setting}: {mine!r} vs {theirs!r}")
        if (self._is_tail is None) != (other._is_tail is None) or (
            self._is_tail is not None and not np.array_equal(self._is_tail, other._is_tail)
        ):
            raise ValueError(
                "cannot merge evaluators with different tail items (item_popularity or "
                "head_fraction differ, or only one has item_popularity)"
            )
        self._rank_counts += other._rank_counts
        self._tail_rank_counts += other._tail_rank_counts
        for k in self.ks:
            self._covered[k] |= other._covered[k]
        return self

    def _checked_targets(self, targets: ArrayLike, batch_size: int, rows_of: str) -> np.ndarray:
        """``targets`` as NumPy after checking shape [batch_size], integer dtype and range."""
        targets_np = _to_numpy(targets)
        if targets_np.shape != (batch_size,):
            raise ValueError(
                f"targets must have shape [{batch_size}] (one per row of {rows_of}), "
                f"got {targets_np.shape}"
            )
        if batch_size and not np.issubdtype(targets_np.dtype, np.integer):
            raise ValueError(f"targets must be integer item indices, got dtype {targets_np.dtype}")
        out_of_range = np.flatnonzero((targets_np < 1) | (targets_np > self.num_items))
        if len(out_of_range):
            row = int(out_of_range[0])
            raise ValueError(
                f"targets must be item indices in [1, {self.num_items}], got {targets_np[row].item()!r} "
                f"at row {row}"
            )
        return targets_np

    def _add_ranks(self, ranks: np.ndarray, targets: np.ndarray) -> None:
        """Adds 0-based ranks to the histograms (ranks >= max_k share the last bin)."""
        self._rank_counts += np.bincount(np.minimum(ranks, self.max_k), minlength=self.max_k + 1)
        if self._is_tail is not None:
            tail_ranks = ranks[self._is_tail[targets]]
            self._tail_rank_counts += np.bincount(
                np.minimum(tail_ranks, self.max_k), minlength=self.max_k + 1
            )

    def _add_coverage(self, top_items: np.ndarray, returned: np.ndarray) -> None:
        """Marks the returned items of each row's first K entries as covered, for every K."""
        for k in self.ks:
            self._covered[k][top_items[:, :k][returned[:, :k]]] = True

    def _seen_mask(self, seen: SeenLike, batch_size: int) -> tf.Tensor:
        """[B, N+1] bool, True at every item index listed in ``seen`` (padding lands in col 0)."""
        if isinstance(seen, tf.RaggedTensor):
            if seen.ragged_rank != 1 or seen.shape.rank != 2:
                raise ValueError(f"seen as a RaggedTensor must be [batch, None], got {seen.shape}")
            if int(seen.nrows()) != batch_size:
                raise ValueError(
                    f"seen must have one row per example ({batch_size}), got {int(seen.nrows())}"
                )
            items = seen.flat_values.numpy()
            rows = seen.value_rowids().numpy()
        else:
            seen_np = _to_numpy(seen)
            if seen_np.ndim != 2 or seen_np.shape[0] != batch_size:
                raise ValueError(
                    f"seen must be a padded [batch = {batch_size}, length] array or a "
                    f"tf.RaggedTensor, got shape {seen_np.shape}"
                )
            items = seen_np.reshape(-1)
            rows = np.repeat(np.arange(batch_size), seen_np.shape[1])
        if items.size and not np.issubdtype(items.dtype, np.integer):
            raise ValueError(f"seen must hold integer item indices, got dtype {items.dtype}")
        bad = np.flatnonzero((items < 0) | (items > self.num_items))
        if len(bad):
            raise ValueError(
                f"seen items must be in [0, {self.num_items}] (0 = padding), got "
                f"{items[bad[0]].item()!r} in row {int(rows[bad[0]])}"
            )
        indices = tf.constant(np.stack([rows, items], axis=1).astype(np.int64).reshape(-1, 2))
        counts = tf.scatter_nd(
            indices, tf.ones([len(items)], tf.int32), [batch_size, self.num_items + 1]
        )
        return counts > 0

    def result(self) -> dict[str, float]:
        """Mean metrics over every example accumulated so far.

        Returns:
          ``{"HR@K", "Recall@K", "NDCG@K", "MRR@K", "P@K", ["TailRecall@K"], "Coverage@K"}``
          for each K, plus ``"num_examples"`` and, with ``item_popularity``,
          ``"num_tail_examples"``. TailRecall@K is NaN when no target was a tail item.

        Raises:
          ValueError: If no example has been accumulated.

        Example:
          >>> evaluator = FullRankingEvaluator(num_items=2, ks=(1,), mask_history=False)
          >>> _ = evaluator.update(np.array([[0.0, 1.0, 2.0]]), targets=np.array([1]))
          >>> evaluator.result()["MRR@1"]
          0.0
        """
        total = self.num_examples
        if total == 0:
            raise ValueError("no examples accumulated (call update() first, or after reset())")
        ranks = np.arange(self.max_k)
        ndcg_gain = 1.0 / np.log2(ranks + 2.0)
        mrr_gain = 1.0 / (ranks + 1.0)
        tail_total = int(self._tail_rank_counts.sum())

        metrics: dict[str, float] = {}
        for k in self.ks:
            counts = self._rank_counts[:k]
            hits = float(counts.sum()) / total
            metrics[f"HR@{k}"] = hits
            metrics[f"Recall@{k}"] = hits
            metrics[f"NDCG@{k}"] = float(np.dot(counts, ndcg_gain[:k])) / total
            metrics[f"MRR@{k}"] = float(np.dot(counts, mrr_gain[:k])) / total
            metrics[f"P@{k}"] = hits / k
            if self._is_tail is not None:
                metrics[f"TailRecall@{k}"] = (
                    float(self._tail_rank_counts[:k].sum()) / tail_total if tail_total else math.nan
                )
            metrics[f"Coverage@{k}"] = float(self._covered[k].sum()) / self.num_items
        metrics["num_examples"] = float(total)
        if self._is_tail is not None:
            metrics["num_tail_examples"] = float(tail_total)
        return metrics


def is_tail_target(targets: ArrayLike, item_popularity: ArrayLike, head_fraction: float = 0.2) -> np.ndarray:
    """bool [N]: whose target is a tail item, the examples TailRecall@K averages over.

    Args:
      targets: int [N] target item indices.
      item_popularity: Training popularity per item index, [num_items + 1] (index 0 ignored).
      head_fraction: As in ``FullRankingEvaluator``.

    Raises:
      ValueError: As ``FullRankingEvaluator`` on a malformed popularity or head fraction, or on
        targets that are not item indices in [1, num_items] (quoting the first bad one).
    """
    popularity = _to_numpy(item_popularity)
    evaluator = FullRankingEvaluator(max(len(popularity) - 1, 1), ks=(1,), item_popularity=popularity,
                                     head_fraction=head_fraction)
    targets = _to_numpy(targets)
    if targets.ndim != 1:
        raise ValueError(f"targets must be 1-D (one target item per example), got shape {targets.shape}")
    return evaluator.is_tail[evaluator._checked_targets(targets, targets.size, "targets")]


def evaluate_full_ranking(
    score_fn: Callable[[np.ndarray, np.ndarray], ArrayLike],
    examples: EvalExamples,
    *,
    max_length: int,
    batch_size: int = 256,
    return_ranks: bool = False,
    **evaluator_kwargs: Any,
) -> Union[dict[str, float], tuple[dict[str, float], np.ndarray]]:
    """Scores every example against the whole catalogue and returns the mean metrics.

    The model sees each history truncated to its most recent ``max_length`` items, but masking
    (``mask_history=True``) uses the FULL history, so an item the user saw before the window is
    still not counted as a hit-stealing negative.

    Args:
      score_fn: ``score_fn(histories, user_rows) -> scores`` with histories int32
        [B, max_length] left-padded by ``pad_histories``, user_rows int64 [B], and scores
        [B, num_items + 1] (NumPy or tf.Tensor; column 0 ignored).
      examples: The held-out examples.
      max_length: Width of the histories given to ``score_fn``.
      batch_size: Examples per ``score_fn`` call; bounds memory at [batch_size, num_items + 1].
      return_ranks: Also return each example's 0-based target rank (int64 [num_examples], in the
        order of ``examples``), e.g. for a paired significance test of two models
        (``tfx_xmatch.evaluation.paired_difference``). Default False.
      **evaluator_kwargs: Passed to ``FullRankingEvaluator`` (``ks``, ``mask_history``,
        ``item_popularity``, ``head_fraction``, ``tie_policy``, and optionally ``num_items``,
        which is otherwise read from the width of the first batch of scores).

    Returns:
      The ``FullRankingEvaluator.result()`` dictionary; with ``return_ranks``, the pair
      ``(metrics, ranks)``.

    Raises:
      ValueError: On empty or inconsistent examples, a non-positive ``batch_size`` or
        ``max_length``, or scores whose shape is not [B, num_items + 1].

    Example:
      >>> examples = EvalExamples(user_rows=np.array([0]), histories=[np.array([1, 2])],
      ...                         targets=np.array([3]))
      >>> fixed = np.array([[0.0, 5.0, 4.0, 3.0, 2.0]])
      >>> evaluate_full_ranking(lambda h, u: fixed, examples, max_length=5, ks=(1,))["HR@1"]
      1.0
    """
    num_examples = len(examples)
    if num_examples == 0:
        raise ValueError("examples is empty: nothing to evaluate")
    if len(examples.histories) != num_examples or len(examples.user_rows) != num_examples:
        raise ValueError(
            f"examples must have as many histories and user_rows as targets ({num_examples}), "
            f"got {len(examples.histories)} histories and {len(examples.user_rows)} user_rows"
        )
    if not _is_int(batch_size) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not _is_int(max_length) or max_length <= 0:
        raise ValueError(f"max_length must be a positive int, got {max_length!r}")

    num_items: Optional[int] = evaluator_kwargs.pop("num_items", None)
    evaluator: Optional[FullRankingEvaluator] = None
    targets = np.asarray(examples.targets)
    user_rows = np.asarray(examples.user_rows, dtype=np.int64)
    ranks = []
    for start in range(0, num_examples, batch_size):
        stop = min(start + batch_size, num_examples)
        batch_histories = [np.asarray(h, dtype=np.int32) for h in examples.histories[start:stop]]
        scores = score_fn(pad_histories(batch_histories, max_length), user_rows[start:stop])
        shape = tuple(scores.shape) if hasattr(scores, "shape") else np.shape(scores)
        if num_items is None:
            if len(shape) != 2 or shape[1] is None or shape[1] < 2:
                raise ValueError(
                    f"score_fn must return scores of shape [batch, num_items + 1]: expected "
                    f"[{stop - start}, num_items + 1], got {list(shape)}"
                )
            num_items = int(shape[1]) - 1
        expected = (stop - start, num_items + 1)
        if tuple(shape) != expected:
            raise ValueError(
                f"score_fn must return scores of shape [batch, num_items + 1]: expected "
                f"{list(expected)}, got {list(shape)} for examples {start}:{stop}"
            )
        if evaluator is None:
            evaluator = FullRankingEvaluator(num_items, **evaluator_kwargs)
        # Masking needs the whole history, not the model's window: pad to the longest in batch.
        longest = max((len(h) for h in batch_histories), default=0)
        seen = pad_histories(batch_histories, max(longest, 1))
        ranks.append(evaluator.update(scores, targets[start:stop], seen))
    assert evaluator is not None  # num_examples > 0 guarantees one batch
    if return_ranks:
        return evaluator.result(), np.concatenate(ranks)
    return evaluator.result()
