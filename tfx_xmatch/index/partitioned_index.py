"""PartitionedIndex: a k-means partitioned (IVF) index written with stock TensorFlow ops only.

Stock TF Serving has no ScaNN ops, so a ScaNN export needs a custom server build. This index is
the portable approximate alternative: ``index()`` clusters the candidates with k-means (NumPy,
once), and a query scores the partition centroids, probes the ``num_probes`` best partitions and
scores their members exactly. Every query-time op (MatMul, TopKV2, Gather, RaggedRange,
RaggedTensorToTensor, BatchMatMulV2, ...) is registered in stock TensorFlow, CPU and GPU.

Layout: candidates are stored sorted by partition, so partition p owns the contiguous rows
``partition_offsets[p]:partition_offsets[p + 1]`` (a CSR layout), and ``item_order`` maps those
rows back to the positions given to ``index()``. With spilling (``soar_lambda``) a partition's
range holds list entries instead, and ``listed_rows`` maps each entry to its candidate row.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional, Tuple

import numpy as np
import tensorflow as tf

from tfx_xmatch import arguments

from tfx_xmatch.index.partitioning import assign, int8_codes, kmeans, soar_assignment, split_partitions
from tfx_xmatch.index.retrieval_index import RetrievalIndex

SCORING_DTYPES = ("float32", "bfloat16", "int8")


@tf.keras.utils.register_keras_serializable(package="tfx_xmatch")
class PartitionedIndex(RetrievalIndex):
    """Approximate dot-product top-k over k-means partitions; exact inside probed partitions.

    Partitioning. With ``spherical=True`` (default) centroids are unit vectors and each
    candidate joins the partition maximising ``<centroid, candidate>``: the same dot product a
    query uses to choose partitions, so assignment and probing agree (for maximum inner product
    search the direction decides which partition holds a candidate, its norm only how high it
    scores there). With ``spherical=False`` it is Euclidean k-means (centroids are means,
    assignment by squared L2); queries still rank partitions by ``<query, centroid>``, i.e. by
    the mean score of their members.

    k-means runs in NumPy at ``index()`` time on at most ``training_sample_size`` candidates
    (the second level of ``subpartitions`` on all members of each partition, which are few),
    is deterministic for a ``seed``, starts from k-means++ seeds and re-seeds empty clusters with
    the worst-fitting points. Partitions left empty after the final assignment are dropped, and
    ``num_partitions`` is capped by the number of candidates.

    Args:
      num_partitions: Number of k-means partitions P (int >= 1, default 100). A common choice
        is about sqrt(N).
      num_probes: Partitions searched per query (int >= 1, default 10). Recall and cost grow
        with it; ``num_probes >= num_partitions * subpartitions`` searches everything (exact).
      k_max: Largest k a call may ask for (int, default 100).
      kmeans_iterations: Maximum Lloyd iterations (int >= 0, default 20); stops early when
        assignments no longer change.
      seed: Seed of the sampling and k-means++ initialisation (int, default 0).
      spherical: Spherical (dot-product) k-means if True (default), Euclidean if False.
      training_sample_size: k-means trains on a random sample of at most this many candidates
        (int >= 1, default 100_000; None trains on all); every candidate is then assigned.
      scoring_dtype: "float32" (default) scores probed members exactly. The other two score
        them from a compact copy of the candidates first, then rescore the best
        ``num_reordering_candidates`` exactly in float32, as ScaNN reorders:
        "int8" codes every dimension symmetrically to 127 levels of its largest magnitude
        (a quarter of the bytes read per query; the per-dimension scales are folded into the
        query, so the pass is one cast and one mat-mul). Costs a quarter of the candidates'
        memory again. Reading the probed members is what a lookup waits for (a memory-bound
        gather); at 10^6 items int8 halves that gather but adds a cast, for a 6-7% faster
        lookup at the same recall with 150 rescored (results/partitioned_profile.md).
        "bfloat16" keeps a bfloat16 copy (half the bytes; about 3 significant digits) scored
        with a bfloat16 mat-mul; costs half the candidates' memory again.
      num_reordering_candidates: With "int8" or "bfloat16", members rescored exactly per query
        (int >= 1, default 4 * k_max; at least k is always rescored; spilled, the best twice as
        many list entries are rescored, which hold that many distinct members). Ignored with
        "float32".
      subpartitions: Each k-means partition is clustered again into this many sub-partitions
        (int >= 1, default 1: one level), which are what queries probe (two-level k-means).
        Finer partitions need fewer scored members for the same recall; building them this
        way costs a fraction of one flat k-means with P * subpartitions centroids. Probes
        and ``is_exact`` then count sub-partitions.
      parent_probes: With ``subpartitions > 1``, the first-level partitions whose
        sub-partitions compete for the ``num_probes`` probes (int >= 1, default None: all of
        them). Scoring every sub-partition centroid is a [P * subpartitions, d] mat-mul per
        query (0.3 ms of a 1.3 ms lookup with 16,000 x 64 here); with parent probes only
        P + parent_probes * subpartitions centroids are scored, at some cost in recall.
      soar_lambda: Spilling (ScaNN's SOAR, Sun et al. 2023): if set (float >= 0), every
        candidate is also listed in a second partition, chosen to have a residual orthogonal to
        its first one (``partitioning.soar_assignment``; with two levels, among the
        sub-partitions of the 8 parents nearest to it), so the queries its own partition serves
        worst still find it. Twice the entries per probed partition, but far fewer probes for
        the same recall: recall@100 0.957 from 12,500 scanned entries against 0.953 from
        18,400 without spilling at 10^6 items (results/partitioned_profile.md). Lists hold row
        numbers (``listed_rows``), so the float32 table is stored once; an int8 or bfloat16
        copy is stored in list order (twice). Best with int8: the first pass then reads
        contiguous codes (0.80 ms at recall 0.956 there, results/serving_spilled.md), while
        float32 scoring gathers scattered rows and gains nothing. A candidate found in two
        probed partitions is returned once. Default None: each candidate in one partition.
        1.0 is a good value; the build takes about twice as long.
      **kwargs: ``k``, ``padding_identifier``, ``exclude_padding`` and Keras layer arguments,
        see ``RetrievalIndex``.

    Returns:
      As ``RetrievalIndex``: the top-k of the candidates in the probed partitions, scored with
      exact dot products, and their identifiers, [B, k] each; exact when every partition is
      probed.

    Raises:
      ValueError: If an argument is out of range.

    Example:
      >>> index = PartitionedIndex(num_partitions=32, num_probes=4, k_max=10)
      >>> index = index.index(tf.random.normal([1000, 16]))
      >>> scores, ids = index(tf.random.normal([2, 16]), k=10)  # [2, 10] each
    """

    def __init__(
        self,
        num_partitions: int = 100,
        num_probes: int = 10,
        k_max: int = 100,
        kmeans_iterations: int = 20,
        seed: int = 0,
        spherical: bool = True,
        training_sample_size: Optional[int] = 100_000,
        scoring_dtype: str = "float32",
        num_reordering_candidates: Optional[int] = None,
        subpartitions: int = 1,
        parent_probes: Optional[int] = None,
        soar_lambda: Optional[float] = None,
        **kwargs,
    ):
        super().__init__(k_max=k_max, **kwargs)
        self.num_partitions = arguments.integer("num_partitions", num_partitions, 1)
        self.num_probes = arguments.integer("num_probes", num_probes, 1)
        self.subpartitions = arguments.integer("subpartitions", subpartitions, 1)
        self.parent_probes = arguments.optional_integer("parent_probes", parent_probes, 1)
        self.soar_lambda = None if soar_lambda is None else arguments.real("soar_lambda", soar_lambda, 0.0)
        self.kmeans_iterations = arguments.integer("kmeans_iterations", kmeans_iterations, 0)
        self.training_sample_size = arguments.optional_integer("training_sample_size", training_sample_size, 1)
        if scoring_dtype not in SCORING_DTYPES:
            raise ValueError(f"scoring_dtype must be one of {list(SCORING_DTYPES)}, got {scoring_dtype!r}")
        self.scoring_dtype = scoring_dtype
        self.num_reordering_candidates = arguments.optional_integer(
            "num_reordering_candidates", num_reordering_candidates, 1)
        self.seed = arguments.integer("seed", seed, 0)
        self.spherical = arguments.boolean("spherical", spherical)
        self.centroids = None
        self.parent_centroids = None
        self.parent_offsets = None
        self.partition_offsets = None
        self.item_order = None
        self.candidates = None
        self.coarse_candidates = None
        self.coarse_scales = None
        self.listed_rows = None

    def _index(self, candidates: tf.Tensor) -> Callable[[], None]:
        embeddings = candidates.numpy()
        centroids = kmeans(
            embeddings,
            self.num_partitions,
            iterations=self.kmeans_iterations,
            seed=self.seed,
            spherical=self.spherical,
            training_sample_size=self.training_sample_size,
        )
        assignment, _ = assign(embeddings, centroids, self.spherical)
        parent_centroids = None
        if self.subpartitions > 1:
            parent_centroids = centroids
            centroids, assignment, parent_of = split_partitions(
                embeddings, assignment, self.subpartitions, self.kmeans_iterations, self.seed, self.spherical
            )
        sizes = np.bincount(assignment, minlength=len(centroids))
        # Empty partitions would only waste probes.
        kept = np.flatnonzero(sizes)
        renumber = np.full(len(centroids), -1, np.int64)
        renumber[kept] = np.arange(len(kept))
        assignment = renumber[assignment]
        centroids = centroids[kept].astype(np.float32)
        item_order = np.argsort(assignment, kind="stable")
        # In the order of the Keras weights (that of first creation), which .h5 files follow.
        state = {"centroids": centroids}
        parent_offsets = None
        if parent_centroids is not None:
            # Sub-partitions stay numbered parent by parent, so each parent owns a contiguous
            # range of them, as a partition owns a contiguous range of candidates.
            parents, per_parent = np.unique(parent_of[kept], return_counts=True)
            parent_centroids = parent_centroids[parents]
            parent_offsets = np.concatenate([[0], np.cumsum(per_parent)]).astype(np.int64)
            state.update(parent_centroids=parent_centroids, parent_offsets=parent_offsets)
        state["item_order"] = item_order.astype(np.int32)
        ordered = embeddings[item_order]
        state["candidates"] = ordered
        # Partition lists: the candidate rows of every partition, in partition order.
        listed_partitions, listed_rows = assignment[item_order], np.arange(len(ordered))
        if self.soar_lambda is not None:
            second = soar_assignment(embeddings, centroids, assignment, self.soar_lambda, parent_centroids,
                                     parent_offsets)
            row_of = np.empty(len(ordered), np.int64)
            row_of[item_order] = np.arange(len(ordered))
            spilled = np.flatnonzero(second >= 0)
            listed_partitions = np.concatenate([listed_partitions, second[spilled]])
            # Stable: each partition lists its own members first, as contiguous rows.
            listed = np.argsort(listed_partitions, kind="stable")
            listed_partitions = listed_partitions[listed]
            listed_rows = np.concatenate([listed_rows, row_of[spilled]])[listed]
            state["listed_rows"] = listed_rows.astype(np.int32)
        counts = np.bincount(listed_partitions, minlength=len(centroids))
        state["partition_offsets"] = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

        def in_list_order(compact):
            # The compact copy is made once per row, then repeated for the spilled entries.
            return compact if self.soar_lambda is None else tf.gather(compact, listed_rows)

        if self.scoring_dtype == "bfloat16":
            state["coarse_candidates"] = in_list_order(tf.cast(ordered, tf.bfloat16))
        elif self.scoring_dtype == "int8":
            codes, scales = int8_codes(ordered)
            state.update(coarse_candidates=in_list_order(codes), coarse_scales=scales)
        return functools.partial(self._assign_states, state)

    def _top_k(self, queries: tf.Tensor, k: tf.Tensor) -> Tuple[tf.Tensor, tf.Tensor]:
        def search(one_query: bool):
            probes = self._probes(queries, one_query)
            coarse = None if self.scoring_dtype == "float32" else self.coarse_candidates
            scores, rows = self._best_in_ranges(queries, self.partition_offsets, probes, self.candidates, coarse, k,
                                                one_query, self.listed_rows)
            if one_query:
                return scores, tf.gather(self.item_order, rows)
            positions = tf.gather(self.item_order, tf.maximum(rows, 0))
            return scores, tf.where(rows >= 0, positions, tf.constant(-1, tf.int32))

        # The usual online request is one query, whose rows are one flat list with nothing to
        # pad or mask: every op saved there is a few microseconds off every single lookup.
        return tf.cond(tf.equal(tf.shape(queries)[0], 1), lambda: search(True), lambda: search(False))

    def _probes(self, queries: tf.Tensor, one_query: bool) -> tf.Tensor:
        """The partitions each query searches, best first: int [B, <= num_probes]."""
        if self._probes_parents():
            # Two-level probing: the best parents first, then the best of their sub-partitions.
            parent_scores = tf.matmul(queries, self.parent_centroids, transpose_b=True)
            _, parents = tf.math.top_k(parent_scores, k=tf.minimum(self.parent_probes, tf.shape(parent_scores)[1]))
            return self._best_in_ranges(queries, self.parent_offsets, parents, self.centroids, None,
                                        self.num_probes, one_query)[1]
        centroid_scores = tf.matmul(queries, self.centroids, transpose_b=True)  # [B, P]
        return tf.math.top_k(centroid_scores, k=tf.minimum(self.num_probes, tf.shape(centroid_scores)[1]))[1]

    def _best_in_ranges(self, queries, offsets, groups, table, coarse_table, n, one_query: bool, listed_rows=None):
        """The ``n`` best rows of ``table`` among the row ranges of ``groups`` (best first).

        Group g owns rows ``offsets[g]:offsets[g + 1]`` (partitions own candidates; parents own
        sub-partitions). ``groups`` is [B, G], -1 for none (from a padded earlier level).

        A batch gathers straight into a [B, M, d] block scored with one batched mat-vec: each
        row is read once and only the scores are written, with no per-row copy of the query.
        One query (B = 1, no -1) gathers [M, d] for a plain mat-mul, markedly faster than a
        batched mat-vec with a batch of one (0.35 ms of 1.6 at 10^6 items here). Ranges are
        contiguous, so the gathers copy runs of consecutive rows. With ``coarse_table`` (a
        bfloat16 copy or int8 codes), a first pass on fewer bytes keeps the best rows for exact
        rescoring. With ``listed_rows`` (spilled partitions), ranges hold list entries, which
        ``listed_rows`` maps to rows of ``table`` (``coarse_table`` is in entry order); a row
        listed in two probed partitions then counts once.

        Returns:
          (float32 scores [B, m], int64 rows [B, m], -1 where none), m <= n.
        """
        if one_query:
            # One query's groups come from a top-k over real groups: none is -1.
            starts, limits = tf.gather(offsets, groups[0]), tf.gather(offsets, groups[0] + 1)
            rows = tf.ragged.range(starts, limits).flat_values[tf.newaxis, :]
        else:
            starts = tf.gather(offsets, tf.maximum(groups, 0))
            limits = tf.where(groups >= 0, tf.gather(offsets, tf.maximum(groups, 0) + 1), starts)  # none: empty
            flat = tf.ragged.range(tf.reshape(starts, [-1]), tf.reshape(limits, [-1])).flat_values
            rows = tf.RaggedTensor.from_row_lengths(flat, tf.reduce_sum(limits - starts, axis=1)).to_tensor(-1)

        def scored(table, rows, query):
            def gathered(indices):
                members = tf.gather(table, indices)
                # int8 codes are multiplied in float32: TF has no int8 x float mat-mul.
                return tf.cast(members, tf.float32) if table.dtype == tf.int8 else members

            if one_query:
                return tf.matmul(query, gathered(rows[0]), transpose_b=True)  # [1, M]
            scores = tf.cast(tf.linalg.matvec(gathered(tf.maximum(rows, 0)), query), tf.float32)
            return tf.where(rows >= 0, scores, tf.constant(-np.inf, tf.float32))

        def table_rows(entries):
            if listed_rows is None:
                return entries
            found = tf.cast(tf.gather(listed_rows, tf.maximum(entries, 0)), entries.dtype)
            return found if one_query else tf.where(entries >= 0, found, tf.constant(-1, entries.dtype))

        if coarse_table is not None:
            coarse = tf.cast(scored(coarse_table, rows, self._coarse_queries(queries)), tf.float32)
            reorder = tf.maximum(n, self._reordered_per_query())
            if listed_rows is not None:
                # Both copies of a spilled row score alike: the best 2R entries hold R distinct rows.
                reorder *= 2
            _, best = tf.math.top_k(coarse, k=tf.minimum(reorder, tf.shape(coarse)[1]))
            rows = table_rows(tf.gather(rows, best, batch_dims=1))  # [B, R]
            scores = scored(table, rows, queries)
        else:
            rows = table_rows(rows)
            scores = scored(table, rows, queries)
            if listed_rows is not None:
                # A row is listed at most twice, so the best 2n entries hold the best n rows.
                scores, best = tf.math.top_k(scores, k=tf.minimum(2 * n, tf.shape(scores)[1]))
                rows = tf.gather(rows, best, batch_dims=1)
        if listed_rows is None:
            top_scores, top = tf.math.top_k(scores, k=tf.minimum(n, tf.shape(scores)[1]))
            return top_scores, tf.gather(rows, top, batch_dims=1)  # padding rows keep their -1
        if one_query:
            # A hash set of the rows: fewer ops than the batch's sort (both copies score alike).
            distinct, slot = tf.unique(rows[0])
            best = tf.math.unsorted_segment_max(scores[0], slot, tf.shape(distinct)[0])
            top_scores, top = tf.math.top_k(best[tf.newaxis, :], k=tf.minimum(n, tf.shape(distinct)[0]))
            return top_scores, tf.gather(distinct, top)
        top_scores, top = tf.math.top_k(_without_repeats(scores, rows), k=tf.minimum(n, tf.shape(scores)[1]))
        # Fewer distinct rows than n: the repeats that filled the list are empty slots.
        return top_scores, tf.where(top_scores > -np.inf, tf.gather(rows, top, batch_dims=1), tf.constant(-1, rows.dtype))

    def _coarse_queries(self, queries: tf.Tensor) -> tf.Tensor:
        """Queries as the first pass multiplies them: code_j * scale_j is candidate_j, so a query
        scaled by the codes' scales scores the codes as it scores the candidates."""
        if self.scoring_dtype == "int8":
            return queries * self.coarse_scales
        return tf.cast(queries, tf.bfloat16)

    def _probes_parents(self) -> bool:
        return self.parent_probes is not None and self.parent_centroids is not None

    def is_exact(self) -> bool:
        """True iff every partition (and, with ``parent_probes``, every parent) is probed and,
        with int8 or bfloat16 scoring, every candidate is rescored in float32. Once indexed, the
        partitions counted are the ones built (after capping and dropping empty ones); before,
        ``num_partitions * subpartitions``.

        Returns:
          Whether results equal a brute-force search.
        """
        built = None if self.centroids is None else int(tf.shape(self.centroids)[0])
        probes_all = self.num_probes >= (built or self.num_partitions * self.subpartitions)
        if self.parent_probes is not None and self.subpartitions > 1:
            parents = None if self.parent_centroids is None else int(tf.shape(self.parent_centroids)[0])
            probes_all = probes_all and self.parent_probes >= (parents or self.num_partitions)
        if self.scoring_dtype == "float32":
            return probes_all
        return (probes_all and self.candidates is not None
                and self._reordered_per_query() >= int(tf.shape(self.candidates)[0]))

    def _reordered_per_query(self) -> int:
        """Members rescored in float32 after an int8 or bfloat16 pass (at least k is rescored)."""
        return self.num_reordering_candidates or 4 * self.k_max

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            num_partitions=self.num_partitions,
            num_probes=self.num_probes,
            subpartitions=self.subpartitions,
            parent_probes=self.parent_probes,
            kmeans_iterations=self.kmeans_iterations,
            seed=self.seed,
            spherical=self.spherical,
            training_sample_size=self.training_sample_size,
            scoring_dtype=self.scoring_dtype,
            num_reordering_candidates=self.num_reordering_candidates,
            soar_lambda=self.soar_lambda,
        )
        return config


def _without_repeats(scores: tf.Tensor, rows: tf.Tensor) -> tf.Tensor:
    """``scores`` [B, m] with -inf at each repeat of a row in the same query's ``rows`` [B, m]
    (a spilled candidate found in both its partitions); the first occurrence keeps its score."""
    order = tf.argsort(tf.cast(rows, tf.int32), axis=1, stable=True)
    ranked = tf.gather(rows, order, batch_dims=1)
    repeated = tf.concat([tf.zeros_like(ranked[:, :1], tf.bool), ranked[:, 1:] == ranked[:, :-1]], axis=1)
    repeated = tf.gather(repeated, tf.argsort(order, axis=1, stable=True), batch_dims=1)  # back to list order
    return tf.where(repeated, tf.constant(-np.inf, scores.dtype), scores)
