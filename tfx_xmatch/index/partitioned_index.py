"""PartitionedIndex: a k-means partitioned (IVF) index written with stock TensorFlow ops only.

Stock TF Serving has no ScaNN ops, so a ScaNN export needs a custom server build. This index is
the portable approximate alternative: ``index()`` clusters the candidates with k-means (NumPy,
once), and a query scores the partition centroids, probes the ``num_probes`` best partitions and
scores their members exactly. Every query-time op (MatMul, TopKV2, Gather, RaggedRange,
RaggedTensorToTensor, BatchMatMulV2, ...) is registered in stock TensorFlow, CPU and GPU.

Layout: candidates are stored sorted by partition, so partition p owns the contiguous rows
``partition_offsets[p]:partition_offsets[p + 1]`` (a CSR layout), and ``item_order`` maps those
rows back to the positions given to ``index()``.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import numpy as np
import tensorflow as tf

from tfx_xmatch.index.retrieval_index import RetrievalIndex

# Rows scored per block when assigning points to centroids: bounds the [block, P] score matrix.
_ASSIGN_BLOCK = 16384
SCORING_DTYPES = ("float32", "bfloat16", "int8")
# Largest magnitude of an int8 code: symmetric, so that -x is coded as -code(x).
_INT8_LIMIT = 127.0


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
        (int >= 1, default 4 * k_max; at least k is always rescored). Ignored with "float32".
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
      **kwargs: ``k``, ``padding_identifier``, ``exclude_padding`` and Keras layer arguments,
        see ``RetrievalIndex``.

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
        **kwargs,
    ):
        super().__init__(k_max=k_max, **kwargs)
        if num_partitions < 1:
            raise ValueError(f"num_partitions must be at least 1, got {num_partitions!r}")
        if num_probes < 1:
            raise ValueError(f"num_probes must be at least 1, got {num_probes!r}")
        if subpartitions < 1:
            raise ValueError(f"subpartitions must be at least 1, got {subpartitions!r}")
        self.subpartitions = int(subpartitions)
        if parent_probes is not None and parent_probes < 1:
            raise ValueError(f"parent_probes must be at least 1 or None, got {parent_probes!r}")
        self.parent_probes = None if parent_probes is None else int(parent_probes)
        if kmeans_iterations < 0:
            raise ValueError(f"kmeans_iterations must be >= 0, got {kmeans_iterations!r}")
        if training_sample_size is not None and training_sample_size < 1:
            raise ValueError(
                f"training_sample_size must be at least 1 or None, got {training_sample_size!r}"
            )
        if scoring_dtype not in SCORING_DTYPES:
            raise ValueError(f"scoring_dtype must be one of {list(SCORING_DTYPES)}, got {scoring_dtype!r}")
        if num_reordering_candidates is not None and num_reordering_candidates < 1:
            raise ValueError(f"num_reordering_candidates must be at least 1 or None, got {num_reordering_candidates!r}")
        self.scoring_dtype = scoring_dtype
        self.num_reordering_candidates = (
            None if num_reordering_candidates is None else int(num_reordering_candidates)
        )
        self.num_partitions = int(num_partitions)
        self.num_probes = int(num_probes)
        self.kmeans_iterations = int(kmeans_iterations)
        self.seed = int(seed)
        self.spherical = bool(spherical)
        self.training_sample_size = (
            None if training_sample_size is None else int(training_sample_size)
        )
        self.centroids = None
        self.parent_centroids = None
        self.parent_offsets = None
        self.partition_offsets = None
        self.item_order = None
        self.candidates = None
        self.coarse_candidates = None
        self.coarse_scales = None

    def _index(self, candidates: tf.Tensor) -> None:
        embeddings = candidates.numpy()
        centroids = kmeans(
            embeddings,
            self.num_partitions,
            iterations=self.kmeans_iterations,
            seed=self.seed,
            spherical=self.spherical,
            training_sample_size=self.training_sample_size,
        )
        assignment, _ = _assign(embeddings, centroids, self.spherical)
        parent_centroids = None
        if self.subpartitions > 1:
            parent_centroids = centroids
            centroids, assignment, parent_of = _split_partitions(
                embeddings, assignment, self.subpartitions, self.kmeans_iterations, self.seed, self.spherical
            )
        sizes = np.bincount(assignment, minlength=len(centroids))
        # Empty partitions would only waste probes.
        kept = np.flatnonzero(sizes)
        renumber = np.full(len(centroids), -1, np.int64)
        renumber[kept] = np.arange(len(kept))
        assignment = renumber[assignment]
        item_order = np.argsort(assignment, kind="stable")
        offsets = np.concatenate([[0], np.cumsum(sizes[kept])]).astype(np.int64)
        self.centroids = self._assign_state("centroids", centroids[kept].astype(np.float32))
        if parent_centroids is not None:
            # Sub-partitions stay numbered parent by parent, so each parent owns a contiguous
            # range of them, as a partition owns a contiguous range of candidates.
            parents, per_parent = np.unique(parent_of[kept], return_counts=True)
            self.parent_centroids = self._assign_state("parent_centroids", parent_centroids[parents])
            self.parent_offsets = self._assign_state(
                "parent_offsets", np.concatenate([[0], np.cumsum(per_parent)]).astype(np.int64)
            )
        self.partition_offsets = self._assign_state("partition_offsets", offsets)
        self.item_order = self._assign_state("item_order", item_order.astype(np.int32))
        ordered = embeddings[item_order]
        self.candidates = self._assign_state("candidates", ordered)
        if self.scoring_dtype == "bfloat16":
            self.coarse_candidates = self._assign_state(
                "coarse_candidates", tf.cast(self.candidates, tf.bfloat16)
            )
        elif self.scoring_dtype == "int8":
            codes, scales = int8_codes(ordered)
            self.coarse_candidates = self._assign_state("coarse_candidates", codes)
            self.coarse_scales = self._assign_state("coarse_scales", scales)

    def _top_k(self, queries: tf.Tensor, k: tf.Tensor) -> Tuple[tf.Tensor, tf.Tensor]:
        def search(one_query: bool):
            probes = self._probes(queries, one_query)
            coarse = None if self.scoring_dtype == "float32" else self.coarse_candidates
            scores, rows = self._best_in_ranges(queries, self.partition_offsets, probes, self.candidates, coarse, k,
                                                one_query)
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

    def _best_in_ranges(self, queries, offsets, groups, table, coarse_table, n, one_query: bool):
        """The ``n`` best rows of ``table`` among the row ranges of ``groups`` (best first).

        Group g owns rows ``offsets[g]:offsets[g + 1]`` (partitions own candidates; parents own
        sub-partitions). ``groups`` is [B, G], -1 for none (from a padded earlier level).

        A batch gathers straight into a [B, M, d] block scored with one batched mat-vec: each
        row is read once and only the scores are written, with no per-row copy of the query.
        One query (B = 1, no -1) gathers [M, d] for a plain mat-mul, markedly faster than a
        batched mat-vec with a batch of one (0.35 ms of 1.6 at 10^6 items here). Ranges are
        contiguous, so the gathers copy runs of consecutive rows. With ``coarse_table`` (a
        bfloat16 copy or int8 codes), a first pass on fewer bytes keeps the best rows for exact
        rescoring.

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

        if coarse_table is not None:
            coarse = tf.cast(scored(coarse_table, rows, self._coarse_queries(queries)), tf.float32)
            reorder = tf.maximum(n, self._reordered_per_query())
            _, best = tf.math.top_k(coarse, k=tf.minimum(reorder, tf.shape(coarse)[1]))
            rows = tf.gather(rows, best, batch_dims=1)  # [B, R]
        scores = scored(table, rows, queries)
        top_scores, top = tf.math.top_k(scores, k=tf.minimum(n, tf.shape(scores)[1]))
        return top_scores, tf.gather(rows, top, batch_dims=1)  # padding rows keep their -1

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
        )
        return config


