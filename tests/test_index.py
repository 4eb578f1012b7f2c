"""Retrieval indexes: every kind against a NumPy brute-force oracle, k as a tensor, exclusions,
padding, partitioned recall, config round trips, SavedModel round trips and op portability."""

import contextlib
import copy
import json
import os
import pickle
import re
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2

from tfx_xmatch.index import (
    INDEX_KINDS,
    BruteForceIndex,
    PartitionedIndex,
    RetrievalIndex,
    ScaNNIndex,
    make_index,
)
from tfx_xmatch.index.partitioned_index import SCORING_DTYPES
from tfx_xmatch.index.partitioning import int8_codes, kmeans, soar_assignment

N, D, B, K_MAX = 300, 8, 5, 20
KINDS = ("brute_force", "partitioned", "scann")


def _exact_index(kind, **kwargs):
    """An index of ``kind`` configured to search exhaustively (so the oracle must match)."""
    if kind == "partitioned":
        return PartitionedIndex(num_partitions=8, num_probes=8, **{"k_max": K_MAX, **kwargs})
    if kind == "scann":
        # Every leaf searched and every candidate reordered with exact scores.
        return ScaNNIndex(
            num_leaves=4, num_leaves_to_search=4, num_reordering_candidates=512, **{"k_max": K_MAX, **kwargs}
        )
    return BruteForceIndex(**{"k_max": K_MAX, **kwargs})


def _data(seed=0, num=N):
    rng = np.random.default_rng(seed)
    candidates = rng.normal(size=(num, D)).astype(np.float32)
    queries = rng.normal(size=(B, D)).astype(np.float32)
    int_ids = (1000 + rng.permutation(num)).astype(np.int64)
    string_ids = np.array([f"item-{i}" for i in int_ids], dtype=object)
    return candidates, queries, int_ids, string_ids


def _oracle_scores(queries, candidates, ids, k, exclude=None):
    """Best-first top-k scores per query (-inf padded), excluding ``exclude``'s identifiers."""
    scores = queries @ candidates.T
    out = np.full((len(queries), k), -np.inf, np.float32)
    for row in range(len(queries)):
        keep = np.ones(len(ids), bool) if exclude is None else ~np.isin(ids, exclude[row])
        best = np.sort(scores[row, keep])[::-1][:k]
        out[row, : len(best)] = best
    return out


def _assert_matches_oracle(scores, ids, queries, candidates, all_ids, k, exclude=None, padding=None):
    """Scores equal the oracle's; each returned identifier really has its score (ties safe)."""
    scores, ids = np.asarray(scores), np.asarray(ids)
    expected = _oracle_scores(queries, candidates, all_ids, k, exclude)
    assert scores.shape == ids.shape == (len(queries), k)
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-4)
    row_of = {identifier: i for i, identifier in enumerate(all_ids.tolist())}
    for row in range(len(queries)):
        real = np.isfinite(expected[row])
        returned = [x.decode() if isinstance(x, bytes) else x for x in ids[row].tolist()]
        assert len(set(r for r, ok in zip(returned, real) if ok)) == real.sum()  # no duplicates
        for identifier, score, ok in zip(returned, scores[row], real):
            if not ok:
                assert identifier == padding
                continue
            assert exclude is None or identifier not in exclude[row].tolist()
            true_score = queries[row] @ candidates[row_of[identifier]]
            np.testing.assert_allclose(score, true_score, rtol=1e-5, atol=1e-4)


def _ids(id_type, int_ids, string_ids):
    return (int_ids, -1) if id_type == "int" else (string_ids, "")


# ---------------------------------------------------------------- oracle comparisons
@pytest.mark.parametrize("id_type", ["int", "string"])
@pytest.mark.parametrize("kind", KINDS)
def test_exact_configurations_match_the_oracle(kind, id_type):
    candidates, queries, int_ids, string_ids = _data()
    ids, padding = _ids(id_type, int_ids, string_ids)
    index = _exact_index(kind).index(candidates, ids)
    assert index.is_exact()
    scores, out = index(queries, k=10)
    assert scores.dtype == tf.float32 and out.dtype == (tf.int64 if id_type == "int" else tf.string)
    assert scores.shape == (B, 10)
    _assert_matches_oracle(scores, out, queries, candidates, ids, 10, padding=padding)
    scores, out = index(queries)  # default k = k_max
    _assert_matches_oracle(scores, out, queries, candidates, ids, K_MAX, padding=padding)


@pytest.mark.parametrize("kind", KINDS)
def test_default_identifiers_are_row_positions(kind):
    candidates, queries, _, _ = _data()
    scores, out = _exact_index(kind).index(candidates)(queries, k=5)
    _assert_matches_oracle(scores, out, queries, candidates, np.arange(N), 5, padding=-1)


@pytest.mark.parametrize("kind", KINDS)
def test_k_tensor_in_a_traced_function_varies_without_retracing(kind):
    candidates, queries, int_ids, _ = _data()
    index = _exact_index(kind).index(candidates, int_ids)
    traces = []

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, D], tf.float32),
            tf.TensorSpec([], tf.int32),
            tf.TensorSpec([None, None], tf.int64),
        ]
    )
    def search(q, k, exclude):
        traces.append(1)
        return index(q, k=k, exclude=exclude)

    history = int_ids[np.argsort(-(queries @ candidates.T), axis=1)[:, :3]]  # each row's top 3
    for k in (1, 7, K_MAX):
        scores, out = search(queries, tf.constant(k), tf.constant(history))
        _assert_matches_oracle(scores, out, queries, candidates, int_ids, k, exclude=history, padding=-1)
    assert len(traces) == 1


@pytest.mark.parametrize("kind", KINDS)
def test_k_out_of_range_is_rejected_with_its_value(kind):
    candidates, queries, _, _ = _data()
    index = _exact_index(kind).index(candidates)
    with pytest.raises(ValueError, match=r"k_max=20\], got k = 21"):
        index(queries, k=K_MAX + 1)
    with pytest.raises(ValueError, match=r"got k = 0"):
        index(queries, k=0)
    with pytest.raises(ValueError, match=r"got k = 21"):
        index(queries, k=tf.constant(K_MAX + 1))  # eager tensor: value known

    search = tf.function(
        lambda q, k: index(q, k=k),
        input_signature=[tf.TensorSpec([None, D], tf.float32), tf.TensorSpec([], tf.int32)],
    )
    assert search(queries, tf.constant(K_MAX))[0].shape == (B, K_MAX)
    for bad in (K_MAX + 1, 0, -3):
        with pytest.raises(tf.errors.InvalidArgumentError, match=rf"k_max=20\], got k =.*{bad}"):
            search(queries, tf.constant(bad))


# ---------------------------------------------------------------- exclusions and padding
@pytest.mark.parametrize("id_type", ["int", "string"])
@pytest.mark.parametrize("kind", KINDS)
def test_exclude_removes_the_given_identifiers(kind, id_type):
    candidates, queries, int_ids, string_ids = _data(seed=1)
    ids, padding = _ids(id_type, int_ids, string_ids)
    index = _exact_index(kind).index(candidates, ids)
    rng = np.random.default_rng(2)
    top = np.argsort(-(queries @ candidates.T), axis=1)
    # Each row: its 4 best items, 3 random ones, and 2 padding entries that must be ignored.
    rows = np.concatenate([top[:, :4], rng.integers(0, N, size=(B, 3))], axis=1)
    exclude = np.concatenate([ids[rows], np.full((B, 2), padding, dtype=ids.dtype)], axis=1)
    scores, out = index(queries, k=10, exclude=tf.constant(exclude))
    _assert_matches_oracle(scores, out, queries, candidates, ids, 10, exclude=exclude, padding=padding)


