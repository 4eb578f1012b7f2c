"""Full-ranking evaluation: a brute-force NumPy oracle, hand cases, and input validation."""

import math

import numpy as np
import pytest

import tfx_xmatch  # noqa: F401  (before TensorFlow: selects Keras 2)
import tensorflow as tf

from tfx_xmatch.data.dataset import EvalExamples, pad_histories
from tfx_xmatch.evaluation import FullRankingEvaluator, evaluate_full_ranking

# ----------------------------------------------------------------------------------------------
# Oracle: written from the protocol text, one example at a time, no vectorisation.


def oracle_rank(scores_row, target, history, mask_history, tie_policy):
    num_items = len(scores_row) - 1
    history = set(int(i) for i in history)
    candidates = [
        item for item in range(1, num_items + 1)
        if item == target or not (mask_history and item in history)
    ]
    target_score = scores_row[target]
    if tie_policy == "optimistic":
        if target_score == -np.inf:  # not retrieved: behind every other candidate
            return len(candidates) - 1
        return sum(1 for item in candidates if scores_row[item] > target_score)
    return sum(1 for item in candidates if item != target and scores_row[item] >= target_score)


def oracle_top_k(scores_row, target, history, mask_history, k):
    num_items = len(scores_row) - 1
    history = set(int(i) for i in history)
    candidates = [
        item for item in range(1, num_items + 1)
        if (item == target or not (mask_history and item in history))
        and scores_row[item] != -np.inf
    ]
    candidates.sort(key=lambda item: (-scores_row[item], item))
    return candidates[:k]


def oracle_metrics(scores, targets, histories, ks, mask_history, tie_policy,
                   popularity=None, head_fraction=0.2):
    num_items = scores.shape[1] - 1
    ranks = [
        oracle_rank(scores[i], int(targets[i]), histories[i], mask_history, tie_policy)
        for i in range(len(targets))
    ]
    tail = None
    if popularity is not None:
        by_popularity = sorted(range(1, num_items + 1), key=lambda item: (-popularity[item], item))
        head = set(by_popularity[: int(math.floor(head_fraction * num_items + 1e-9))])
        tail = [int(t) not in head for t in targets]
    out = {}
    n = len(targets)
    for k in ks:
        hits = [1.0 if r < k else 0.0 for r in ranks]
        out[f"HR@{k}"] = sum(hits) / n
        out[f"Recall@{k}"] = sum(hits) / n
        out[f"NDCG@{k}"] = sum(1 / math.log2(r + 2) if r < k else 0.0 for r in ranks) / n
        out[f"MRR@{k}"] = sum(1 / (r + 1) if r < k else 0.0 for r in ranks) / n
        out[f"P@{k}"] = sum(hits) / n / k
        if tail is not None:
            tail_hits = [h for h, is_tail in zip(hits, tail) if is_tail]
            out[f"TailRecall@{k}"] = sum(tail_hits) / len(tail_hits) if tail_hits else math.nan
        returned = set()
        for i in range(n):
            returned.update(oracle_top_k(scores[i], int(targets[i]), histories[i], mask_history, k))
        out[f"Coverage@{k}"] = len(returned) / num_items
    out["num_examples"] = n
    if tail is not None:
        out["num_tail_examples"] = sum(tail)
    return out, np.array(ranks)


def random_problem(seed, num_examples=37, num_items=23):
    rng = np.random.default_rng(seed)
    # Few distinct integer values -> many ties, including ties with the target. The per-item
    # bias keeps some items out of every top-k so that coverage is not trivially 1.
    item_bias = rng.integers(0, 6, size=num_items + 1)
    scores = (rng.integers(0, 4, size=(num_examples, num_items + 1)) + item_bias).astype(np.float32)
    scores[rng.random(scores.shape) < 0.05] = -np.inf
    scores[:, 0] = 100.0  # the padding column scores best: it must never count
    targets = rng.integers(1, num_items + 1, size=num_examples)
    histories = []
    for i in range(num_examples):
        length = int(rng.integers(0, 15))
        history = rng.integers(1, num_items + 1, size=length)  # repeats on purpose
        if rng.random() < 0.3 and length:
            history[rng.integers(length)] = targets[i]  # the target is sometimes re-consumed
        histories.append(history.astype(np.int32))
    popularity = rng.integers(0, 4, size=num_items + 1)  # ties in popularity
    return scores, targets, histories, popularity