def kmeans(
    points: np.ndarray,
    num_clusters: int,
    iterations: int = 20,
    seed: Union[int, Sequence[int]] = 0,
    spherical: bool = True,
    training_sample_size: Optional[int] = None,
) -> np.ndarray:
    """Lloyd k-means with k-means++ seeding, deterministic for a seed.

    Args:
      points: float [N, d].
      num_clusters: Wanted clusters; capped at the number of training points.
      iterations: Maximum Lloyd iterations (stops early once assignments are stable).
      seed: Seed of the training sample and the k-means++ draws (an int or a sequence of ints,
        as numpy.random.default_rng takes).
      spherical: Unit-norm centroids and dot-product assignment if True; means and squared
        L2 assignment if False.
      training_sample_size: Train on a random sample of at most this many points (None: all).

    Returns:
      float32 [min(num_clusters, n_train), d] centroids. Clusters that stay empty after
      re-seeding keep their last centroid.
    """
    rng = np.random.default_rng(seed)
    points = np.asarray(points, np.float32)
    if training_sample_size is not None and len(points) > training_sample_size:
        points = points[np.sort(rng.choice(len(points), training_sample_size, replace=False))]
    train = _unit_rows(points) if spherical else points
    num_clusters = min(int(num_clusters), len(train))
    centroids = _kmeans_plus_plus(train, num_clusters, rng)
    if spherical:
        centroids = _unit_rows(centroids)
    previous = None
    for _ in range(iterations):
        assignment, fit = _assign(train, centroids, spherical)
        if previous is not None and np.array_equal(assignment, previous):
            break
        previous = assignment
        counts = np.bincount(assignment, minlength=num_clusters)
        sums = np.zeros_like(centroids)
        nonempty = np.flatnonzero(counts)
        order = np.argsort(assignment, kind="stable")
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        sums[nonempty] = np.add.reduceat(train[order], starts[nonempty], axis=0)
        if spherical:
            updated = _unit_rows(sums)
            # A cluster whose members cancel out has no direction; treat it as empty.
            counts[np.linalg.norm(sums, axis=1) == 0] = 0
        else:
            updated = sums / np.maximum(counts, 1)[:, None]
        empty = np.flatnonzero(counts == 0)
        centroids = np.where(counts[:, None] > 0, updated, centroids)
        if len(empty):
            # Re-seed empty clusters with the points their centroids fit worst: they are the
            # most under-served part of the data, and the choice is deterministic.
            worst = np.argsort(fit, kind="stable")[: len(empty)]
            centroids[empty[: len(worst)]] = train[worst]
            previous = None  # the assignment will change; do not stop on the next iteration
    return centroids.astype(np.float32)