def test_exclude_padding_is_configurable():
    candidates, queries, _, _ = _data()
    queries[:, 0], candidates[0] = 1.0, [1000.0] + [0.0] * (D - 1)  # id 0 is everyone's best item
    zeros = tf.zeros([B, 3], tf.int64)
    _, default_padding = BruteForceIndex(k_max=5).index(candidates)(queries, exclude=zeros)
    assert not np.any(default_padding.numpy() == 0)  # 0 is a real id: excluded
    from_one = np.arange(1, len(candidates) + 1)  # the best item is id 1
    _, zero_padding = BruteForceIndex(k_max=5, exclude_padding=0).index(candidates, from_one)(queries, exclude=zeros)
    np.testing.assert_array_equal(zero_padding.numpy()[:, 0], 1)  # 0 means "nothing": excludes nothing
    # As documented, exclude_padding defaults to padding_identifier (it once fell back to -1).
    _, padded_by_default = BruteForceIndex(k_max=5, padding_identifier=0).index(candidates, from_one)(
        queries, exclude=zeros)
    np.testing.assert_array_equal(padded_by_default.numpy()[:, 0], 1)
    # A padding value that is also a candidate's id is refused: that candidate could never be
    # excluded, or would read as an empty slot (TFRS, without padding, had neither problem).
    for settings, name in [(dict(exclude_padding=0), "exclude_padding"), (dict(padding_identifier=0), "padding_identifier")]:
        with pytest.raises(ValueError, match=f"identifier 0 is also the {name}; give the index another {name}"):
            BruteForceIndex(k_max=5, **settings).index(candidates)
    with pytest.raises(ValueError, match="identifier '' is also the padding_identifier"):
        BruteForceIndex(k_max=5).index(candidates[:2], tf.constant(["a", ""]))


def test_unsigned_identifiers_beyond_int64_are_refused_not_wrapped():
    ids = np.array([2**63 + 5, 2, 3], np.uint64)
    with pytest.raises(ValueError, match=r"stored as int64; 9223372036854775813 does not fit"):
        BruteForceIndex(k_max=3).index(np.eye(3, dtype=np.float32), ids)
    index = BruteForceIndex(k_max=3).index(np.eye(3, dtype=np.float32), np.array([7, 2, 3], np.uint64))
    assert index(tf.constant([[1.0, 0.0, 0.0]]), k=1)[1].numpy().tolist() == [[7]]


@pytest.mark.parametrize("kind", KINDS)
def test_repeated_identifiers_are_refused_with_the_id(kind):
    candidates, _, _, _ = _data()
    ids = np.arange(len(candidates))
    ids[3] = ids[5] = ids[8] = 7
    # With repeats, an exclusion left empty slots: the over-fetch counts one row per id.
    with pytest.raises(ValueError, match="identifiers must be unique; 7 appears 4 times"):
        make_index(kind, k_max=5).index(candidates, ids)


@pytest.mark.parametrize("kind", KINDS)
def test_fewer_candidates_than_k_are_padded(kind):
    num = 16  # ScaNN's smallest catalogue (see test_scann_rejects_tiny_catalogues)
    candidates, queries, int_ids, string_ids = _data(num=num)
    index = _exact_index(kind).index(candidates, int_ids)
    scores, out = index(queries, k=19)
    _assert_matches_oracle(scores, out, queries, candidates, int_ids, 19, padding=-1)
    assert np.all(np.isneginf(scores.numpy()[:, num:])) and np.all(out.numpy()[:, num:] == -1)

    index = _exact_index(kind, padding_identifier="<none>").index(candidates, string_ids)
    exclude = string_ids[np.argsort(-(queries @ candidates.T), axis=1)[:, :2]]
    scores, out = index(queries, k=tf.constant(18), exclude=exclude)
    _assert_matches_oracle(
        scores, out, queries, candidates, string_ids, 18, exclude=exclude, padding="<none>"
    )
    assert np.sum(np.isfinite(scores.numpy()), axis=1).tolist() == [num - 2] * B


def test_scann_rejects_tiny_catalogues():
    with pytest.raises(ValueError, match="at least 16 candidates.*got 6"):
        _exact_index("scann").index(_data(num=6)[0])


# ---------------------------------------------------------------- partitioned specifics
def _clustered(seed=3, clusters=32, per_cluster=60, dims=16, queries=50):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dims))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    points = np.repeat(centres, per_cluster, axis=0) + 0.15 * rng.normal(size=(clusters * per_cluster, dims))
    points *= rng.uniform(0.5, 1.5, size=(len(points), 1))  # norms vary, as in MIPS
    query = centres[rng.integers(clusters, size=queries)] + 0.3 * rng.normal(size=(queries, dims))
    return points.astype(np.float32), query.astype(np.float32)


@pytest.mark.parametrize("spherical", [True, False])
def test_partitioned_recall_on_clustered_data(spherical):
    points, queries = _clustered()
    index = PartitionedIndex(num_partitions=32, num_probes=6, k_max=10, spherical=spherical).index(points)
    assert not index.is_exact()
    _, found = index(queries, k=10)
    truth = np.argsort(-(queries @ points.T), axis=1)[:, :10]
    recall = np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found.numpy(), truth)])
    assert recall > 0.9, recall
    # The CSR layout covers every candidate exactly once.
    offsets = index.partition_offsets.numpy()
    assert offsets[0] == 0 and offsets[-1] == len(points) and np.all(np.diff(offsets) > 0)
    assert sorted(index.item_order.numpy().tolist()) == list(range(len(points)))


@pytest.mark.parametrize("scoring_dtype", ["bfloat16", "int8"])
def test_compact_scoring_with_every_member_reordered_is_exact(scoring_dtype):
    candidates, queries, int_ids, _ = _data()
    index = PartitionedIndex(num_partitions=8, num_probes=8, k_max=K_MAX, scoring_dtype=scoring_dtype,
                             num_reordering_candidates=N).index(candidates, int_ids)
    assert index.is_exact()
    exclude = int_ids[:B, None].repeat(3, axis=1)
    _assert_matches_oracle(*index(queries, k=K_MAX, exclude=exclude), queries, candidates, int_ids, K_MAX,
                           exclude=exclude, padding=index.padding_identifier)


@pytest.mark.parametrize("scoring_dtype", ["bfloat16", "int8"])
def test_compact_scoring_finds_what_float32_scoring_finds_in_the_same_partitions(tmp_path, scoring_dtype):
    points, queries = _clustered()
    exact_scoring = PartitionedIndex(num_partitions=32, num_probes=6, k_max=10).index(points)
    coarse = PartitionedIndex(num_partitions=32, num_probes=6, k_max=10, scoring_dtype=scoring_dtype)
    coarse.index(points)
    assert not coarse.is_exact() and coarse.coarse_candidates.dtype == tf.as_dtype(scoring_dtype)
    reference_scores, reference = exact_scoring(queries, k=10)
    scores, found = coarse(queries, k=10)
    # Same seed, same partitions: the compact pass only pre-selects 4 * k_max members, whose
    # float32 rescoring must give the float32 answer.
    np.testing.assert_array_equal(found.numpy(), reference.numpy())
    np.testing.assert_allclose(scores.numpy(), reference_scores.numpy(), rtol=1e-6)

    config = coarse.get_config()
    assert config["scoring_dtype"] == scoring_dtype and config["num_reordering_candidates"] is None
    assert PartitionedIndex.from_config(config).get_config() == config

    search = _save(coarse, tmp_path, dimension=points.shape[1])
    loaded = tf.saved_model.load(str(tmp_path)).signatures["serving_default"]
    no_exclusions = tf.zeros([len(queries), 1], tf.int64)
    got = loaded(queries=tf.constant(queries), k=tf.constant(10), exclude=no_exclusions)
    expected = search(tf.constant(queries), tf.constant(10), no_exclusions)
    np.testing.assert_array_equal(got["identifiers"].numpy(), expected["identifiers"].numpy())
    assert not _saved_model_ops(tmp_path) - STOCK_OPS