def padded(histories):
    """Right-padded [B, S] with 0, S = longest history (at least 1)."""
    width = max([len(h) for h in histories] + [1])
    out = np.zeros((len(histories), width), dtype=np.int32)
    for row, history in enumerate(histories):
        out[row, : len(history)] = history
    return out


def feed(evaluator, scores, targets, histories, batch_size):
    ranks = []
    for start in range(0, len(targets), batch_size):
        stop = start + batch_size
        ranks.append(
            evaluator.update(scores[start:stop], targets[start:stop], padded(histories[start:stop]))
        )
    return np.concatenate(ranks)


def assert_metrics_equal(got, expected):
    assert set(got) == set(expected)
    for name, value in expected.items():
        if isinstance(value, float) and math.isnan(value):
            assert math.isnan(got[name]), name
        else:
            assert got[name] == pytest.approx(value, rel=1e-12, abs=1e-12), name


KS = (1, 3, 10, 23)


@pytest.mark.parametrize("mask_history", [True, False])
@pytest.mark.parametrize("tie_policy", ["optimistic", "pessimistic"])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_oracle(mask_history, tie_policy, seed):
    scores, targets, histories, popularity = random_problem(seed)
    expected, expected_ranks = oracle_metrics(
        scores, targets, histories, KS, mask_history, tie_policy, popularity
    )
    results = []
    for batch_size in (37, 8, 5):  # 37 = one batch; 8 and 5 do not divide 37
        evaluator = FullRankingEvaluator(
            23, ks=KS, mask_history=mask_history, item_popularity=popularity,
            tie_policy=tie_policy,
        )
        ranks = feed(evaluator, scores, targets, histories, batch_size)
        np.testing.assert_array_equal(ranks, expected_ranks)
        results.append(evaluator.result())
        assert_metrics_equal(results[-1], expected)
    # Rank histograms make the means independent of batching, bit for bit.
    assert results[0] == results[1] == results[2]


def test_oracle_problem_is_not_degenerate():
    """The random problems really exercise ties, masked targets and tail targets."""
    scores, targets, histories, popularity = random_problem(0)
    optimistic, _ = oracle_metrics(scores, targets, histories, KS, True, "optimistic", popularity)
    pessimistic, _ = oracle_metrics(scores, targets, histories, KS, True, "pessimistic", popularity)
    unmasked, _ = oracle_metrics(scores, targets, histories, KS, False, "optimistic", popularity)
    assert optimistic["NDCG@10"] > pessimistic["NDCG@10"]
    assert optimistic["NDCG@10"] > unmasked["NDCG@10"]
    assert any(t in h for t, h in zip(targets, histories))
    assert 0 < optimistic["num_tail_examples"] < len(targets)
    assert 0 < optimistic["Coverage@3"] < optimistic["Coverage@10"] < 1


def test_tensor_and_ragged_inputs_match_numpy():
    scores, targets, histories, popularity = random_problem(3, num_examples=9)
    numpy_eval = FullRankingEvaluator(23, ks=KS, item_popularity=popularity)
    numpy_ranks = numpy_eval.update(scores, targets, padded(histories))
    tf_eval = FullRankingEvaluator(23, ks=KS, item_popularity=tf.constant(popularity))
    tf_ranks = tf_eval.update(
        tf.constant(scores), tf.constant(targets), tf.ragged.constant(
            [h.tolist() for h in histories], dtype=tf.int32, ragged_rank=1
        )
    )
    np.testing.assert_array_equal(numpy_ranks, tf_ranks)
    assert numpy_eval.result() == tf_eval.result()


