"""Paired significance of metric differences: gains against the evaluator, the t-test against
its formula, and the named errors."""

import doctest
import re

import numpy as np
import pytest
from scipy import stats

from tfx_xmatch.data.dataset import EvalExamples, pad_histories
from tfx_xmatch.evaluation import (
    FullRankingEvaluator, compare_run_groups, compare_run_values, evaluate_full_ranking, format_difference, is_tail_target,
    paired_difference, per_example_gain,
)
from tfx_xmatch.evaluation import significance


def _ranked(seed: int, num_examples: int = 300, num_items: int = 60):
    """Random scores ranked by the evaluator: (evaluator, ranks, targets, popularity)."""
    rng = np.random.default_rng(seed)
    popularity = rng.integers(1, 100, num_items + 1)
    evaluator = FullRankingEvaluator(num_items, ks=(1, 5, 10, 20), mask_history=False,
                                     item_popularity=popularity)
    targets = rng.integers(1, num_items + 1, num_examples)
    scores = rng.normal(size=(num_examples, num_items + 1))
    scores[np.arange(num_examples), targets] += rng.uniform(0, 3, num_examples)  # a better-than-random model
    ranks = evaluator.update(scores, targets)
    return evaluator, ranks, targets, popularity


@pytest.mark.parametrize("metric", ["HR@1", "HR@10", "Recall@20", "NDCG@10", "MRR@20", "P@5", "NDCG@1"])
def test_mean_gain_is_the_evaluators_metric(metric):
    evaluator, ranks, _, _ = _ranked(0)
    assert per_example_gain(ranks, metric).mean() == pytest.approx(evaluator.result()[metric], abs=1e-12)


def test_mask_of_tail_targets_gives_tail_recall():
    evaluator, ranks, targets, popularity = _ranked(1)
    is_tail = is_tail_target(targets, popularity)
    np.testing.assert_array_equal(is_tail, evaluator.is_tail[targets])
    result = paired_difference(ranks, ranks + 5, "Recall@20", mask=is_tail)
    assert result.mean_a == pytest.approx(evaluator.result()["TailRecall@20"], abs=1e-12)
    assert result.num_examples == int(is_tail.sum())


def test_t_test_matches_its_formula():
    _, ranks_a, _, _ = _ranked(2)
    _, ranks_b, _, _ = _ranked(3)
    result = paired_difference(ranks_a, ranks_b, "NDCG@10", confidence=0.9)
    d = per_example_gain(ranks_a, "NDCG@10") - per_example_gain(ranks_b, "NDCG@10")
    n, se = d.size, d.std(ddof=1) / np.sqrt(d.size)
    t = d.mean() / se
    half_width = stats.t.ppf(0.95, n - 1) * se
    assert result.difference == pytest.approx(d.mean())
    assert result.p_value == pytest.approx(2 * stats.t.sf(abs(t), n - 1))
    assert (result.ci_low, result.ci_high) == pytest.approx((d.mean() - half_width, d.mean() + half_width))
    assert result.mean_a - result.mean_b == pytest.approx(result.difference)
    # The interval excludes 0 exactly when the test rejects at 1 - confidence.
    assert result.significant() == (not result.ci_low <= 0.0 <= result.ci_high)


def test_a_clear_win_is_significant_and_a_copy_is_not():
    _, ranks, _, _ = _ranked(4, num_examples=2000)
    better = np.maximum(ranks - 3, 0)
    win = paired_difference(better, ranks, "HR@10")
    assert win.difference > 0 and win.significant() and win.ci_low > 0
    same = paired_difference(ranks, ranks, "HR@10")
    assert (same.difference, same.p_value, same.ci_low, same.ci_high) == (0.0, 1.0, 0.0, 0.0)
    assert same.test == "none: no example differs"
    assert not same.significant()
    assert set(win.to_dict()) == {"metric", "mean_a", "mean_b", "difference", "ci_low", "ci_high", "p_value",
                                  "num_examples", "confidence", "test"}
    # A tiny p-value is kept, not rounded to a false zero.
    assert 0.0 < win.to_dict()["p_value"] == win.p_value < 1e-6


def test_a_constant_difference_gets_the_exact_sign_test_not_certainty():
    # Two examples that both move by one rank step once reported p = 0.
    two = paired_difference(np.array([0, 0]), np.array([50, 50]), "HR@10")
    assert (two.difference, two.p_value, two.test) == (1.0, 0.5, "exact sign test")
    # The interval agrees with p = 0.5: it holds 0 (a zero-width one at +1 would not).
    assert two.ci_low < 0.0 < two.ci_high == 1.0
    assert format_difference(two.to_dict()) == "+1.0000 [-0.6838, +1.0000] p=0.5"
    assert not two.significant()
    many = paired_difference(np.zeros(40, int), np.full(40, 50), "HR@10")
    assert many.p_value == pytest.approx(2.0 * 0.5 ** 40) and many.significant() and many.ci_low > 0