def test_int8_codes_reconstruct_within_half_a_scale_per_dimension():
    rng = np.random.default_rng(3)
    embeddings = rng.normal(size=(500, 6)).astype(np.float32) * np.array([1, 10, 0.01, 3, 1, 0], np.float32)
    codes, scales = int8_codes(embeddings)
    assert codes.dtype == np.int8 and scales.dtype == np.float32
    # The largest magnitude of each non-zero dimension maps to +-127; an all-zero one to scale 1.
    np.testing.assert_allclose(scales[:5], np.abs(embeddings[:, :5]).max(axis=0) / 127, rtol=1e-6)
    assert scales[5] == 1.0 and not codes[:, 5].any() and np.abs(codes[:, :5]).max() == 127
    assert np.all(np.abs(codes * scales - embeddings) <= scales / 2 + 1e-6)
    np.testing.assert_array_equal(int8_codes(-embeddings)[0], -codes)  # symmetric


@pytest.mark.parametrize("arguments, message", [
    ({"scoring_dtype": "float16"}, "scoring_dtype must be one of ['float32', 'bfloat16', 'int8'], got 'float16'"),
    ({"num_reordering_candidates": 0}, "num_reordering_candidates must be an integer >= 1 or None, got 0"),
    ({"soar_lambda": -0.5}, "soar_lambda must be a number in [0.0, inf), got -0.5"),
])
def test_partitioned_rejects_bad_scoring_settings(arguments, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        PartitionedIndex(**arguments)


@pytest.mark.parametrize("kind, arguments, message", [
    # Options of the wrong type once failed with "'<' not supported between 'str' and 'int'", or
    # were quietly changed: 2.5 partitions became 2, spherical="false" became True.
    ("partitioned", {"num_partitions": "abc"}, "num_partitions must be an integer >= 1, got 'abc'"),
    ("partitioned", {"num_partitions": 2.5}, "num_partitions must be an integer >= 1, got 2.5"),
    ("partitioned", {"num_probes": 1.9}, "num_probes must be an integer >= 1, got 1.9"),
    ("partitioned", {"spherical": "false"}, "spherical must be true or false, got 'false'"),
    ("partitioned", {"kmeans_iterations": "5"}, "kmeans_iterations must be an integer >= 0, got '5'"),
    ("partitioned", {"training_sample_size": 10.5}, "training_sample_size must be an integer >= 1 or None, got 10.5"),
    ("partitioned", {"soar_lambda": "high"}, "soar_lambda must be a number in [0.0, inf), got 'high'"),
    ("scann", {"num_leaves": 7.5}, "num_leaves must be an integer >= 1, got 7.5"),
    ("scann", {"num_leaves_to_search": "abc"}, "num_leaves_to_search must be an integer >= 1, got 'abc'"),
    ("scann", {"num_reordering_candidates": "all"}, "num_reordering_candidates must be an integer >= 1 or None, got 'all'"),
    ("scann", {"parallelize_batch_searches": "yes"}, "parallelize_batch_searches must be true or false, got 'yes'"),
    ("soft_search", {"temperature": "hot"}, "temperature must be a number in (0.0, inf), got 'hot'"),
    ("soft_search", {"num_interests": 2.0}, "num_interests must be an integer >= 1, got 2.0"),
])
def test_index_options_of_the_wrong_type_are_named(kind, arguments, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        make_index(kind, **arguments)


def test_kmeans_is_deterministic_and_reseeds_empty_clusters():
    points, _ = _clustered()
    a = kmeans(points, 16, seed=5)
    np.testing.assert_array_equal(a, kmeans(points, 16, seed=5))
    assert not np.array_equal(a, kmeans(points, 16, seed=6))
    # Only 3 distinct points for 6 clusters: clusters go empty, are re-seeded, and the index
    # drops whatever stays empty but still finds everything.
    few = np.repeat(np.eye(3, 4, dtype=np.float32), 5, axis=0)
    index = PartitionedIndex(num_partitions=6, num_probes=6, k_max=4).index(few)
    assert index.centroids.numpy().shape[0] <= 3
    scores, _ = index(np.ones([1, 4], np.float32), k=4)
    np.testing.assert_allclose(scores.numpy(), [[1, 1, 1, 1]])


def test_subpartitions_refine_each_partition_and_stay_exact_when_all_are_probed():
    points, queries = _clustered()
    two_level = PartitionedIndex(num_partitions=8, subpartitions=4, num_probes=12, k_max=10).index(points)
    sizes = np.diff(two_level.partition_offsets.numpy())
    assert 8 < len(sizes) <= 32 and sizes.sum() == len(points)
    # Every sub-partition lies inside one first-level partition: same points, same coarse split.
    coarse = PartitionedIndex(num_partitions=8, num_probes=8, k_max=10).index(points)
    coarse_of = np.empty(len(points), np.int64)
    coarse_of[coarse.item_order.numpy()] = np.repeat(np.arange(8), np.diff(coarse.partition_offsets.numpy()))
    for start, stop in zip(two_level.partition_offsets.numpy()[:-1], two_level.partition_offsets.numpy()[1:]):
        assert len(set(coarse_of[two_level.item_order.numpy()[start:stop]])) == 1
    assert not two_level.is_exact()
    _, found = two_level(queries, k=10)
    truth = np.argsort(-(queries @ points.T), axis=1)[:, :10]
    assert np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found.numpy(), truth)]) > 0.9

    candidates, queries, int_ids, _ = _data()
    exact = PartitionedIndex(num_partitions=4, subpartitions=3, num_probes=12, k_max=K_MAX).index(candidates, int_ids)
    assert exact.is_exact()
    _assert_matches_oracle(*exact(queries, k=K_MAX), queries, candidates, int_ids, K_MAX, padding=-1)
    config = exact.get_config()
    assert config["subpartitions"] == 3 and PartitionedIndex.from_config(config).get_config() == config
    with pytest.raises(ValueError, match="subpartitions must be an integer >= 1, got 0"):
        PartitionedIndex(subpartitions=0)
    with pytest.raises(ValueError, match="parent_probes must be an integer >= 1 or None, got 0"):
        PartitionedIndex(parent_probes=0)