def test_float64_and_integer_scores():
    base = np.array([[0, 5, 3, 3, 1]])
    for scores in (base.astype(np.float64), base.astype(np.int64), base.astype(np.float16)):
        evaluator = FullRankingEvaluator(4, ks=(1, 2), mask_history=False)
        # Item 1 scores higher and item 2 ties with the target: pessimistic by default.
        assert evaluator.update(scores, np.array([3]), None).tolist() == [2]


# ----------------------------------------------------------------------------------------------
# Hand-computed cases.


def test_target_ranked_first():
    evaluator = FullRankingEvaluator(4, ks=(1, 2), mask_history=False)
    ranks = evaluator.update(np.array([[0.0, 0.1, 0.9, 0.2, 0.3]]), np.array([2]), None)
    assert ranks.tolist() == [0]
    result = evaluator.result()
    assert result["HR@1"] == 1.0 and result["NDCG@1"] == 1.0 and result["MRR@1"] == 1.0
    assert result["P@1"] == 1.0 and result["P@2"] == 0.5
    assert result["num_examples"] == 1


def test_target_ranked_third():
    evaluator = FullRankingEvaluator(5, ks=(2, 3, 4), mask_history=False)
    # Items 1 and 4 beat the target (item 2): rank 2.
    evaluator.update(np.array([[0.0, 0.9, 0.5, 0.1, 0.8, 0.2]]), np.array([2]), None)
    result = evaluator.result()
    assert result["HR@2"] == 0.0 and result["NDCG@2"] == 0.0 and result["MRR@2"] == 0.0
    assert result["HR@3"] == 1.0
    assert result["NDCG@3"] == pytest.approx(1 / math.log2(4)) == 0.5
    assert result["MRR@3"] == pytest.approx(1 / 3)
    assert result["P@4"] == 0.25 and result["Recall@4"] == 1.0


def test_means_over_examples():
    evaluator = FullRankingEvaluator(3, ks=(1,), mask_history=False)
    scores = np.array([[0.0, 3.0, 2.0, 1.0]] * 2)
    evaluator.update(scores, np.array([1, 3]), None)  # ranks 0 and 2
    assert evaluator.result()["HR@1"] == 0.5
    assert evaluator.result()["NDCG@1"] == 0.5


def test_history_is_masked_but_target_still_ranked():
    scores = np.array([[0.0, 0.9, 0.8, 0.5, 0.1]])
    seen = np.array([[1, 3, 3, 0, 0]])  # target 3 is in the history; item 1 too
    masked = FullRankingEvaluator(4, ks=(1, 2), mask_history=True)
    assert masked.update(scores, np.array([3]), seen).tolist() == [1]  # only item 2 beats it
    unmasked = FullRankingEvaluator(4, ks=(1, 2), mask_history=False)
    assert unmasked.update(scores, np.array([3]), seen).tolist() == [2]


def test_padding_column_never_counts():
    evaluator = FullRankingEvaluator(3, ks=(1,), mask_history=False, tie_policy="pessimistic")
    ranks = evaluator.update(np.array([[1e9, 0.5, 0.1, 0.2]]), np.array([1]), None)
    assert ranks.tolist() == [0]
    # nor does it in the top-k: coverage counts item 1 only.
    assert evaluator.result()["Coverage@1"] == pytest.approx(1 / 3)


def test_padding_column_nan_is_ignored():
    evaluator = FullRankingEvaluator(2, ks=(1,), mask_history=False)
    assert evaluator.update(np.array([[np.nan, 0.5, 0.1]]), np.array([1]), None).tolist() == [0]


def test_tie_policies():
    scores = np.array([[0.0, 0.5, 0.5, 0.5, 0.1]])
    optimistic = FullRankingEvaluator(4, ks=(1,), mask_history=False, tie_policy="optimistic")
    pessimistic = FullRankingEvaluator(4, ks=(1,), mask_history=False)
    assert pessimistic.tie_policy == "pessimistic"  # the default: constant scores earn nothing
    assert optimistic.update(scores, np.array([2]), None).tolist() == [0]
    assert pessimistic.update(scores, np.array([2]), None).tolist() == [2]
    # With history masking a tied item that was seen stops counting against the target.
    pessimistic_masked = FullRankingEvaluator(4, ks=(1,), tie_policy="pessimistic")
    assert pessimistic_masked.update(scores, np.array([2]), np.array([[1]])).tolist() == [1]


