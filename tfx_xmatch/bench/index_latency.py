"""Single-query latency of every index kind against catalogue size, on synthetic catalogues.

Dense kinds index N clustered d-dimensional item vectors and answer one query (batch 1, top-k)
at a time; ``sparse_code`` indexes a ReLU code-item table (C codes, a few percent positive) and
answers a bag of 8 codes. Approximate kinds are configured from N (sqrt(N) partitions or leaves)
and report recall@k against the exact answer of the same catalogue.
"""

from __future__ import annotations

import math
import time

import numpy as np
import tensorflow as tf

from tfx_xmatch.bench.serving_paths import index_bytes
from tfx_xmatch.index import make_index

DENSE_KINDS = ("brute_force", "partitioned", "scann")
NUM_CODES = 512
QUERY_CODES = 8


def clustered(n: int, dimension: int, seed: int) -> np.ndarray:
    """Unit vectors around sqrt(n) centres: what trained item embeddings look like to an index."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, int(math.sqrt(n))), dimension))
    vectors = centres[rng.integers(0, len(centres), n)] + 0.5 * rng.standard_normal((n, dimension))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def _options(kind: str, n: int) -> dict:
    root = max(1, round(math.sqrt(n)))
    if kind == "partitioned":
        return {"num_partitions": root, "num_probes": max(1, min(root, round(0.1 * root) + 4))}
    if kind == "scann":
        return {"num_leaves": root, "num_leaves_to_search": max(1, min(root, round(0.128 * root) + 4)),
                "num_reordering_candidates": 500}
    return {}


def _latencies(search, queries: list, warmup: int) -> tuple[list, np.ndarray]:
    for query in queries[:warmup]:
        search(query)[1].numpy()
    timings, found = [], []
    for query in queries:
        started = time.perf_counter()
        ids = search(query)[1].numpy()
        timings.append((time.perf_counter() - started) * 1000.0)
        found.append(ids[0])
    return timings, np.stack(found)


def _recall(found: np.ndarray, exact: np.ndarray) -> float:
    hits = [len(set(a[a >= 0]) & set(b[b >= 0])) / max(1, int(np.sum(b >= 0))) for a, b in zip(found, exact)]
    return round(float(np.mean(hits)), 4)


def _row(kind: str, n: int, index, seconds: float, timings: list, found, exact, options: dict) -> dict:
    return {"kind": kind, "n_items": n, "p50_ms": round(float(np.percentile(timings, 50)), 3),
            "p99_ms": round(float(np.percentile(timings, 99)), 3), "recall_at_k": _recall(found, exact),
            "build_seconds": round(seconds, 3), "index_bytes": index_bytes(index), "settings": options}


def measure(sizes, kinds=(*DENSE_KINDS, "sparse_code"), dimension: int = 64, k: int = 100, queries: int = 200,
            warmup: int = 20, seed: int = 0) -> list[dict]:
    """One row per (size, kind): p50/p99 ms, recall@k vs exact, build seconds and index bytes."""
    rows = []
    for n in sizes:
        items = tf.constant(clustered(n, dimension, seed))
        query_vectors = clustered(queries, dimension, seed + 1)
        probe = [tf.constant(q[np.newaxis]) for q in query_vectors]
        exact = np.argsort(-(query_vectors @ items.numpy().T), axis=1, kind="stable")[:, :k]
        for kind in [kind for kind in kinds if kind in DENSE_KINDS]:
            options = _options(kind, n)
            started = time.perf_counter()
            index = make_index(kind, k_max=k, **options).index(items)
            seconds = time.perf_counter() - started
            search = tf.function(lambda q, index=index: index(q, k=k))
            timings, found = _latencies(search, probe, warmup)
            rows.append(_row(kind, n, index, seconds, timings, found, exact, options))
        if "sparse_code" in kinds:
            rows.append(_sparse_row(n, k, queries, warmup, seed))
    return rows


def _sparse_row(n: int, k: int, queries: int, warmup: int, seed: int) -> dict:
    rng = np.random.default_rng([seed, n])
    items = clustered(n, 32, seed + 2)
    codes = clustered(NUM_CODES, 32, seed + 3)
    scores = items @ codes.T
    table = np.maximum(scores - np.quantile(scores[: min(n, 20000)], 0.95), 0.0).astype(np.float32)
    options = {"cache_fraction": None}
    started = time.perf_counter()
    index = make_index("sparse_code", k_max=k).index(tf.constant(table))
    seconds = time.perf_counter() - started
    bags = np.zeros((queries, NUM_CODES), np.float32)
    for row in range(queries):
        bags[row, rng.choice(NUM_CODES, QUERY_CODES, replace=False)] = 1.0
    probe = [tf.constant(bag[np.newaxis]) for bag in bags]
    search = tf.function(lambda q: index(q, k=k))
    timings, found = _latencies(search, probe, warmup)
    exact_scores = bags @ table.T
    exact = np.argsort(-exact_scores, axis=1, kind="stable")[:, :k]
    exact = np.where(np.take_along_axis(exact_scores, exact, 1) > 0, exact, -1)
    return _row("sparse_code", n, index, seconds, timings, found, exact, options)