def test_parent_probes_choose_probes_among_the_best_parents_sub_partitions(tmp_path):
    candidates, queries, int_ids, _ = _data()
    every_parent = PartitionedIndex(num_partitions=4, subpartitions=3, num_probes=12, parent_probes=4,
                                    k_max=K_MAX).index(candidates, int_ids)
    assert every_parent.is_exact()
    _assert_matches_oracle(*every_parent(queries, k=K_MAX), queries, candidates, int_ids, K_MAX, padding=-1)
    assert not PartitionedIndex(num_partitions=4, subpartitions=3, num_probes=12, parent_probes=3).is_exact()

    points, queries = _clustered()
    flat = PartitionedIndex(num_partitions=16, subpartitions=4, num_probes=8, k_max=10).index(points)
    index = PartitionedIndex(num_partitions=16, subpartitions=4, num_probes=8, parent_probes=3, k_max=10)
    index.index(points)
    # Same seeds, same partitions: only the choice of probes differs, and from the 3 best
    # parents' sub-partitions it nearly always matches the choice among all of them.
    np.testing.assert_array_equal(index.centroids.numpy(), flat.centroids.numpy())
    parents = np.argsort(-(queries @ index.parent_centroids.numpy().T), axis=1)[:, :3]
    offsets = index.parent_offsets.numpy()
    members = index.partition_offsets.numpy()
    _, found = index(queries, k=10)
    for row, ids in enumerate(found.numpy()):
        allowed = {int(i) for p in parents[row] for sub in range(offsets[p], offsets[p + 1])
                   for i in index.item_order.numpy()[members[sub]:members[sub + 1]]}
        assert set(ids.tolist()) <= allowed  # never outside the probed parents
    truth = np.argsort(-(queries @ points.T), axis=1)[:, :10]
    recall = np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found.numpy(), truth)])
    _, flat_found = flat(queries, k=10)
    flat_recall = np.mean([len(set(f) & set(t)) / 10 for f, t in zip(flat_found.numpy(), truth)])
    assert recall > 0.8 and recall >= flat_recall - 0.05, (recall, flat_recall)
    config = index.get_config()
    assert config["parent_probes"] == 3 and PartitionedIndex.from_config(config).get_config() == config

    search = _save(index, tmp_path, dimension=points.shape[1])
    loaded = tf.saved_model.load(str(tmp_path)).signatures["serving_default"]
    no_exclusions = tf.zeros([len(queries), 1], tf.int64)
    for rows in (slice(0, 1), slice(0, len(queries))):  # the one-query path and the batch path
        got = loaded(queries=tf.constant(queries[rows]), k=tf.constant(10), exclude=no_exclusions[rows])
        np.testing.assert_array_equal(got["identifiers"].numpy(), found.numpy()[rows])
        expected = search(tf.constant(queries[rows]), tf.constant(10), no_exclusions[rows])
        np.testing.assert_array_equal(got["identifiers"].numpy(), expected["identifiers"].numpy())
    assert not _saved_model_ops(tmp_path) - STOCK_OPS


@pytest.mark.parametrize("scoring_dtype,two_level,soar_lambda",
                         [("float32", False, None), ("bfloat16", False, None), ("int8", False, None),
                          ("float32", True, None), ("int8", True, None), ("float32", False, 1.0),
                          ("int8", True, 1.0)])
def test_a_single_query_gets_the_answer_it_gets_inside_a_batch(scoring_dtype, two_level, soar_lambda):
    # One query takes the unpadded path, a batch the padded one: they must agree, also when the
    # probed partitions hold fewer members than k and with exclusions.
    points, queries = _clustered()
    levels = {"num_partitions": 8, "subpartitions": 4, "parent_probes": 2} if two_level else {"num_partitions": 32}
    index = PartitionedIndex(num_probes=2, k_max=200, scoring_dtype=scoring_dtype, num_reordering_candidates=40,
                             soar_lambda=soar_lambda, **levels).index(points)
    search = tf.function(lambda q, k, exclude: index(q, k=k, exclude=exclude),
                         input_signature=[tf.TensorSpec([None, points.shape[1]]), tf.TensorSpec([], tf.int32),
                                          tf.TensorSpec([None, None], tf.int64)])
    exclude = np.argsort(-(queries @ points.T), axis=1)[:, :3]  # each query's 3 best
    for k in (10, 200):
        batch_scores, batch_ids = search(tf.constant(queries), tf.constant(k), tf.constant(exclude))
        assert np.any(batch_ids.numpy()[:, -1] == -1) == (k == 200)  # 2 partitions hold < 200 members
        for row in range(len(queries)):
            scores, ids = search(tf.constant(queries[row : row + 1]), tf.constant(k),
                                 tf.constant(exclude[row : row + 1]))
            np.testing.assert_array_equal(ids.numpy()[0], batch_ids.numpy()[row])
            # Mat-mul and batched mat-vec may round the last bit differently.
            np.testing.assert_allclose(scores.numpy()[0], batch_scores.numpy()[row], rtol=1e-5, atol=1e-6)
            assert not set(exclude[row]) & set(ids.numpy()[0].tolist())
    assert search.experimental_get_tracing_count() == 1


def _residual_cost(points, centroids, primary, soar_lambda):
    """SOAR's cost of every (point, partition) pair, straight from its definition."""
    residual = points - centroids[primary]
    unit = residual / np.linalg.norm(residual, axis=1, keepdims=True)
    to = points[:, None, :] - centroids[None, :, :]  # x - c' for every c'
    cost = np.sum(to**2, axis=2) + soar_lambda * np.einsum("nd,npd->np", unit, to) ** 2
    cost[np.arange(len(points)), primary] = np.inf
    return cost


@pytest.mark.parametrize("soar_lambda", [0.0, 1.0, 8.0])
def test_soar_assignment_minimises_its_cost_over_the_other_partitions(soar_lambda):
    points, _ = _clustered(queries=1)
    centroids = kmeans(points, 12, seed=1)
    primary = np.argmax(points @ centroids.T, axis=1)
    second = soar_assignment(points, centroids, primary, soar_lambda)
    expected = np.argmin(_residual_cost(points, centroids, primary, soar_lambda), axis=1)
    np.testing.assert_array_equal(second, expected)
    assert not np.any(second == primary)
    if soar_lambda == 0.0:  # no orthogonality term: the second-nearest partition
        distances = np.sum((points[:, None] - centroids[None]) ** 2, axis=2)
        np.testing.assert_array_equal(second, np.argsort(distances, axis=1)[:, 1])
    # One partition: nowhere else to go.
    np.testing.assert_array_equal(soar_assignment(points, centroids[:1], np.zeros(len(points), int), 1.0), -1)


def test_soar_assignment_with_two_levels_searches_the_nearest_parents_partitions():
    points, _ = _clustered(queries=1)
    parents = kmeans(points, 6, seed=1)
    children = kmeans(points, 24, seed=2)
    parent_of = np.argmax(children @ parents.T, axis=1)
    children, parent_of = children[np.argsort(parent_of, kind="stable")], np.sort(parent_of)
    offsets = np.searchsorted(parent_of, np.arange(len(parents) + 1))
    primary = np.argmax(points @ children.T, axis=1)
    second = soar_assignment(points, children, primary, 1.0, parents, offsets, parents_searched=2)
    cost = _residual_cost(points, children, primary, 1.0)
    nearest_parents = np.argsort(-(points @ parents.T), axis=1)[:, :2]
    allowed = (parent_of[None, None, :] == nearest_parents[:, :, None]).any(axis=1)  # [N, 24]
    expected = np.argmin(np.where(allowed, cost, np.inf), axis=1)
    has_other = np.isfinite(np.where(allowed, cost, np.inf).min(axis=1))
    np.testing.assert_array_equal(second, np.where(has_other, expected, -1))


@pytest.mark.parametrize("scoring_dtype", SCORING_DTYPES)
@pytest.mark.parametrize("two_level", [False, True])
def test_spilled_index_probing_everything_matches_the_oracle_once_per_candidate(scoring_dtype, two_level):
    candidates, queries, int_ids, _ = _data()
    levels = {"subpartitions": 2, "parent_probes": 8} if two_level else {}
    index = PartitionedIndex(num_partitions=8, num_probes=16, k_max=K_MAX, scoring_dtype=scoring_dtype,
                             num_reordering_candidates=2 * N, soar_lambda=1.0, **levels).index(candidates, int_ids)
    assert index.is_exact()
    # Every candidate is listed twice, in two different partitions.
    offsets, listed = index.partition_offsets.numpy(), index.listed_rows.numpy()
    assert offsets[-1] == 2 * N and np.all(np.bincount(listed, minlength=N) == 2)
    partition_of_entry = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    assert len(set(zip(partition_of_entry, listed))) == 2 * N
    exclude = int_ids[:B, None].repeat(3, axis=1)
    for rows in (slice(0, B), slice(0, 1)):
        scores, ids = index(queries[rows], k=K_MAX, exclude=exclude[rows])
        _assert_matches_oracle(scores, ids, queries[rows], candidates, int_ids, K_MAX, exclude=exclude[rows],
                               padding=index.padding_identifier)
    # With only the best 4 * k_max entries rescored, int8 and bfloat16 are no longer exact.
    if scoring_dtype != "float32":
        assert not PartitionedIndex(num_partitions=8, num_probes=16, scoring_dtype=scoring_dtype, soar_lambda=1.0,
                                    k_max=K_MAX, **levels).index(candidates).is_exact()


