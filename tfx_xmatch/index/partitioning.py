"""Partitioning for PartitionedIndex, in NumPy at index time: k-means (one or two levels),
nearest-centroid assignment, SOAR spilled assignment and int8 codes."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import numpy as np

# Rows scored per block when assigning points to centroids: bounds the [block, P] score matrix.
_ASSIGN_BLOCK = 16384
# Largest magnitude of an int8 code: symmetric, so that -x is coded as -code(x).
_INT8_LIMIT = 127.0


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
    train = unit_rows(points) if spherical else points
    num_clusters = min(int(num_clusters), len(train))
    centroids = _kmeans_plus_plus(train, num_clusters, rng)
    if spherical:
        centroids = unit_rows(centroids)
    previous = None
    for _ in range(iterations):
        assignment, fit = assign(train, centroids, spherical)
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
            updated = unit_rows(sums)
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


def split_partitions(
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
        refined[members] = numbered + assign(points[members], sub, spherical)[0]
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


def assign(
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


def unit_rows(matrix: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm; all-zero rows stay zero."""
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return (matrix / np.where(norms > 0, norms, 1.0)).astype(np.float32)


def soar_assignment(
    points: np.ndarray,
    centroids: np.ndarray,
    primary: np.ndarray,
    soar_lambda: float,
    parent_centroids: Optional[np.ndarray] = None,
    parent_offsets: Optional[np.ndarray] = None,
    parents_searched: int = 8,
) -> np.ndarray:
    """A second partition for every point, chosen by SOAR (Sun et al., NeurIPS 2023).

    A point x in partition c is missed when a query is aligned with its residual r = x - c,
    since the query then scores the centroid c well below x. The second partition c' is the one
    minimising ``||x - c'||^2 + soar_lambda * <r / ||r||, x - c'>^2``: close to x, and with a
    residual orthogonal to r, so that the queries the first partition serves worst find x in the
    second. ``soar_lambda = 0`` is the plain second-nearest partition.

    Args:
      points: float [N, d].
      centroids: float [P, d] partition centroids.
      primary: int [N] each point's own partition (never chosen again).
      soar_lambda: Weight of the orthogonality term (float >= 0).
      parent_centroids, parent_offsets: Two-level partitions: parent g owns partitions
        ``parent_offsets[g]:parent_offsets[g + 1]``. The second partition is then sought among
        the partitions of the ``parents_searched`` parents scoring x highest (the ones a query
        near x probes), instead of among all P.
      parents_searched: See above (int >= 1, default 8).

    Returns:
      int64 [N] second partitions; -1 for a point with no other partition to choose.
    """
    points = np.asarray(points, np.float32)
    primary = np.asarray(primary, np.int64)
    secondary = np.full(len(points), -1, np.int64)
    if len(centroids) < 2:
        return secondary
    two_level = parent_centroids is not None and parent_offsets is not None
    if two_level:
        searched = min(int(parents_searched), len(parent_centroids))
        width = int(np.max(np.diff(parent_offsets)))
        block = max(1, 2**22 // (searched * width * points.shape[1]))
    else:
        block = max(1, 2**24 // len(centroids))
    for start in range(0, len(points), block):
        x, own = points[start : start + block], primary[start : start + block]
        residual = x - centroids[own]
        residual /= np.maximum(np.linalg.norm(residual, axis=1, keepdims=True), 1e-12)
        along = np.sum(residual * x, axis=1, keepdims=True)
        if two_level:
            parents = np.argpartition(-(x @ parent_centroids.T), searched - 1, axis=1)[:, :searched]
            first = parent_offsets[parents][:, :, None] + np.arange(width)
            valid = (first < parent_offsets[parents + 1][:, :, None]).reshape(len(x), -1)
            candidates = np.where(valid, first.reshape(len(x), -1), 0)
            chosen = centroids[candidates]  # [b, searched * width, d]
            to_x = np.einsum("bd,bmd->bm", x, chosen)
            to_residual = np.einsum("bd,bmd->bm", residual, chosen)
            norms = np.sum(chosen**2, axis=2)
        else:
            candidates = np.broadcast_to(np.arange(len(centroids)), (len(x), len(centroids)))
            valid = np.ones(candidates.shape, bool)
            to_x, to_residual = x @ centroids.T, residual @ centroids.T
            norms = np.sum(centroids**2, axis=1)[None, :]
        # ||x - c'||^2 without the ||x||^2 every candidate shares.
        cost = norms - 2.0 * to_x + soar_lambda * (along - to_residual) ** 2
        cost[~valid | (candidates == own[:, None])] = np.inf
        best = np.argmin(cost, axis=1)
        found = np.isfinite(cost[np.arange(len(x)), best])
        secondary[start : start + len(x)] = np.where(found, candidates[np.arange(len(x)), best], -1)
    return secondary
