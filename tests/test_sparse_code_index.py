"""SparseCodeIndex: NumPy oracles for results and budgets, streaming builds, config, SavedModel
round trip with stock ops only, and re-indexing under a traced function."""

import json
import math

import numpy as np
import pytest
import tensorflow as tf

from tfx_xmatch.export import non_stock_ops
from tfx_xmatch.index import INDEX_KINDS, SparseCodeIndex, make_index

C, N, K_MAX = 12, 150, 20


def _table(seed=0, num=N, codes=C, quantize=False):
    """ReLU'd [N, C] code-score table (about 30% positive); code 0 has no positive entry."""
    rng = np.random.default_rng(seed)
    table = np.maximum(rng.normal(size=(num, codes)) - 0.5, 0.0)
    if quantize:  # many equal scores, to exercise tie-breaking
        table = np.round(table * 2) / 2
    table[:, 0] = -np.abs(rng.normal(size=num))  # never stored
    return table.astype(np.float32)


def _queries(seed=1, batch=7, codes=C):
    """Bags of 1-4 codes with multiplicities; row 0 is empty, row 1 only the empty code 0."""
    rng = np.random.default_rng(seed)
    queries = np.zeros((batch, codes), np.float32)
    for row in range(2, batch):
        np.add.at(queries[row], rng.integers(0, codes, size=rng.integers(1, 5)), 1.0)
    queries[1, 0] = 2.0
    return queries


def _oracle(queries, table, ids, k, exclude=None):
    """Best-first positive scores (-inf padded) of ``queries @ table.T``, minus exclusions."""
    scores = queries @ table.T
    out = np.full((len(queries), k), -np.inf, np.float32)
    for row in range(len(queries)):
        keep = scores[row] > 0
        if exclude is not None:
            keep &= ~np.isin(ids, exclude[row])
        best = np.sort(scores[row, keep])[::-1][:k]
        out[row, : len(best)] = best
    return out


def _check(result, queries, table, ids, k, padding, exclude=None):
    table = np.maximum(table, 0.0)  # entries <= 0 are never stored: they count as 0
    scores, out = (np.asarray(x) for x in result)
    expected = _oracle(queries, table, ids, k, exclude)
    assert scores.shape == out.shape == (len(queries), k)
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-5)
    row_of = {x: i for i, x in enumerate(ids.tolist())}
    for row in range(len(queries)):
        got = [x.decode() if isinstance(x, bytes) else x for x in out[row].tolist()]
        real = np.isfinite(expected[row])
        assert all(g == padding for g, ok in zip(got, real) if not ok)
        kept = [g for g, ok in zip(got, real) if ok]
        assert len(set(kept)) == len(kept)
        for identifier, score in zip(kept, scores[row]):
            assert exclude is None or identifier not in exclude[row].tolist()
            np.testing.assert_allclose(score, queries[row] @ table[row_of[identifier]], rtol=1e-5)


def _pruned_oracle(table, per_code=None, fraction=None):
    """The table with only the entries a budget keeps (others 0), ranking (score, -row, -code)."""
    codes, rows = np.nonzero(table.T > 0)
    scores = table.T[codes, rows]
    entries = sorted(zip(-scores, rows, codes))  # best first, ties by row then code
    if per_code is not None:
        taken, kept = {}, []
        for entry in entries:
            taken[entry[2]] = taken.get(entry[2], 0) + 1
            if taken[entry[2]] <= per_code:
                kept.append(entry)
        entries = kept
    if fraction is not None:
        entries = entries[: math.ceil(round(fraction * table.size, 9))]
    pruned = np.zeros_like(table)
    for _, row, code in entries:
        pruned[row, code] = table[row, code]
    return pruned


def _dense(index, num):
    """The stored postings as a dense [N, C] table; also checks each list is sorted."""
    items, scores = index.posting_items.numpy(), index.posting_scores.numpy()
    splits = index.posting_splits.numpy()
    dense = np.zeros((num, len(splits) - 1), np.float32)
    for code in range(len(splits) - 1):
        part = slice(splits[code], splits[code + 1])
        assert np.all(np.diff(scores[part]) <= 0) and np.all(scores[part] > 0)
        dense[items[part], code] = scores[part]
    return dense