def test_spilling_finds_more_with_the_same_probes_and_exports_with_stock_ops(tmp_path):
    points, queries = _clustered()
    truth = np.argsort(-(queries @ points.T), axis=1)[:, :10]

    def recall(index):
        found = index(queries, k=10)[1].numpy()
        assert all(len(set(row)) == len(row) for row in found)  # no candidate twice
        return np.array([len(set(f) & set(t)) / 10 for f, t in zip(found, truth)])

    plain = PartitionedIndex(num_partitions=32, num_probes=2, k_max=10).index(points)
    spilled = PartitionedIndex(num_partitions=32, num_probes=2, k_max=10, soar_lambda=1.0).index(points)
    # Same seed, same partitions, each also listing spilled candidates: a superset is scored.
    assert np.all(recall(spilled) >= recall(plain)) and recall(spilled).mean() > recall(plain).mean() + 0.02
    spilled = PartitionedIndex(num_partitions=32, num_probes=2, k_max=10, soar_lambda=1.0,
                               scoring_dtype="int8").index(points)
    assert recall(spilled).mean() > recall(plain).mean()
    config = spilled.get_config()
    assert config["soar_lambda"] == 1.0 and PartitionedIndex.from_config(config).get_config() == config
    search = _save(spilled, tmp_path, dimension=points.shape[1])
    loaded = tf.saved_model.load(str(tmp_path)).signatures["serving_default"]
    no_exclusions = tf.zeros([len(queries), 1], tf.int64)
    for rows in (slice(None), slice(0, 1)):
        got = loaded(queries=tf.constant(queries[rows]), k=tf.constant(10), exclude=no_exclusions[rows])
        expected = search(tf.constant(queries[rows]), tf.constant(10), no_exclusions[rows])
        np.testing.assert_array_equal(got["identifiers"].numpy(), expected["identifiers"].numpy())
        np.testing.assert_array_equal(got["scores"].numpy(), expected["scores"].numpy())
    assert not _saved_model_ops(tmp_path) - STOCK_OPS


def test_partitioned_caps_partitions_and_probes_at_catalogue_size():
    candidates, queries, _, _ = _data(num=5)
    index = PartitionedIndex(num_partitions=50, num_probes=80, k_max=5).index(candidates)
    assert index.centroids.numpy().shape[0] <= 5
    # 80 probes cover the <= 5 partitions actually built, though not 50 * 2 configured ones.
    two_level = PartitionedIndex(num_partitions=50, subpartitions=2, num_probes=80, k_max=5)
    assert not two_level.is_exact() and two_level.index(candidates).is_exact()
    _assert_matches_oracle(*index(queries, k=5), queries, candidates, np.arange(5), 5, padding=-1)


@pytest.mark.parametrize("kind", ["brute_force", "partitioned"])
def test_reindexing_with_another_size_keeps_traced_functions_working(kind):
    index = _exact_index(kind)
    candidates, queries, int_ids, _ = _data(num=100)
    index.index(candidates, int_ids)
    search = tf.function(
        lambda q, k: index(q, k=k),
        input_signature=[tf.TensorSpec([None, D], tf.float32), tf.TensorSpec([], tf.int32)],
    )
    _assert_matches_oracle(*search(queries, tf.constant(5)), queries, candidates, int_ids, 5, padding=-1)
    variables_before = len(index.weights)
    candidates, queries, int_ids, _ = _data(seed=4, num=170)
    index.index(candidates, int_ids)
    assert len(index.weights) == variables_before
    _assert_matches_oracle(*search(queries, tf.constant(5)), queries, candidates, int_ids, 5, padding=-1)
    assert search.experimental_get_tracing_count() == 1


@contextlib.contextmanager
def _reindex_held_mid_write(monkeypatch, index, candidates, identifiers):
    """Runs ``index.index(candidates, identifiers)`` in another thread and holds it, until the
    block ends, where a concurrent query met mixed state: the kind's new state stored, the
    identifiers and sizes not yet (the seam: ``RetrievalIndex._set_catalogue``)."""
    held, release = threading.Event(), threading.Event()
    set_catalogue = RetrievalIndex._set_catalogue

    def holding(self, *args):
        if self is index and not held.is_set():
            held.set()
            release.wait(30)
        set_catalogue(self, *args)

    monkeypatch.setattr(RetrievalIndex, "_set_catalogue", holding)
    writer = threading.Thread(target=index.index, args=(candidates, identifiers))
    writer.start()
    assert held.wait(30), "index() never reached its write"
    try:
        yield
    finally:
        release.set()
        writer.join(30)


def _two_catalogues():
    """(candidates, queries, ids) of a first catalogue and a smaller second one, ids distinct."""
    first, queries, first_ids, _ = _data(num=100)
    second, _, second_ids, _ = _data(seed=4, num=60)
    return (first, first_ids), (second, second_ids + 5000), queries


@pytest.mark.parametrize("kind", KINDS)
def test_an_eager_query_during_a_reindex_answers_from_one_catalogue(kind, monkeypatch):
    """index() stored the kind's state, then the identifiers: a query in between answered the new
    catalogue's scores under the old one's identifiers. It now waits for the write to end."""
    (first, first_ids), (second, second_ids), queries = _two_catalogues()
    index = _exact_index(kind).index(first, first_ids)
    answers = []
    with _reindex_held_mid_write(monkeypatch, index, second, second_ids):
        query = threading.Thread(target=lambda: answers.append(index(queries, k=5)))
        query.start()
        query.join(0.5)  # it answered here, from mixed state; now it waits for the write
    query.join(30)
    assert len(answers) == 1, "the query failed"
    _assert_matches_oracle(*answers[0], queries, second, second_ids, 5)


@pytest.mark.parametrize("kind", ["brute_force", "partitioned"])
def test_a_traced_query_overlapping_a_reindex_fails_saying_so_and_later_ones_answer(kind, monkeypatch):
    """A function traced before a re-index answered mixed state while index() wrote, silently
    wrong; it now fails, saying to run the query again, and answers once the write has ended."""
    (first, first_ids), (second, second_ids), queries = _two_catalogues()
    index = _exact_index(kind).index(first, first_ids)
    search = tf.function(lambda q: index(q, k=5))
    _assert_matches_oracle(*search(queries), queries, first, first_ids, 5)
    with _reindex_held_mid_write(monkeypatch, index, second, second_ids):
        with pytest.raises(tf.errors.InvalidArgumentError,
                           match=r"index\(\) rewrote the index while this query read it; run the query again"):
            search(queries)
    _assert_matches_oracle(*search(queries), queries, second, second_ids, 5)
    assert search.experimental_get_tracing_count() == 1


def test_the_write_counter_is_no_weight_and_indexes_still_copy():
    """The counter the traced check reads is no Keras weight (.h5 files go by position), and the
    lock held by writes and eager calls does not stop deepcopy or pickle."""
    (first, first_ids), _, queries = _two_catalogues()
    index = BruteForceIndex(k_max=K_MAX).index(first, first_ids)
    tf.function(lambda q: index(q, k=5))(queries)
    assert [weight.name.split("/")[-1].split(":")[0] for weight in index.weights] == ["candidates", "identifiers"]
    for copied in (copy.deepcopy(index), pickle.loads(pickle.dumps(index))):
        _assert_matches_oracle(*copied(queries, k=5), queries, first, first_ids, 5)