def test_an_unretrieved_target_ranks_last_under_either_tie_policy():
    """A served path scores what it did not return -inf; optimistic ties among those once made
    a never-retrieved target a hit (rank 3 of 100 when 3 items were returned)."""
    scores = np.full((1, 101), -np.inf)
    scores[0, [5, 6, 7]] = [3.0, 2.0, 1.0]
    for policy in ("optimistic", "pessimistic"):
        evaluator = FullRankingEvaluator(100, ks=(10,), mask_history=False, tie_policy=policy)
        assert evaluator.update(scores, np.array([50]), None).tolist() == [99], policy
        assert evaluator.result()["HR@10"] == 0.0


def test_coverage_hand_case():
    evaluator = FullRankingEvaluator(5, ks=(1, 2))
    scores = np.array([
        [0.0, 0.9, 0.8, 0.1, 0.1, 0.1],  # item 1 seen -> top-2 = {2, 3} (3 wins the tie by index)
        [0.0, 0.1, 0.9, 0.2, 0.1, 0.8],  # nothing seen -> top-2 = {2, 5}
    ])
    evaluator.update(scores, np.array([4, 4]), np.array([[1], [0]]))
    result = evaluator.result()
    assert result["Coverage@1"] == pytest.approx(1 / 5)  # {2}
    assert result["Coverage@2"] == pytest.approx(3 / 5)  # {2, 3, 5}


def test_coverage_skips_minus_inf_and_short_candidate_lists():
    evaluator = FullRankingEvaluator(4, ks=(3,))
    scores = np.array([[0.0, 0.5, -np.inf, 0.7, 0.2]])
    # Items 1 and 4 are seen; candidates are 2 (-inf, never returned) and 3.
    evaluator.update(scores, np.array([3]), np.array([[1, 4]]))
    assert evaluator.result()["Coverage@3"] == pytest.approx(1 / 4)


def test_tail_recall_hand_case():
    # 10 items, head = the 2 most popular: item 7 (count 9) and item 2 (count 5, wins the tie
    # with item 4 by its lower index).
    popularity = np.array([0, 1, 5, 0, 5, 0, 0, 9, 0, 0, 0])
    evaluator = FullRankingEvaluator(10, ks=(1,), mask_history=False, item_popularity=popularity)
    scores = np.zeros((4, 11))
    scores[np.arange(4), [7, 2, 4, 9]] = 1.0  # every row ranks its own target first...
    scores[3, 1] = 2.0  # ...except the last one
    evaluator.update(scores, np.array([7, 2, 4, 9]), None)
    result = evaluator.result()
    assert result["num_tail_examples"] == 2  # targets 4 and 9
    assert result["TailRecall@1"] == 0.5
    assert result["HR@1"] == 0.75


def test_tail_recall_nan_without_tail_targets_and_absent_without_popularity():
    popularity = np.arange(5)  # floor(0.25 * 4) = 1 head item: item 4, the most popular
    evaluator = FullRankingEvaluator(4, ks=(1,), mask_history=False,
                                     item_popularity=popularity, head_fraction=0.25)
    evaluator.update(np.array([[0.0, 0, 0, 0, 1]]), np.array([4]), None)
    result = evaluator.result()
    assert result["num_tail_examples"] == 0 and math.isnan(result["TailRecall@1"])
    plain = FullRankingEvaluator(4, ks=(1,), mask_history=False)
    plain.update(np.array([[0.0, 0, 0, 0, 1]]), np.array([4]), None)
    assert "TailRecall@1" not in plain.result() and "num_tail_examples" not in plain.result()