# ---------------------------------------------------------------- exact results
@pytest.mark.parametrize("id_type", ["int", "string"])
def test_without_budget_results_equal_the_positive_brute_force_oracle(id_type):
    table, queries = _table(), _queries()
    ids = (500 + np.random.default_rng(2).permutation(N)).astype(np.int64)
    padding = -1
    if id_type == "string":
        ids, padding = np.array([f"item-{i}" for i in ids], dtype=object), ""
    index = SparseCodeIndex(k_max=K_MAX).index(table, ids)
    assert index.is_exact()
    assert index.posting_list_lengths()[0] == 0 and index.num_postings == np.sum(table > 0)
    for k in (1, 5, K_MAX, tf.constant(7)):
        _check(index(queries, k=k), queries, table, ids, int(k), padding)
    exclude = ids[np.argsort(-(queries @ table.T), axis=1)[:, :3]]
    _check(index(queries, k=6, exclude=exclude), queries, table, ids, 6, padding, exclude=exclude)
    scores, out = index(queries, k=K_MAX)
    # Row 0 has no codes, row 1 only code 0 (empty posting list): nothing found.
    empty = set(out.numpy()[:2].ravel().tolist())
    assert np.all(np.isneginf(scores.numpy()[:2]))
    assert empty == {padding.encode() if id_type == "string" else padding}


def test_k_beyond_the_found_items_and_an_empty_batch_are_padded():
    table = np.zeros((5, 4), np.float32)
    table[[1, 3], 2] = [0.5, 2.0]
    index = SparseCodeIndex(k_max=8).index(table)
    scores, ids = index(np.array([[0, 0, 3, 0]], np.float32), k=8)
    np.testing.assert_allclose(scores.numpy()[0, :2], [6.0, 1.5])
    assert ids.numpy().tolist() == [[3, 1] + [-1] * 6]
    assert np.all(np.isneginf(scores.numpy()[0, 2:]))
    scores, ids = index(np.zeros((0, 4), np.float32), k=3)
    assert scores.shape == ids.shape == (0, 3)


# ---------------------------------------------------------------- budgets
@pytest.mark.parametrize("per_code,fraction", [(4, None), (None, 0.1), (6, 0.05), (1000, None)])
def test_budgets_keep_exactly_the_top_entries(per_code, fraction):
    table, queries = _table(), _queries()
    index = SparseCodeIndex(k_max=K_MAX, max_items_per_code=per_code, cache_fraction=fraction)
    index.index(table)
    lengths = index.posting_list_lengths()
    assert lengths.dtype.kind == "i" and len(lengths) == C
    if per_code is not None:
        assert lengths.max() <= per_code
    if fraction is not None:
        assert lengths.sum() <= math.ceil(fraction * C * N)
    pruned = _pruned_oracle(table, per_code, fraction)
    np.testing.assert_array_equal(_dense(index, N), pruned)
    assert index.is_exact() == (per_code == 1000)
    assert index.memory_bytes() == 8 * lengths.sum() + 8 * (C + 1) + 8 * N
    # Exact for the stored table: the brute-force oracle on the pruned table.
    _check(index(queries, k=10), queries, pruned, np.arange(N), 10, -1)


# ---------------------------------------------------------------- streaming builds
@pytest.mark.parametrize("per_code,fraction", [(None, None), (3, None), (None, 0.08), (5, 0.04)])
@pytest.mark.parametrize("with_ids", [True, False])
def test_index_from_dataset_ends_in_the_same_state_as_index(per_code, fraction, with_ids):
    table = _table(seed=3, quantize=True)  # ties: the kept set must not depend on chunking
    ids = np.arange(N, dtype=np.int64)[::-1].copy()
    config = dict(k_max=K_MAX, max_items_per_code=per_code, cache_fraction=fraction)
    expected = SparseCodeIndex(build_batch_size=64, **config).index(table, ids if with_ids else None)
    elements = (ids, table) if with_ids else table
    dataset = tf.data.Dataset.from_tensor_slices(elements).batch(11)
    streamed = SparseCodeIndex(build_batch_size=4, **config).index_from_dataset(dataset)
    for name in ("posting_items", "posting_scores", "posting_splits", "identifiers"):
        np.testing.assert_array_equal(getattr(streamed, name).numpy(), getattr(expected, name).numpy())
    assert streamed.is_exact() == expected.is_exact() and streamed.num_candidates == N
    np.testing.assert_array_equal(_dense(streamed, N), _pruned_oracle(table, per_code, fraction))