@pytest.mark.parametrize("num_examples", [5, 100, 6040, 10000])
def test_examples_that_tie_add_no_evidence(num_examples):
    # Five users that A hits and B misses, every other user scored alike by both: the t-test
    # over all users once read p = 0.025 at 100 users, where five wins out of five are
    # p = 0.0625. The users that tie must not change p.
    ranks_a, ranks_b = np.full(num_examples, 50), np.full(num_examples, 50)
    ranks_a[:5] = 0
    result = paired_difference(ranks_a, ranks_b, "HR@10")
    assert result.test == "exact sign test"
    assert result.p_value == pytest.approx(stats.binomtest(5, 5).pvalue) == pytest.approx(0.0625)
    assert not result.significant() and result.ci_low < 0.0 < result.ci_high
    assert result.difference == pytest.approx(5 / num_examples)


def test_sign_test_is_mcnemars_and_its_interval_agrees_with_it():
    rng = np.random.default_rng(7)
    for _ in range(50):
        num_examples = int(rng.integers(20, 400))
        ranks_a, ranks_b = rng.integers(0, 25, num_examples), rng.integers(0, 25, num_examples)
        result = paired_difference(ranks_a, ranks_b, "HR@10")
        hit_a, hit_b = ranks_a < 10, ranks_b < 10
        wins, losses = int(np.sum(hit_a & ~hit_b)), int(np.sum(hit_b & ~hit_a))
        if wins + losses == 0:
            continue
        assert result.p_value == pytest.approx(stats.binomtest(wins, wins + losses).pvalue)
        assert result.ci_low <= result.difference <= result.ci_high
        assert result.significant() == (not result.ci_low <= 0.0 <= result.ci_high)


def test_few_unequal_differences_get_the_exact_sign_flip_test():
    ranks_a, ranks_b = np.full(200, 60), np.full(200, 60)
    ranks_a[:6], ranks_b[:6] = [0, 1, 2, 0, 5, 3], [4, 9, 7, 1, 6, 0]
    result = paired_difference(ranks_a, ranks_b, "NDCG@10")
    differences = (per_example_gain(ranks_a, "NDCG@10") - per_example_gain(ranks_b, "NDCG@10"))[:6]
    signs = np.array(np.meshgrid(*[[-1.0, 1.0]] * 6)).reshape(6, -1).T
    oracle = np.mean(np.abs(signs @ differences) >= abs(differences.sum()) - 1e-12)
    assert result.test == "exact sign-flip test" and result.p_value == pytest.approx(oracle)
    assert (result.ci_low, result.ci_high) == (None, None)
    assert format_difference(result.to_dict()).endswith(f"(exact sign-flip test) p={oracle:.2g}")
    # Beyond EXACT_TEST_MAX_DIFFERING examples that differ, the t-test takes over.
    assert paired_difference(_ranked(2)[1], _ranked(3)[1], "NDCG@10").test == "paired t-test"


def test_a_list_of_python_floats_is_ranked_in_double_precision():
    # tf.convert_to_tensor makes a float list float32, where 1.0 + 1e-9 ties 1.0 and the
    # pessimistic tie rule put the target one place lower than the same scores as NumPy.
    scores = [[0.0, 1.0, 1.0 + 1e-9]]
    as_list = FullRankingEvaluator(2, ks=(1,), mask_history=False).update(scores, [2])
    as_array = FullRankingEvaluator(2, ks=(1,), mask_history=False).update(np.array(scores), [2])
    assert as_list.tolist() == as_array.tolist() == [0]


def test_noise_is_rarely_significant():
    # Two equally good models: about 5% of seeds may reject at 0.05, far from all of them.
    rejected = sum(paired_difference(_ranked(10 + seed)[1], _ranked(100 + seed)[1], "HR@10").significant()
                   for seed in range(20))
    assert rejected <= 4


def test_ranks_come_back_in_example_order_across_batches():
    rng = np.random.default_rng(5)
    num_items, num_examples = 30, 23
    scores = rng.normal(size=(num_examples, num_items + 1))
    examples = EvalExamples(user_rows=np.arange(num_examples),
                            histories=[rng.integers(1, num_items + 1, rng.integers(1, 6)) for _ in range(num_examples)],
                            targets=rng.integers(1, num_items + 1, num_examples))
    metrics, ranks = evaluate_full_ranking(lambda histories, rows: scores[rows], examples, max_length=5,
                                           batch_size=4, ks=(10,), return_ranks=True)
    oracle = FullRankingEvaluator(num_items, ks=(10,))
    expected = oracle.update(scores, examples.targets, pad_histories(list(examples.histories), 5))
    np.testing.assert_array_equal(ranks, expected)
    assert metrics == oracle.result()
    assert per_example_gain(ranks, "HR@10").mean() == pytest.approx(metrics["HR@10"])


