"""SoftSearchIndex: merged interest searches against a NumPy oracle, K = 1 is hard search, no
duplicates, exclusion, bad input, config round trip and SavedModel reload."""

import threading

import numpy as np
import pytest
import tensorflow as tf

from tfx_xmatch.index import BruteForceIndex, PartitionedIndex, RetrievalIndex, SoftSearchIndex, make_index

N, D = 60, 8


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    items = rng.normal(size=(N, D)).astype(np.float32)
    queries = rng.normal(size=(3, 4, D)).astype(np.float32)
    queries[1, 1] = queries[1, 0]  # two interests with the same vector: every item found twice
    log_weights = np.log(rng.dirichlet(np.ones(4), size=3)).astype(np.float32)
    return items, queries, log_weights


def _logsumexp(values):
    peak = np.max(values)
    return peak + np.log(np.sum(np.exp(values - peak)))


def oracle(items, queries, log_weights, k, k_max, ids, exclude=None):
    """Per row: each interest's top-k_max after the row's exclusions (K separate searches), log
    softmax over that list, plus the interest's renormalised log weight; an item's entries are
    summed in probability; the best k."""
    results = []
    for row in range(len(queries)):
        weights = log_weights[row] - _logsumexp(log_weights[row])
        merged = {}
        allowed = np.array([exclude is None or ids[p] not in set(exclude[row]) for p in range(len(items))])
        for interest, vector in enumerate(queries[row]):
            scores = items @ vector
            top = [p for p in np.argsort(-scores, kind="stable") if allowed[p]][:k_max]
            normaliser = _logsumexp(scores[top])
            for position in top:
                value = weights[interest] + scores[position] - normaliser
                merged[position] = np.logaddexp(merged.get(position, -np.inf), value)
        best = sorted(merged.items(), key=lambda item: -item[1])[:k]
        results.append(([ids[p] for p, _ in best], [v for _, v in best]))
    return results


def test_merged_results_equal_the_numpy_oracle(data):
    items, queries, log_weights = data
    ids = np.arange(100, 100 + N)
    index = SoftSearchIndex(BruteForceIndex(k_max=20), num_interests=4, k_max=20).index(items, ids)
    scores, found = index(queries, k=7, log_weights=log_weights)
    for row, (expected_ids, expected_scores) in enumerate(oracle(items, queries, log_weights, 7, 20, ids)):
        np.testing.assert_array_equal(found.numpy()[row], expected_ids)
        np.testing.assert_allclose(scores.numpy()[row], expected_scores, rtol=1e-4, atol=1e-5)


def test_merged_results_have_no_duplicates(data):
    items, queries, log_weights = data
    index = SoftSearchIndex(BruteForceIndex(k_max=30), num_interests=4, k_max=30).index(items)
    _, found = index(queries, k=30, log_weights=log_weights)
    for row in found.numpy():
        real = row[row >= 0]
        assert len(real) == len(set(real.tolist()))


def test_one_interest_is_hard_search(data):
    items, queries, _ = data
    base = BruteForceIndex(k_max=10).index(items)
    soft = SoftSearchIndex(BruteForceIndex(k_max=10), num_interests=1, k_max=10).index(items)
    hard_scores, hard_ids = base(queries[:, 0], k=10)
    soft_scores, soft_ids = soft(queries[:, :1], k=10)
    np.testing.assert_array_equal(soft_ids.numpy(), hard_ids.numpy())
    # Same order; the scores differ by each query's log normaliser only.
    shift = hard_scores.numpy() - soft_scores.numpy()
    np.testing.assert_allclose(shift, np.repeat(shift[:, :1], 10, axis=1), rtol=1e-5)
    normaliser = np.array([_logsumexp(row) for row in hard_scores.numpy()])  # k = k_max here
    np.testing.assert_allclose(shift[:, 0], normaliser, rtol=1e-5)


def test_an_exact_partitioned_base_gives_the_brute_force_answer(data):
    items, queries, log_weights = data
    exact = SoftSearchIndex(BruteForceIndex(k_max=10), num_interests=4, k_max=10).index(items)
    partitioned = SoftSearchIndex(PartitionedIndex(num_partitions=4, num_probes=4, k_max=10),
                                  num_interests=4, k_max=10).index(items)
    assert partitioned.is_exact()
    for left, right in zip(exact(queries, k=5, log_weights=log_weights),
                           partitioned(queries, k=5, log_weights=log_weights)):
        np.testing.assert_allclose(left.numpy(), right.numpy(), rtol=1e-5)