def test_streaming_memory_is_bounded_by_the_budget():
    table = _table(seed=4, num=3000, codes=8)
    dataset = tf.data.Dataset.from_tensor_slices(table).batch(500)
    index = SparseCodeIndex(max_items_per_code=3, cache_fraction=0.001, build_batch_size=50)
    index.index_from_dataset(dataset, num_candidates=3000)
    assert index.peak_buffered_entries <= 2 * min(3 * 8, 24) + 8 * 50
    assert index.peak_buffered_entries < index.num_positive_entries / 10
    np.testing.assert_array_equal(_dense(index, 3000), _pruned_oracle(table, 3, 0.001))
    with pytest.raises(ValueError, match="num_candidates is 2999 but the dataset holds 3000 rows"):
        SparseCodeIndex(cache_fraction=0.5).index_from_dataset(dataset, num_candidates=2999)
    with pytest.raises(ValueError, match="empty"):
        SparseCodeIndex().index_from_dataset(dataset.take(0))


# ---------------------------------------------------------------- SavedModel
def test_saved_model_round_trip_uses_only_stock_ops(tmp_path):
    table, queries = _table(), _queries()
    index = SparseCodeIndex(k_max=K_MAX, max_items_per_code=8).index(table, np.arange(N) + 10)
    module = tf.Module()
    module.index = index
    module.search = tf.function(
        lambda q, k: dict(zip(("scores", "identifiers"), index(q, k=k))),
        input_signature=[tf.TensorSpec([None, C], tf.float32), tf.TensorSpec([], tf.int32)],
    )
    tf.saved_model.save(module, str(tmp_path), signatures={"serving_default": module.search})
    loaded = tf.saved_model.load(str(tmp_path))
    for k in (1, 9, K_MAX):
        expected = module.search(queries, tf.constant(k))
        for function in (loaded.search, loaded.signatures["serving_default"]):
            got = function(q=tf.constant(queries), k=tf.constant(k))
            for name in ("scores", "identifiers"):
                np.testing.assert_array_equal(got[name].numpy(), expected[name].numpy())
    assert not non_stock_ops(tmp_path)


# ---------------------------------------------------------------- interface details
def test_registry_config_and_bad_arguments():
    assert INDEX_KINDS["sparse_code"] is SparseCodeIndex
    index = make_index("sparse_code", k_max=5, max_items_per_code=3, cache_fraction=0.5)
    assert isinstance(index, SparseCodeIndex) and not index.is_exact()
    assert SparseCodeIndex().is_exact()
    config = SparseCodeIndex(k_max=7, max_items_per_code=9, cache_fraction=0.25, build_batch_size=32).get_config()
    json.dumps(config)
    assert SparseCodeIndex.from_config(config).get_config() == config
    assert (config["max_items_per_code"], config["cache_fraction"], config["build_batch_size"]) == (9, 0.25, 32)
    for kwargs, message in [
        (dict(max_items_per_code=0), "max_items_per_code must be an integer >= 1 or None, got 0"),
        (dict(max_items_per_code=2.5), "got 2.5"),
        (dict(cache_fraction=0.0), r"cache_fraction must be in \(0, 1\] or None, got 0.0"),
        (dict(cache_fraction=1.5), "got 1.5"),
        (dict(cache_fraction=True), "got True"),
        (dict(build_batch_size=0), "build_batch_size must be an integer >= 1, got 0"),
    ]:
        with pytest.raises(ValueError, match=message):
            SparseCodeIndex(**kwargs)
    with pytest.raises(ValueError, match=r"index\(\) must be called"):
        index(_queries())
    with pytest.raises(ValueError, match="index"):
        index.posting_list_lengths()


def test_reindexing_with_another_size_keeps_traced_functions_working():
    index = SparseCodeIndex(k_max=K_MAX)
    table, queries = _table(num=80), _queries()
    index.index(table)
    search = tf.function(
        lambda q, k: index(q, k=k),
        input_signature=[tf.TensorSpec([None, C], tf.float32), tf.TensorSpec([], tf.int32)],
    )
    _check(search(queries, tf.constant(5)), queries, table, np.arange(80), 5, -1)
    variables = len(index.weights)
    table = _table(seed=5, num=230)
    index.index(table)
    assert len(index.weights) == variables
    _check(search(queries, tf.constant(5)), queries, table, np.arange(230), 5, -1)
    assert search.experimental_get_tracing_count() == 1