# ---------------------------------------------------------------- interface details
def test_is_exact_reflects_the_configuration():
    candidates = _data()[0]
    assert BruteForceIndex().is_exact()
    assert not PartitionedIndex(num_partitions=8, num_probes=2).is_exact()
    assert PartitionedIndex(num_partitions=8, num_probes=8).is_exact()
    assert not ScaNNIndex(num_leaves=4, num_leaves_to_search=4, num_reordering_candidates=512).is_exact()
    assert not ScaNNIndex(num_leaves=4, num_leaves_to_search=2, k_max=5).index(candidates).is_exact()
    assert not ScaNNIndex(num_leaves=4, num_leaves_to_search=4, k_max=5).index(candidates).is_exact()
    assert _exact_index("scann").index(candidates).is_exact()


def test_registry_and_make_index():
    # sparse_code and soft_search take other queries; their own test modules cover them.
    assert set(INDEX_KINDS) == set(KINDS) | {"sparse_code", "soft_search"}
    assert all(issubclass(cls, RetrievalIndex) for cls in INDEX_KINDS.values())
    assert isinstance(make_index("partitioned", num_partitions=4, num_probes=2), PartitionedIndex)
    with pytest.raises(ValueError, match=r"unknown index kind 'annoy'.*brute_force"):
        make_index("annoy")
    # A misspelt option (`--index-option num_partition=10`) was Keras' bare "Keyword argument
    # not understood", a traceback from the command line.
    with pytest.raises(ValueError, match=r"index kind 'partitioned' takes no option 'num_partition'; "
                                         r"its options: .*num_partitions"):
        make_index("partitioned", num_partition=10)
    with pytest.raises(ValueError, match=r"index kind 'soft_search' takes no option 'interests'"):
        make_index("soft_search", interests=2)
    with pytest.raises(ValueError, match=r"index kind 'brute_force' takes no option 'num_probes'"):
        make_index("soft_search", base="brute_force", base_options={"num_probes": 3})
    assert make_index("soft_search", base="partitioned", num_interests=2, k=5, name="s",
                      base_options={"num_partitions": 4}).base.num_partitions == 4


@pytest.mark.parametrize("kind", KINDS)
def test_get_config_round_trip(kind):
    index = _exact_index(kind, k=7, padding_identifier="none", exclude_padding="pad", name="my_index")
    config = index.get_config()
    json.dumps(config)  # plain values only
    clone = INDEX_KINDS[kind].from_config(config)
    assert type(clone) is type(index) and clone.get_config() == config
    assert config["k"] == 7 and config["k_max"] == K_MAX and config["padding_identifier"] == "none"


def test_index_from_dataset_matches_index():
    candidates, queries, int_ids, _ = _data()
    expected = BruteForceIndex(k_max=5).index(candidates, int_ids)(queries)
    pairs = tf.data.Dataset.from_tensor_slices((int_ids, candidates)).batch(64)
    from_pairs = BruteForceIndex(k_max=5).index_from_dataset(pairs)(queries)
    np.testing.assert_array_equal(from_pairs[1].numpy(), expected[1].numpy())
    plain = tf.data.Dataset.from_tensor_slices(candidates).batch(64)
    partitioned = PartitionedIndex(num_partitions=4, num_probes=4, k_max=5)
    _, positions = partitioned.index_from_dataset(plain)(queries)
    np.testing.assert_array_equal(int_ids[positions.numpy()], expected[1].numpy())
    with pytest.raises(ValueError, match="tuples"):
        BruteForceIndex().index_from_dataset(tf.data.Dataset.from_tensors((int_ids, candidates, candidates)))


def test_bad_arguments_are_reported_with_their_values():
    candidates, queries, int_ids, _ = _data()
    with pytest.raises(ValueError, match="k_max must be an integer >= 1, got 0"):
        BruteForceIndex(k_max=0)
    with pytest.raises(ValueError, match=r"k must be an integer in \[1, k_max=5\], got 6"):
        BruteForceIndex(k_max=5, k=6)
    with pytest.raises(ValueError, match="num_probes must be an integer >= 1, got 0"):
        PartitionedIndex(num_probes=0)
    with pytest.raises(ValueError, match="num_reordering_candidates must be >= k_max=100.*got 50"):
        ScaNNIndex(num_reordering_candidates=50)
    index = BruteForceIndex(k_max=5)
    with pytest.raises(ValueError, match="index\\(\\) must be called"):
        index(queries)
    with pytest.raises(ValueError, match=r"\[N, d\] matrix, got shape \(300,\)"):
        index.index(candidates[:, 0])
    with pytest.raises(ValueError, match=r"at least one row, got shape \(0, 8\)"):
        index.index(candidates[:0])
    with pytest.raises(ValueError, match=r"one entry per candidate \(\[300\]\), got shape \(299,\)"):
        index.index(candidates, int_ids[:-1])
    with pytest.raises(TypeError, match="integers or strings, got dtype float32"):
        index.index(candidates, int_ids.astype(np.float32))
    with pytest.raises(TypeError, match="padding_identifier must be a string.*got -1"):
        BruteForceIndex(padding_identifier=-1).index(candidates, np.array(["a"] * N))
    index.index(candidates, int_ids)
    with pytest.raises(ValueError, match="queries have 3 columns but the indexed candidates have 8"):
        index(queries[:, :3])
    with pytest.raises(TypeError, match="exclude must hold integer identifiers.*string"):
        index(queries, exclude=tf.constant([["a"]] * B))
    with pytest.raises(ValueError, match="exclude has 2 rows but there are 5 queries"):
        index(queries, exclude=tf.zeros([2, 1], tf.int64))


# ---------------------------------------------------------------- SavedModel and portability
def _save(index, path, dimension=D, id_dtype=tf.int64):
    module = tf.Module()
    module.index = index

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, dimension], tf.float32, name="queries"),
            tf.TensorSpec([], tf.int32, name="k"),
            tf.TensorSpec([None, None], id_dtype, name="exclude"),
        ]
    )
    def search(queries, k, exclude):
        scores, identifiers = index(queries, k=k, exclude=exclude)
        return {"scores": scores, "identifiers": identifiers}

    module.search = search
    # ScaNN's ops live in the "Scann" namespace, which SavedModel refuses unless whitelisted.
    options = None
    if isinstance(index, ScaNNIndex):
        options = tf.saved_model.SaveOptions(namespace_whitelist=["Scann"])
    tf.saved_model.save(module, str(path), signatures={"serving_default": search}, options=options)
    return search


def _saved_model_ops(path):
    """Op types used anywhere in a SavedModel's graphs, function library included."""
    saved_model = saved_model_pb2.SavedModel()
    saved_model.ParseFromString((path / "saved_model.pb").read_bytes())
    ops = set()
    for meta_graph in saved_model.meta_graphs:
        library = meta_graph.graph_def.library
        functions = {function.signature.name for function in library.function}
        ops |= {node.op for node in meta_graph.graph_def.node}
        for function in library.function:
            ops |= {node.op for node in function.node_def}
        ops -= functions  # calls of library functions by name
    return ops


STOCK_OPS = frozenset(name for name in dir(tf.raw_ops) if not name.startswith("_"))