def test_exclusion_and_k_as_a_tensor(data):
    items, queries, log_weights = data
    ids = np.arange(1, N + 1)
    index = make_index("soft_search", num_interests=4, k_max=10).index(items, ids)
    _, unfiltered = index(queries, k=5, log_weights=log_weights)
    exclude = unfiltered.numpy()[:, :2]
    scores, found = tf.function(lambda q, w, e, k: index(q, k=k, exclude=e, log_weights=w))(
        queries, log_weights, tf.constant(exclude), tf.constant(5))
    assert found.shape == (3, 5)
    for row, (expected_ids, expected_scores) in enumerate(oracle(items, queries, log_weights, 5, 10, ids, exclude)):
        assert not set(exclude[row]) & set(found.numpy()[row])
        np.testing.assert_array_equal(found.numpy()[row], expected_ids)
        np.testing.assert_allclose(scores.numpy()[row], expected_scores, rtol=1e-4, atol=1e-5)


def test_padding_in_the_exclusion_list_changes_nothing(data):
    # Each interest once listed its k + E best, so a wider (padded) history reordered the merge.
    items, queries, log_weights = data
    index = SoftSearchIndex(BruteForceIndex(k_max=10), num_interests=4, k_max=10).index(items, np.arange(1, N + 1))
    exclude = np.array([[5, 9], [1, 2], [7, 7]])
    for base_exclude in (None, exclude):
        expected = index(queries, k=10, log_weights=log_weights, exclude=base_exclude)
        padded = np.zeros((3, 30), np.int64) if base_exclude is None else np.pad(base_exclude, [[0, 0], [0, 30]])
        answer = index(queries, k=10, log_weights=log_weights, exclude=padded)
        for left, right in zip(expected, answer):
            np.testing.assert_allclose(left.numpy(), right.numpy(), rtol=1e-6)


def test_an_empty_batch_answers_an_empty_result(data):
    items, _, _ = data
    index = SoftSearchIndex(BruteForceIndex(k_max=10), num_interests=2, k_max=10).index(items)
    scores, found = index(np.zeros((0, 2, D), np.float32), k=3)
    assert scores.shape == (0, 3) and found.shape == (0, 3)


def test_bad_input_is_named(data):
    items, queries, _ = data
    index = SoftSearchIndex(BruteForceIndex(k_max=10), num_interests=4, k_max=10)
    with pytest.raises(ValueError, match=r"index\(\) must be called"):
        index(queries)
    index.index(items)
    with pytest.raises(ValueError, match=r"queries must be \[B, num_interests=4, d=8\], got shape \(3, 2, 8\)"):
        index(queries[:, :2])
    with pytest.raises(ValueError, match=r"log_weights must be \[B, 4\]"):
        index(queries, log_weights=np.zeros((3, 3), np.float32))
    with pytest.raises(ValueError, match="base.k_max"):
        SoftSearchIndex(BruteForceIndex(k_max=5), k_max=10)
    with pytest.raises(ValueError, match="num_interests must be an integer >= 1, got 0"):
        SoftSearchIndex(BruteForceIndex(k_max=10), num_interests=0, k_max=10)
    with pytest.raises(ValueError, match="dense-vector base kind"):
        make_index("soft_search", base="sparse_code")


def test_an_interest_of_probability_zero_is_served_and_unusable_weights_are_named(data):
    """A -inf log weight (probability 0) must not be taken for a bad query, as the queries'
    finiteness check first did; a NaN weight, or a row of only -inf weights, came back as
    all padding."""
    items, queries, log_weights = data
    ids = np.arange(100, 100 + N)
    index = SoftSearchIndex(BruteForceIndex(k_max=20), num_interests=4, k_max=20).index(items, ids)
    zero = log_weights.copy()
    zero[:, 2:] = -np.inf
    scores, found = index(queries, k=5, log_weights=zero)
    for row, (expected_ids, expected_scores) in enumerate(oracle(items, queries[:, :2], zero[:, :2], 5, 20, ids)):
        np.testing.assert_array_equal(found.numpy()[row], expected_ids)
        np.testing.assert_allclose(scores.numpy()[row], expected_scores, rtol=1e-4, atol=1e-5)
    for row_values in ([np.nan, 0.0, 0.0, 0.0], [-np.inf] * 4, [np.inf, 0.0, 0.0, 0.0]):
        bad = log_weights.copy()
        bad[1] = row_values
        with pytest.raises(tf.errors.InvalidArgumentError,
                           match=r"log_weights must be finite or -inf.*first row that is not \(from 0\):[^0-9]*1"):
            index(queries, k=5, log_weights=bad)
    nan_query = queries.copy()
    nan_query[2, 1, 0] = np.nan
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"queries must be finite.*\(from 0\):[^0-9]*2"):
        index(nan_query, k=5, log_weights=log_weights)