def test_metric_names_and_reset():
    evaluator = FullRankingEvaluator(50, item_popularity=np.ones(51))
    scores = np.random.default_rng(0).random((3, 51))
    evaluator.update(scores, np.array([1, 2, 3]), np.zeros((3, 1), np.int32))
    names = set(evaluator.result())
    for k in (10, 20, 50):
        for metric in ("HR", "Recall", "NDCG", "MRR", "P", "TailRecall", "Coverage"):
            assert f"{metric}@{k}" in names
    assert {"num_examples", "num_tail_examples"} <= names
    evaluator.reset()
    assert evaluator.num_examples == 0
    with pytest.raises(ValueError, match="no examples"):
        evaluator.result()


# ----------------------------------------------------------------------------------------------
# evaluate_full_ranking


def test_evaluate_full_ranking_matches_direct_evaluator():
    scores, targets, histories, popularity = random_problem(5)
    # Long histories so that the model window (max_length=4) is shorter than the masked history.
    examples = EvalExamples(
        user_rows=np.arange(len(targets)) * 10, histories=histories, targets=targets.astype(np.int32)
    )
    calls = []

    def score_fn(batch_histories, user_rows):
        calls.append((batch_histories, user_rows))
        return tf.constant(scores[user_rows // 10])

    got = evaluate_full_ranking(
        score_fn, examples, max_length=4, batch_size=8, ks=KS, item_popularity=popularity,
        tie_policy="pessimistic",
    )
    direct = FullRankingEvaluator(23, ks=KS, item_popularity=popularity, tie_policy="pessimistic")
    feed(direct, scores, targets, histories, 37)
    assert got == direct.result()

    assert [len(c[1]) for c in calls] == [8, 8, 8, 8, 5]
    for batch_histories, user_rows in calls:
        assert batch_histories.dtype == np.int32 and batch_histories.shape[1] == 4
        assert user_rows.dtype == np.int64
        expected = pad_histories([histories[r // 10] for r in user_rows], 4)
        np.testing.assert_array_equal(batch_histories, expected)


def test_evaluate_full_ranking_masks_full_history_not_window():
    # The seen item 1 is outside the window of 1 item; it must still be masked.
    examples = EvalExamples(
        user_rows=np.array([0]), histories=[np.array([1, 2], np.int32)], targets=np.array([3])
    )
    scores = np.array([[0.0, 0.9, 0.8, 0.5]])
    result = evaluate_full_ranking(lambda h, u: scores, examples, max_length=1, ks=(1,))
    assert result["HR@1"] == 1.0
    result = evaluate_full_ranking(
        lambda h, u: scores, examples, max_length=1, ks=(1,), mask_history=False
    )
    assert result["HR@1"] == 0.0


def test_evaluate_full_ranking_empty_histories_and_num_items():
    examples = EvalExamples(
        user_rows=np.array([0, 1]), histories=[np.array([], np.int32)] * 2, targets=np.array([1, 2])
    )
    scores = np.array([[0.0, 1.0, 0.5]] * 2)
    result = evaluate_full_ranking(lambda h, u: scores, examples, max_length=3, ks=(1,), num_items=2)
    assert result["HR@1"] == 0.5


def test_evaluate_full_ranking_errors():
    examples = EvalExamples(
        user_rows=np.array([0, 1, 2]), histories=[np.array([1], np.int32)] * 3,
        targets=np.array([1, 2, 3]),
    )
    with pytest.raises(ValueError, match="empty"):
        evaluate_full_ranking(
            lambda h, u: None,
            EvalExamples(user_rows=np.zeros(0), histories=[], targets=np.zeros(0)),
            max_length=3,
        )
    with pytest.raises(ValueError, match=r"expected \[1, 4\], got \[1, 5\]"):
        evaluate_full_ranking(
            lambda h, u: np.zeros((len(u), 4 if u[0] == 0 else 5)), examples, max_length=3,
            batch_size=2, ks=(1,),
        )
    with pytest.raises(ValueError, match=r"expected \[2, 4\], got \[3, 4\]"):
        evaluate_full_ranking(
            lambda h, u: np.zeros((3, 4)), examples, max_length=3, batch_size=2, ks=(1,)
        )
    with pytest.raises(ValueError, match=r"expected \[2, 11\], got \[2, 4\]"):
        evaluate_full_ranking(
            lambda h, u: np.zeros((2, 4)), examples, max_length=3, batch_size=2, ks=(1,),
            num_items=10,
        )
    with pytest.raises(ValueError, match="batch_size.*0"):
        evaluate_full_ranking(lambda h, u: None, examples, max_length=3, batch_size=0)
    with pytest.raises(ValueError, match="max_length.*-1"):
        evaluate_full_ranking(lambda h, u: None, examples, max_length=-1)


# ----------------------------------------------------------------------------------------------
# Validation of the evaluator.


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_items": 0}, "num_items.*0"),
        ({"num_items": 5, "ks": ()}, r"ks.*\(\)"),
        ({"num_items": 5, "ks": (1, 6)}, "6"),
        ({"num_items": 5, "ks": (0,)}, "got 0"),
        ({"num_items": 5, "ks": (2.0,)}, "2.0"),
        ({"num_items": 5, "ks": 3}, "iterable.*3"),
        ({"num_items": 5, "ks": (1,), "tie_policy": "random"}, "'random'"),
        ({"num_items": 5, "ks": (1,), "head_fraction": 1.0}, "1.0"),
        ({"num_items": 5, "ks": (1,), "item_popularity": np.ones(5)}, r"\(6,\).*\(5,\)"),
        ({"num_items": 5, "ks": (1,), "item_popularity": np.array([0, 1, np.nan, 1, 1, 1])},
         "nan.*item 2"),
    ],
)
def test_constructor_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FullRankingEvaluator(**kwargs)


def test_ks_are_sorted_and_deduplicated():
    assert FullRankingEvaluator(50, ks=[20, 10, 20]).ks == (10, 20)


def test_update_errors():
    evaluator = FullRankingEvaluator(4, ks=(1,))
    scores = np.zeros((2, 5))
    seen = np.zeros((2, 1), np.int32)
    with pytest.raises(ValueError, match=r"5.*got \[2, 4\]"):
        evaluator.update(np.zeros((2, 4)), np.array([1, 2]), seen)
    with pytest.raises(ValueError, match=r"targets.*\[2\].*\(3,\)"):
        evaluator.update(scores, np.array([1, 2, 3]), seen)
    with pytest.raises(ValueError, match="got 5 at row 1"):
        evaluator.update(scores, np.array([1, 5]), seen)
    with pytest.raises(ValueError, match="got 0 at row 0"):
        evaluator.update(scores, np.array([0, 1]), seen)
    with pytest.raises(ValueError, match="integer.*float"):
        evaluator.update(scores, np.array([1.0, 2.0]), seen)
    with pytest.raises(ValueError, match="seen is required"):
        evaluator.update(scores, np.array([1, 2]), None)
    with pytest.raises(ValueError, match=r"seen.*\(3, 1\)"):
        evaluator.update(scores, np.array([1, 2]), np.zeros((3, 1), np.int32))
    with pytest.raises(ValueError, match="got 7 in row 1"):
        evaluator.update(scores, np.array([1, 2]), np.array([[1], [7]]))
    with pytest.raises(ValueError, match="got -1 in row 0"):
        evaluator.update(scores, np.array([1, 2]), np.array([[-1], [0]]))
    with pytest.raises(ValueError, match="one row per example"):
        evaluator.update(scores, np.array([1, 2]), tf.ragged.constant([[1]]))
    nan_scores = scores.copy()
    nan_scores[1, 3] = np.nan
    with pytest.raises(ValueError, match="NaN.*row 1, item 3"):
        evaluator.update(nan_scores, np.array([1, 2]), seen)
    assert evaluator.num_examples == 0  # failed updates leave no trace


def test_empty_batch_is_a_no_op():
    evaluator = FullRankingEvaluator(4, ks=(1,))
    ranks = evaluator.update(np.zeros((0, 5)), np.zeros(0, np.int64), np.zeros((0, 1), np.int32))
    assert ranks.shape == (0,) and evaluator.num_examples == 0


def test_docstring_examples():
    import doctest

    from tfx_xmatch.evaluation import full_ranking

    failures, attempted = doctest.testmod(full_ranking)
    assert attempted >= 4 and failures == 0