@pytest.mark.parametrize("call, message", [
    (lambda: per_example_gain([1, 2], "AUC@10"), "'AUC@10'"),
    (lambda: per_example_gain([1, 2], "HR@0"), "'HR@0'"),
    (lambda: per_example_gain([1, 2], "HR10"), "'HR10'"),
    (lambda: per_example_gain([[1, 2]], "HR@10"), "1-D"),
    (lambda: per_example_gain([1.5, 2.0], "HR@10"), "integer"),
    (lambda: per_example_gain([3, -1], "HR@10"), "got -1 at example 1"),
    (lambda: paired_difference([1, 2], [1, 2, 3], "HR@10"), "2 and 3 ranks"),
    (lambda: paired_difference([1, 2], [1, 2], "HR@10", confidence=1.0), "got 1.0"),
    (lambda: paired_difference([1, 2], [1, 2], "HR@10", mask=[1, 0]), "mask must be bool"),
    (lambda: paired_difference([1, 2], [1, 2], "HR@10", mask=np.array([True, False])), "HR@10, got 1 after the mask"),
    (lambda: compare_run_groups([], [[1, 2]], ["HR@10"]), "runs_a must hold at least one"),
    (lambda: compare_run_groups([[1, 2]], [[1, 2], [1, 2, 3]], ["HR@10"]), "runs_b\\[1\\] ranks 3, runs_a\\[0\\] 2"),
    (lambda: compare_run_groups([[1, 2]], [[1, 2]], ["TailRecall@10"], is_tail_target=[1, 0]), "is_tail_target must be bool"),
    (lambda: compare_run_groups([[1, 2]], [[1, 2]], ["TailRecall@10"]), "'TailRecall@10' needs is_tail_target"),
    (lambda: compare_run_groups([[1, 2]], [[1, 2]], ["AUC@10"]), "'AUC@10'"),
    (lambda: compare_run_groups([[1, -2]], [[1, 2]], ["HR@10"]), "runs_a\\[0\\]"),
    (lambda: paired_difference([], [], "HR@10"), "need at least two examples to compare HR@10, got 0"),
    (lambda: per_example_gain([1, 2], "HR@10\n"), re.escape(repr("HR@10\n"))),
    (lambda: is_tail_target([-1], np.ones(5)), "got -1 at row 0"),
    (lambda: is_tail_target([1, 0], np.ones(5)), "got 0 at row 1"),
    (lambda: is_tail_target([5], np.ones(5)), "in \\[1, 4\\], got 5"),
    (lambda: is_tail_target([1.0], np.ones(5)), "integer item indices"),
    (lambda: is_tail_target([1], [0, 3, -2, 1]), "counts >= 0, got -2 for item 2"),
])
def test_errors_name_the_bad_value(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def _runs(seed: int, shift: float, count: int, num_examples: int = 2000) -> list:
    """``count`` runs' ranks over the same examples: a shared per-example difficulty (the users)
    plus per-run noise (the training runs), ranks lower by ``shift`` on average."""
    difficulty = np.random.default_rng(0).exponential(8.0, num_examples)
    rng = np.random.default_rng(seed)
    return [np.maximum(difficulty - shift + rng.normal(0, 3, num_examples), 0).astype(np.int64) for _ in range(count)]


def test_run_groups_report_every_pairing_the_average_and_the_run_spread():
    runs_a, runs_b = _runs(1, 3.0, 2), _runs(2, 0.0, 3)
    is_tail = np.random.default_rng(3).random(2000) < 0.3
    result = compare_run_groups(runs_a, runs_b, ["HR@10", "TailRecall@10"], is_tail_target=is_tail)
    hr = result["HR@10"]
    assert hr["runs_a"] == pytest.approx([per_example_gain(r, "HR@10").mean() for r in runs_a], abs=1e-6)
    assert hr["runs_b"] == pytest.approx([per_example_gain(r, "HR@10").mean() for r in runs_b], abs=1e-6)
    assert [(p["run_a"], p["run_b"]) for p in hr["pairings"]] == [(i, j) for i in range(2) for j in range(3)]
    assert hr["pairings"][5]["p_value"] == pytest.approx(paired_difference(runs_a[1], runs_b[2], "HR@10").p_value)
    averaged = stats.ttest_rel(np.mean([per_example_gain(r, "HR@10") for r in runs_a], axis=0),
                               np.mean([per_example_gain(r, "HR@10") for r in runs_b], axis=0))
    assert hr["averaged"]["p_value"] == pytest.approx(averaged.pvalue)
    welch = stats.ttest_ind(hr["runs_a"], hr["runs_b"], equal_var=False)
    assert hr["across_runs"]["p_value"] == pytest.approx(welch.pvalue, rel=1e-4)
    assert hr["across_runs"]["test"] == "Welch's t-test over runs"
    # Both tests estimate one difference, which is why the verdict needs no direction check.
    assert hr["across_runs"]["difference"] == pytest.approx(hr["averaged"]["difference"], abs=1e-6)
    assert hr["verdict"] == "A better" and hr["significant_for_a"] == 6
    tail = result["TailRecall@10"]
    assert tail["averaged"]["num_examples"] == is_tail.sum()
    assert tail["runs_a"][0] == pytest.approx(per_example_gain(runs_a[0], "HR@10")[is_tail].mean(), abs=1e-6)


def test_one_run_per_model_has_no_verdict_and_a_tie_is_no_difference():
    runs = _runs(1, 0.0, 2)
    result = compare_run_groups(runs[:1], runs[1:], ["NDCG@10"])["NDCG@10"]
    assert result["across_runs"] is None and len(result["pairings"]) == 1
    assert result["verdict"] == "needs 2+ runs a side"
    same = compare_run_groups(runs, runs, ["HR@10"])["HR@10"]
    assert same["verdict"] == "no significant difference" and same["averaged"]["difference"] == 0
    assert same["across_runs"]["difference"] == 0 and same["across_runs"]["p_value"] == pytest.approx(1.0)


def test_runs_without_spread_leave_the_test_over_runs_undefined():
    runs = _runs(1, 0.0, 1) * 2  # the same run given twice
    other = _runs(2, 3.0, 1) * 2
    across = compare_run_groups(other, runs, ["HR@10"])["HR@10"]
    assert across["across_runs"]["p_value"] is None and "the same run given twice" in across["across_runs"]["note"]
    assert across["verdict"] == "no significant difference"
    assert significance.format_difference(across["across_runs"]).endswith("(no test: no spread)")


def test_paired_runs_compare_run_i_with_run_i():
    runs_a, runs_b = _runs(1, 3.0, 3), _runs(2, 0.0, 3)
    result = compare_run_groups(runs_a, runs_b, ["HR@10"], paired_runs=True)["HR@10"]
    assert [(p["run_a"], p["run_b"]) for p in result["pairings"]] == [(0, 0), (1, 1), (2, 2)]
    paired = stats.ttest_rel(result["runs_a"], result["runs_b"])
    assert result["across_runs"]["test"] == "paired t-test over runs"
    assert result["across_runs"]["p_value"] == pytest.approx(paired.pvalue, rel=1e-4)
    with pytest.raises(ValueError, match="as many runs on each side, got 3 and 2"):
        compare_run_groups(runs_a, runs_b[:2], ["HR@10"], paired_runs=True)


def test_run_values_alone_get_the_same_test_over_runs():
    runs_a, runs_b = _runs(1, 3.0, 2), _runs(2, 0.0, 3)
    grouped = compare_run_groups(runs_a, runs_b, ["HR@10"])["HR@10"]
    assert compare_run_values(grouped["runs_a"], grouped["runs_b"]) == grouped["across_runs"]
    paired = compare_run_groups(runs_a, runs_b[:2], ["HR@10"], paired_runs=True)["HR@10"]
    assert compare_run_values(paired["runs_a"], paired["runs_b"], paired_runs=True) == paired["across_runs"]
    assert compare_run_values(np.float32([0.3, 0.31]), [0.28, 0.29])["num_runs_b"] == 2  # NumPy values count
    assert compare_run_values([0.3], [0.28, 0.29]) is None
    for bad in ([0.3, float("nan")], [0.3, "0.31"], [0.3, True]):
        with pytest.raises(ValueError, match=re.escape(f"values_a must be finite numbers, one per run, got {bad!r}")):
            compare_run_values(bad, [0.28, 0.29])
    with pytest.raises(ValueError, match="as many runs on each side, got 2 and 3"):
        compare_run_values([0.3, 0.31], [0.28, 0.29, 0.3], paired_runs=True)
    with pytest.raises(ValueError, match="confidence"):
        compare_run_values([0.3, 0.31], [0.28, 0.29], confidence=1.5)


def test_docstring_examples():
    failures, attempted = doctest.testmod(significance)
    assert attempted >= 4 and failures == 0