@pytest.mark.parametrize("kind", KINDS)
def test_saved_model_reloads_with_identical_results_and_only_expected_ops(kind, tmp_path):
    candidates, queries, int_ids, _ = _data()
    if kind == "partitioned":  # approximate on purpose: reload must reproduce it exactly
        index = PartitionedIndex(num_partitions=8, num_probes=3, k_max=K_MAX)
    else:
        index = _exact_index(kind)
    index.index(candidates, int_ids)
    search = _save(index, tmp_path)
    loaded = tf.saved_model.load(str(tmp_path))
    history = tf.constant(int_ids[:B, None].repeat(2, axis=1))
    for k in (1, 10, K_MAX):
        expected = search(queries, tf.constant(k), history)
        for function in (loaded.search, loaded.signatures["serving_default"]):
            got = function(queries=queries, k=tf.constant(k), exclude=history)
            np.testing.assert_array_equal(got["identifiers"].numpy(), expected["identifiers"].numpy())
            np.testing.assert_array_equal(got["scores"].numpy(), expected["scores"].numpy())
    with pytest.raises(tf.errors.InvalidArgumentError, match="got k ="):
        loaded.search(queries=queries, k=tf.constant(K_MAX + 1), exclude=history)

    ops = _saved_model_ops(tmp_path)
    assert "TopKV2" in ops and (kind == "scann" or "MatMul" in ops)
    non_stock = ops - STOCK_OPS
    if kind == "scann":
        assert non_stock and all(op.startswith("Scann>") for op in non_stock), non_stock
    else:
        assert not non_stock, f"ops outside stock TensorFlow: {sorted(non_stock)}"