def int8_codes(embeddings: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Symmetric per-dimension int8 codes of float [N, d] rows.

    Returns:
      (int8 [N, d] codes, float32 [d] scales) with ``codes * scales`` within half a scale of
      ``embeddings``. A dimension that is zero everywhere gets scale 1 (its codes are all 0).
    """
    largest = np.abs(embeddings).max(axis=0).astype(np.float32)
    scales = np.where(largest > 0, largest / _INT8_LIMIT, 1.0).astype(np.float32)
    codes = np.clip(np.rint(embeddings / scales), -_INT8_LIMIT, _INT8_LIMIT).astype(np.int8)
    return codes, scales


def _split_partitions(
    points: np.ndarray, assignment: np.ndarray, parts: int, iterations: int, seed: int, spherical: bool
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each partition's members clustered again into up to ``parts`` sub-partitions.

    Returns:
      (float32 [P', d] sub-partition centroids, int64 [N] sub-partition of every point, int64
      [P'] partition of every sub-partition), with the sub-partitions of partition p numbered
      after those of p - 1.
    """
    order = np.argsort(assignment, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(np.bincount(assignment))])
    centroids, parents, refined, numbered = [], [], np.empty(len(points), np.int64), 0
    for partition in range(len(bounds) - 1):
        members = order[bounds[partition] : bounds[partition + 1]]
        if not len(members):
            continue
        # A seed per (seed, partition) pair keeps the build deterministic, with random streams
        # that do not overlap between partitions or with the first level's.
        sub = kmeans(points[members], parts, iterations=iterations, seed=(seed, 1, partition), spherical=spherical)
        refined[members] = numbered + _assign(points[members], sub, spherical)[0]
        centroids.append(sub)
        parents.append(np.full(len(sub), partition, np.int64))
        numbered += len(sub)
    return np.concatenate(centroids).astype(np.float32), refined, np.concatenate(parents)


def _kmeans_plus_plus(
    points: np.ndarray, num_clusters: int, rng: np.random.Generator
) -> np.ndarray:
    """k-means++ seeds: each next seed drawn with probability proportional to squared distance."""
    centroids = np.empty((num_clusters, points.shape[1]), np.float32)
    centroids[0] = points[rng.integers(len(points))]
    # float64: rng.choice insists that the probabilities sum to 1 within a tight tolerance.
    nearest = np.sum((points - centroids[0]) ** 2, axis=1, dtype=np.float64)
    for i in range(1, num_clusters):
        total = float(nearest.sum())
        if total > 0:
            choice = rng.choice(len(points), p=nearest / total)
        else:
            # Every point coincides with a seed: any will do (Lloyd re-seeds empty clusters).
            choice = rng.integers(len(points))
        centroids[i] = points[choice]
        nearest = np.minimum(nearest, np.sum((points - centroids[i]) ** 2, axis=1, dtype=np.float64))
    return centroids


def _assign(
    points: np.ndarray, centroids: np.ndarray, spherical: bool
) -> Tuple[np.ndarray, np.ndarray]:
    """Nearest centroid of each point and how well it fits (higher is better), block by block.

    The fit is the dot product with the centroid (spherical) or minus half the squared L2
    distance (Euclidean).
    """
    half_norms = 0.0 if spherical else 0.5 * np.sum(centroids**2, axis=1)
    assignment = np.empty(len(points), np.int64)
    fit = np.empty(len(points), np.float32)
    for start in range(0, len(points), _ASSIGN_BLOCK):
        block = points[start : start + _ASSIGN_BLOCK]
        # argmin ||x - c||^2 = argmax (x.c - ||c||^2 / 2); spherical k-means is plain argmax x.c.
        scores = block @ centroids.T - half_norms
        best = np.argmax(scores, axis=1)
        assignment[start : start + len(block)] = best
        block_fit = scores[np.arange(len(block)), best]
        if not spherical:
            block_fit = block_fit - 0.5 * np.sum(block**2, axis=1)
        fit[start : start + len(block)] = block_fit
    return assignment, fit


def _unit_rows(matrix: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm; all-zero rows stay zero."""
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return (matrix / np.where(norms > 0, norms, 1.0)).astype(np.float32)