def test_a_traced_search_may_leave_the_interests_and_the_width_unknown(data):
    """Like every other index kind: [None, K, None] was refused at trace time ("queries must be
    [B, num_interests=4, d=8], got shape (None, 4, None)"); the width is checked when it runs."""
    items, queries, _ = data
    index = SoftSearchIndex(BruteForceIndex(k_max=10), num_interests=4, k_max=10)
    index.index(items)
    expected = index(queries, k=5)
    for shape in ([None, 4, None], [None, None, None], [None, None, 8]):
        search = tf.function(lambda q: index(q, k=5), input_signature=[tf.TensorSpec(shape, tf.float32)])
        for got, want in zip(search(queries), expected):
            np.testing.assert_array_equal(got.numpy(), want.numpy())
        if shape[2] is None:
            with pytest.raises(tf.errors.InvalidArgumentError, match=r"\[3,4,7\] is not compatible"):
                search(np.zeros((3, 4, 7), np.float32))


def test_a_query_during_a_same_size_refresh_is_not_refused_for_its_width(data, monkeypatch):
    """index() stored the item width as the index's query width, then reset it: a query between the
    two failed ("queries have 36 columns but the indexed candidates have 8"). The width it checks
    now never changes, and the query waits for the write to end."""
    items, queries, log_weights = data
    index = SoftSearchIndex(BruteForceIndex(k_max=10), num_interests=4, k_max=10).index(items)
    refreshed = items[::-1].copy()
    held, release = threading.Event(), threading.Event()
    set_catalogue = RetrievalIndex._set_catalogue

    def holding(self, *args):  # the seam: hold index() just after it stored the catalogue
        set_catalogue(self, *args)
        if self is index and not held.is_set():
            held.set()
            release.wait(30)

    monkeypatch.setattr(RetrievalIndex, "_set_catalogue", holding)
    writer = threading.Thread(target=index.index, args=(refreshed,))
    writer.start()
    assert held.wait(30)
    answers, errors = [], []

    def query():
        try:
            answers.append(index(queries, k=5, log_weights=log_weights))
        except Exception as error:  # noqa: BLE001 -- reported below
            errors.append(error)

    querying = threading.Thread(target=query)
    querying.start()
    querying.join(0.5)  # it failed here; now it waits for the write
    release.set()
    writer.join(30)
    querying.join(30)
    assert not errors, errors
    expected = oracle(refreshed, queries, log_weights, 5, 10, np.arange(N))
    for (want_ids, want_scores), got_scores, got_ids in zip(expected, *[t.numpy() for t in answers[0]]):
        np.testing.assert_array_equal(got_ids, want_ids)
        np.testing.assert_allclose(got_scores, want_scores, rtol=1e-5, atol=1e-5)


def test_config_round_trip():
    index = make_index("soft_search", num_interests=3, k_max=12, base="partitioned",
                       base_options={"num_partitions": 5, "num_probes": 2})
    again = SoftSearchIndex.from_config(index.get_config())
    assert again.get_config() == index.get_config()
    assert isinstance(again.base, PartitionedIndex) and again.base.num_probes == 2


def test_saved_model_reload_gives_identical_retrievals(data, tmp_path):
    items, queries, log_weights = data
    index = SoftSearchIndex(BruteForceIndex(k_max=10), num_interests=4, k_max=10).index(items, np.arange(1, N + 1))
    module = tf.Module()
    module.index = index
    module.search = tf.function(lambda q, w, k: index(q, k=k, log_weights=w), input_signature=[
        tf.TensorSpec([None, 4, D], tf.float32), tf.TensorSpec([None, 4], tf.float32), tf.TensorSpec([], tf.int32)])
    expected = module.search(queries, log_weights, tf.constant(6))
    tf.saved_model.save(module, str(tmp_path / "soft"))
    reloaded = tf.saved_model.load(str(tmp_path / "soft"))
    for left, right in zip(expected, reloaded.search(queries, log_weights, tf.constant(6))):
        np.testing.assert_array_equal(left.numpy(), right.numpy())