def test_portable_exports_answer_in_a_process_that_imports_only_tensorflow(tmp_path):
    candidates, queries, _, string_ids = _data()
    history = string_ids[:B, None]
    expected = {}
    for kind, index in [
        ("brute_force", BruteForceIndex(k_max=K_MAX)),
        ("partitioned", PartitionedIndex(num_partitions=8, num_probes=3, k_max=K_MAX)),
        ("partitioned_spilled_int8", PartitionedIndex(num_partitions=8, num_probes=3, k_max=K_MAX, soar_lambda=1.0,
                                                      scoring_dtype="int8")),
    ]:
        index.index(candidates, string_ids)
        search = _save(index, tmp_path / kind, id_dtype=tf.string)
        result = search(queries, tf.constant(7), tf.constant(history))
        expected[kind] = [x.decode() for x in result["identifiers"].numpy().ravel()]
    np.save(tmp_path / "queries.npy", queries)
    script = textwrap.dedent(
        f"""
        import json, sys
        import numpy as np
        import tensorflow as tf
        queries = np.load({str(tmp_path / "queries.npy")!r})
        history = tf.constant({history.tolist()!r})
        out = {{}}
        for kind in ("brute_force", "partitioned", "partitioned_spilled_int8"):
            serve = tf.saved_model.load({str(tmp_path)!r} + "/" + kind).signatures["serving_default"]
            result = serve(queries=tf.constant(queries), k=tf.constant(7), exclude=history)
            out[kind] = [x.decode() for x in result["identifiers"].numpy().ravel()]
        assert not any(name.startswith(("tfx_xmatch", "tensorflow_recommenders", "scann", "tf_keras"))
                       for name in sys.modules), "imported more than TensorFlow"
        print(json.dumps(out))
        """
    )
    # tfx_xmatch set TF_USE_LEGACY_KERAS in this process; a plain TF process must not inherit it
    # (with it, importing TensorFlow imports tf_keras).
    env = {name: value for name, value in os.environ.items() if name != "TF_USE_LEGACY_KERAS"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    completed = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert json.loads(completed.stdout.strip().splitlines()[-1]) == expected


# ---------------------------------------------------------------- Keras files, and bad catalogues
def _keras_kinds():
    from tfx_xmatch.index import SoftSearchIndex, SparseCodeIndex

    return {
        "brute_force": lambda: BruteForceIndex(k_max=K_MAX),
        "partitioned": lambda: PartitionedIndex(num_partitions=8, num_probes=3, k_max=K_MAX),
        "partitioned_bfloat16": lambda: PartitionedIndex(num_partitions=8, num_probes=3, k_max=K_MAX,
                                                         scoring_dtype="bfloat16", num_reordering_candidates=40),
        "sparse_code": lambda: SparseCodeIndex(k_max=K_MAX, max_items_per_code=40),
        "soft_search": lambda: SoftSearchIndex(PartitionedIndex(num_partitions=8, num_probes=3, k_max=K_MAX),
                                               num_interests=1, k_max=K_MAX),
    }


@pytest.mark.parametrize("ids", ["int", "string"])
@pytest.mark.parametrize("extension", ["", ".keras"], ids=["savedmodel", "keras"])
@pytest.mark.parametrize("kind", ["brute_force", "partitioned", "partitioned_bfloat16", "sparse_code", "soft_search"])
def test_an_index_in_a_keras_model_survives_save_and_load_model(kind, extension, ids, tmp_path):
    """A .keras file lost every kind's catalogue (its variables exist only after index(), so
    Keras had none to fill): the reloaded model said "index() must be called". Keras' SavedModel
    loader lost the soft search's item width."""
    candidates, queries, int_ids, string_ids = _data()
    candidates = np.maximum(candidates, 0.0) if kind == "sparse_code" else candidates  # codes are ReLU outputs
    queries = np.maximum(queries, 0.0) if kind == "sparse_code" else queries
    index = _keras_kinds()[kind]().index(candidates, int_ids if ids == "int" else string_ids)
    shape = (1, D) if kind == "soft_search" else (D,)
    inputs = tf.keras.Input(shape)
    scores, found = index(inputs, k=7)
    model = tf.keras.Model(inputs, {"scores": scores, "ids": found})
    batch = queries[:, None, :] if kind == "soft_search" else queries
    expected = model(batch)
    model.save(str(tmp_path / f"model{extension}"))
    reloaded = tf.keras.models.load_model(str(tmp_path / f"model{extension}"))
    answer = reloaded(batch)
    np.testing.assert_array_equal(answer["ids"].numpy(), expected["ids"].numpy())
    np.testing.assert_allclose(answer["scores"].numpy(), expected["scores"].numpy(), rtol=1e-6)
    if extension == ".keras":
        restored = next(layer for layer in reloaded.layers if isinstance(layer, RetrievalIndex))
        assert (restored.is_exact(), restored.num_candidates, restored.dimension) == (
            index.is_exact(), index.num_candidates, index.dimension)


@pytest.mark.parametrize("kind", ["brute_force", "partitioned", "sparse_code", "soft_search"])
def test_weights_copied_by_position_fill_the_same_variables_of_an_index_rebuilt_from_its_config(kind, tmp_path):
    """index() made the state in each kind's own order, from_config in name order, so
    set_weights(get_weights()) and an .h5 weight file (both by position) scrambled a
    SparseCodeIndex ("Ragged splits must not point past values") and a PartitionedIndex refused
    them ("weight shape (None, None) is not compatible with provided weight shape (50,)")."""
    candidates, queries, int_ids, _ = _data()
    candidates = np.maximum(candidates, 0.0) if kind == "sparse_code" else candidates
    queries = np.maximum(queries, 0.0) if kind == "sparse_code" else queries
    batch = queries[:, None, :] if kind == "soft_search" else queries
    index = _keras_kinds()[kind]().index(candidates, int_ids)
    expected = [tensor.numpy() for tensor in index(batch, k=7)]
    clone = type(index).from_config(index.get_config())
    clone.set_weights(index.get_weights())
    for got, want in zip(clone(batch, k=7), expected):
        np.testing.assert_array_equal(got.numpy(), want)
    inputs = tf.keras.Input((1, D) if kind == "soft_search" else (D,))
    scores, found = index(inputs, k=7)
    model = tf.keras.Model(inputs, {"scores": scores, "ids": found})
    model.save_weights(str(tmp_path / "index.h5"))
    rebuilt = tf.keras.Model.from_config(model.get_config())
    rebuilt.load_weights(str(tmp_path / "index.h5"))
    np.testing.assert_array_equal(rebuilt(batch)["ids"].numpy(), expected[1])


def test_indexes_list_their_weights_in_the_order_h5_files_written_before_hold_them():
    """.h5 weight files and set_weights go by position: listing the state in another order made
    files written by earlier versions load scrambled (SparseCodeIndex) or not at all."""
    candidates, _, int_ids, _ = _data()
    names = lambda index: [weight.name.split("/")[-1].split(":")[0] for weight in index.weights]
    partitioned = PartitionedIndex(num_partitions=8, num_probes=3, k_max=K_MAX).index(candidates, int_ids)
    assert names(partitioned) == ["centroids", "item_order", "candidates", "partition_offsets", "identifiers"]
    sparse = _keras_kinds()["sparse_code"]().index(np.maximum(candidates, 0.0), int_ids)
    assert names(sparse) == ["posting_items", "posting_scores", "posting_splits", "identifiers"]


def test_a_scann_index_refuses_a_keras_file_and_a_function_traced_before_it_was_rebuilt(tmp_path):
    candidates, queries, int_ids, _ = _data()
    index = ScaNNIndex(num_leaves=8, num_leaves_to_search=8, num_reordering_candidates=300, k_max=K_MAX)
    index.index(candidates[:100], int_ids[:100])
    inputs = tf.keras.Input((D,))
    model = tf.keras.Model(inputs, index(inputs, k=5)[1])
    with pytest.raises(ValueError, match="a ScaNNIndex cannot be saved in a .keras file .* TF SavedModel format"):
        model.save(str(tmp_path / "model.keras"))
    model.save(str(tmp_path / "saved"), options=tf.saved_model.SaveOptions(namespace_whitelist=["Scann"]))
    np.testing.assert_array_equal(tf.keras.models.load_model(str(tmp_path / "saved"))(queries).numpy(),
                                  model(queries).numpy())  # Keras' SavedModel loader revives it
    # Traced before a new catalogue: its searcher is the old one, the identifiers the new ones.
    search = tf.function(lambda q: index(q, k=5))
    search(queries)
    index.index(candidates, int_ids + 7000)
    with pytest.raises(tf.errors.InvalidArgumentError, match="index\\(\\) was called again after this function was "
                                                             "traced: .* trace the function again"):
        search(queries)
    np.testing.assert_array_equal(tf.function(lambda q: index(q, k=5))(queries)[1].numpy(),
                                  index(queries, k=5)[1].numpy())  # a new trace answers the new catalogue


@pytest.mark.parametrize("kind", ["brute_force", "partitioned", "scann", "sparse_code"])
def test_candidates_that_are_not_finite_or_too_large_are_refused_naming_the_row(kind):
    """A NaN ranked first everywhere, made k-means build one (silently exhaustive) partition
    and aborted ScaNN's C++ training, and the Python process with it."""
    candidates, _, _, _ = _data()
    candidates = np.abs(candidates)
    candidates[5, 2] = np.nan
    index = {**_keras_kinds(), "scann": lambda: _exact_index("scann")}[kind]()
    with pytest.raises(ValueError, match="candidates must be finite; row 5 holds nan in column 2"):
        index.index(candidates)
    # Finite but too large: k-means' squared distances overflowed (1e19: 15 partitions of 16;
    # 1e20: one) and ScaNN aborted the process ("Check failed: cluster_idx < num_clusters").
    candidates[5, 2] = 1.0
    candidates[7] *= 1e20
    with pytest.raises(ValueError, match=r"candidates are too large: row 7 has norm [0-9.e+]+, whose square "
                                         r"overflows float32 \(above 1.84e\+19\); scale the embeddings"):
        index.index(candidates)


@pytest.mark.parametrize("kind", ["brute_force", "partitioned", "scann", "sparse_code"])
def test_queries_that_are_not_finite_are_refused_naming_the_row(kind):
    """A NaN query came back as the first identifiers with NaN scores; in the inverted index,
    NaN-scored items pushed real results out of a best-first list."""
    candidates, queries, _, _ = _data()
    index = {**_keras_kinds(), "scann": lambda: _exact_index("scann")}[kind]()
    index.index(np.abs(candidates))
    queries = np.abs(queries)
    queries[2, 3] = np.nan
    for search in (lambda q: index(q, k=3), tf.function(lambda q: index(q, k=3))):
        with pytest.raises(tf.errors.InvalidArgumentError,
                           match=r"queries must be finite \(no NaN or inf\); first row that is not \(from 0\):[^0-9]*2"):
            search(queries)
    queries[2, 3] = 1.0
    search(queries)


def test_queries_of_the_wrong_width_fail_when_the_width_is_known_only_at_run_time():
    """SparCode's inverted index reads only the columns a query has: a narrower one was answered
    as if the rest were 0."""
    from tfx_xmatch.index import SparseCodeIndex

    candidates, queries, _, _ = _data()
    for index in (SparseCodeIndex(k_max=K_MAX).index(np.abs(candidates)), BruteForceIndex(k_max=K_MAX).index(candidates)):
        search = tf.function(lambda q: index(q, k=3), input_signature=[tf.TensorSpec([None, None], tf.float32)])
        with pytest.raises(tf.errors.InvalidArgumentError, match=f"as many columns as the indexed candidates \\({D}\\)"):
            search(np.abs(queries[:, :5]))
        search(np.abs(queries))


def test_an_index_rebuilt_from_its_config_alone_says_it_holds_no_catalogue():
    candidates, queries, int_ids, _ = _data()
    index = BruteForceIndex(k_max=K_MAX).index(candidates, int_ids)
    config = index.get_config()
    assert config["state"] == {"candidates": ["float32", 2], "identifiers": ["int64", 1]}  # dtypes, no values
    clone = BruteForceIndex.from_config(config)
    assert clone.get_config() == config
    with pytest.raises(ValueError, match="rebuilt from its config alone: call index\\(\\), or load the model's weights"):
        clone(queries, k=3)
    np.testing.assert_array_equal(clone.index(candidates, int_ids)(queries, k=3)[1].numpy(),
                                  index(queries, k=3)[1].numpy())


def test_a_soft_search_base_keeps_its_own_padding_settings():
    """The base indexes positions 0..N-1 and never answers a caller: its padding_identifier=0
    was refused as colliding with position 0."""
    from tfx_xmatch.index import SoftSearchIndex

    candidates, queries, int_ids, _ = _data()
    index = SoftSearchIndex(BruteForceIndex(k_max=K_MAX, padding_identifier=0), num_interests=1, k_max=K_MAX)
    expected = BruteForceIndex(k_max=K_MAX).index(candidates, int_ids)(queries, k=5)[1].numpy()
    np.testing.assert_array_equal(index.index(candidates, int_ids)(queries[:, None, :], k=5)[1].numpy(), expected)


@pytest.mark.parametrize("kind", KINDS)
def test_a_reindex_with_identifiers_of_another_dtype_is_refused_and_keeps_the_index(kind):
    """Another dtype made another variable, which functions traced before never read: after
    int ids gave way to strings, a traced query went on answering old int ids, silently."""
    candidates, queries, int_ids, string_ids = _data()
    index = _exact_index(kind).index(candidates, int_ids)
    traced = tf.function(lambda q: index(q, k=5))
    before = traced(queries)
    with pytest.raises(TypeError, match="identifiers are string but this index holds int64 ones; make a new index"):
        index.index(candidates, string_ids)
    for scores, ids in (traced(queries), index(queries, k=5)):
        np.testing.assert_array_equal(ids, before[1])
        np.testing.assert_allclose(scores, before[0])
