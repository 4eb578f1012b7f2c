"""Paired significance of a metric difference between two models ranked on the same examples.

"Model A beats model B" on a few thousand test users is a claim about a difference of a few
thousandths, the size of the noise. Both models are ranked on the same examples, so the test is
paired: each example contributes its own gain difference (e.g. HR@10 of A minus HR@10 of B on
that user), and the mean difference gets a confidence interval and a p-value.

Examples on which both models score alike carry no evidence either way, yet they would shrink a
t-test's variance: five users won out of a hundred, the other 95 tied, would read p = 0.025
where five wins out of five read 0.0625. So the test looks at the examples that differ:

- when they all differ by the same amount (HR@K, Recall@K and P@K always do: a hit against a
  miss), the exact sign test over them (McNemar's exact test), with the interval of the
  difference from the Clopper-Pearson interval of the share of them A wins, which agrees with
  the test (the interval excludes 0 exactly when p < 1 - confidence);
- otherwise, when at most ``EXACT_TEST_MAX_DIFFERING`` examples differ, the exact sign-flip
  randomization test of the mean difference over all 2^m sign assignments, without an interval;
- otherwise the paired t-test (``scipy.stats.ttest_rel``), which with that many differing
  examples agrees with the randomization and bootstrap tests IR evaluation also uses (Smucker,
  Allan & Carterette, CIKM 2007).

``PairedDifference.test`` names the test that gave p.

Example:
  >>> a = np.array([0, 3, 20, 1])    # 0-based target ranks of model A per example
  >>> b = np.array([15, 3, 40, 0])   # model B on the same examples
  >>> per_example_gain(a, "HR@10").tolist()
  [1.0, 1.0, 0.0, 1.0]
  >>> result = paired_difference(a, b, "HR@10")
  >>> round(result.difference, 2), result.num_examples
  (0.25, 4)
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
import warnings
from typing import Optional, Sequence

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats

# Per-example gains of the metrics FullRankingEvaluator reports, from a 0-based rank r < K.
GAINS = {
    "HR": lambda ranks, k: np.ones_like(ranks, dtype=np.float64),
    "Recall": lambda ranks, k: np.ones_like(ranks, dtype=np.float64),
    "P": lambda ranks, k: np.full(ranks.shape, 1.0 / k),
    "NDCG": lambda ranks, k: 1.0 / np.log2(ranks + 2.0),
    "MRR": lambda ranks, k: 1.0 / (ranks + 1.0),
}
_METRIC = re.compile(r"^(?P<name>[A-Za-z]+)@(?P<k>[0-9]+)\Z")
TAIL_PREFIX = "Tail"
# Up to this many differing examples of unequal differences, p is the exact randomization test
# (2^20 sums, 8 MB); beyond it the t-test's normal approximation holds.
EXACT_TEST_MAX_DIFFERING = 20
T_TEST, SIGN_TEST, SIGN_FLIP_TEST = "paired t-test", "exact sign test", "exact sign-flip test"
NO_TEST = "none: no example differs"


@dataclasses.dataclass(frozen=True)
class PairedDifference:
    """The mean difference ``A - B`` of a metric over the same examples.

    Attributes:
      metric: The metric compared, e.g. "HR@10".
      mean_a, mean_b: The metric of each model over the compared examples.
      difference: ``mean_a - mean_b``.
      ci_low, ci_high: The ``confidence`` interval of the difference; None under the
        sign-flip test (see the module docstring).
      p_value: Two-sided p-value of "no difference" (1.0 when every example ties).
      num_examples: Examples compared.
      confidence: Level of the interval, e.g. 0.95.
      test: The test that gave ``p_value``: "paired t-test", "exact sign test", "exact
        sign-flip test", or "none: no example differs" (p = 1).
    """

    metric: str
    mean_a: float
    mean_b: float
    difference: float
    ci_low: Optional[float]
    ci_high: Optional[float]
    p_value: float
    num_examples: int
    confidence: float
    test: str = T_TEST

    def significant(self, alpha: Optional[float] = None) -> bool:
        """Whether "no difference" is rejected at ``alpha`` (default ``1 - confidence``)."""
        return self.p_value < (1.0 - self.confidence if alpha is None else alpha)

    def to_dict(self) -> dict:
        # p-values keep every digit: rounding would turn 1e-20 into a false "p = 0".
        return {key: (round(value, 6) if isinstance(value, float) and key != "p_value" else value)
                for key, value in dataclasses.asdict(self).items()}


def _checked_ranks(ranks: ArrayLike, name: str) -> np.ndarray:
    array = np.asarray(ranks)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one 0-based rank per example), got shape {array.shape}")
    if array.size == 0:
        # np.asarray([]) is float64; say what is wrong with it (no examples), not its dtype.
        array = array.astype(np.int64)
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name} must hold integer ranks, got dtype {array.dtype}")
    if array.size and array.min() < 0:
        raise ValueError(f"{name} must be 0-based ranks >= 0, got {int(array.min())} at example "
                         f"{int(np.argmin(array))}")
    return array.astype(np.int64)


def per_example_gain(ranks: ArrayLike, metric: str) -> np.ndarray:
    """Each example's contribution to ``metric`` given its 0-based target rank.

    The mean over examples equals ``FullRankingEvaluator``'s value of the metric.

    Args:
      ranks: int [N] 0-based target ranks (``evaluate_full_ranking(..., return_ranks=True)``).
      metric: "HR@K", "Recall@K", "P@K", "NDCG@K" or "MRR@K" (K a positive int).

    Returns:
      float64 [N].

    Raises:
      ValueError: an unknown metric (quoted) or ranks that are not 1-D non-negative integers.
    """
    ranks = _checked_ranks(ranks, "ranks")
    match = _METRIC.match(metric) if isinstance(metric, str) else None
    if match is None or match["name"] not in GAINS or int(match["k"]) < 1:
        raise ValueError(f"metric must be one of {sorted(GAINS)} followed by @K with K >= 1 (e.g. 'HR@10'), "
                         f"got {metric!r}")
    k = int(match["k"])
    return np.where(ranks < k, GAINS[match["name"]](ranks, k), 0.0)


def paired_difference(
    ranks_a: ArrayLike,
    ranks_b: ArrayLike,
    metric: str,
    *,
    mask: Optional[ArrayLike] = None,
    confidence: float = 0.95,
) -> PairedDifference:
    """Mean difference of ``metric`` (A - B) over the same examples, with a paired test (the
    exact sign test, the exact sign-flip test or the t-test, as the module docstring says).

    Args:
      ranks_a, ranks_b: int [N] 0-based target ranks of models A and B, example by example.
      metric: As in ``per_example_gain``.
      mask: Optional bool [N]: compare only these examples (e.g. the tail targets, which makes
        "Recall@50" the tail recall). Default: all.
      confidence: Level of the interval, in (0, 1). Default 0.95.

    Returns:
      A ``PairedDifference``.

    Raises:
      ValueError: ranks of different lengths, a malformed mask, fewer than two compared
        examples, a confidence outside (0, 1), or an unknown metric.
    """
    ranks_a, ranks_b = _checked_ranks(ranks_a, "ranks_a"), _checked_ranks(ranks_b, "ranks_b")
    if ranks_a.shape != ranks_b.shape:
        raise ValueError(f"ranks_a and ranks_b must rank the same examples: got {ranks_a.size} and "
                         f"{ranks_b.size} ranks")
    _check_confidence(confidence)
    mask = _checked_mask(mask, ranks_a.size)
    return _paired_gains(per_example_gain(ranks_a, metric), per_example_gain(ranks_b, metric), metric, mask,
                         confidence)


def _check_confidence(confidence) -> None:
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be a number in (0, 1), got {confidence!r}")


def _checked_mask(mask: Optional[ArrayLike], num_examples: int, name: str = "mask") -> Optional[np.ndarray]:
    if mask is None:
        return None
    mask = np.asarray(mask)
    if mask.dtype != np.bool_ or mask.shape != (num_examples,):
        raise ValueError(f"{name} must be bool with one entry per example ({num_examples}), "
                         f"got dtype {mask.dtype} and shape {mask.shape}")
    return mask


def _paired_gains(gains_a: np.ndarray, gains_b: np.ndarray, metric: str, mask: Optional[np.ndarray],
                  confidence: float) -> PairedDifference:
    """The paired test of per-example gains (optionally of the ``mask``ed examples only)."""
    num_examples = gains_a.size
    if mask is not None:
        gains_a, gains_b = gains_a[mask], gains_b[mask]
    if gains_a.size < 2:
        where = f" after the mask ({num_examples} before)" if mask is not None else ""
        raise ValueError(f"need at least two examples to compare {metric}, got {gains_a.size}{where}")
    differences = gains_a - gains_b
    differing = differences[differences != 0.0]
    test, low, high = T_TEST, None, None
    if differing.size == 0:
        test, low, high, p_value = NO_TEST, 0.0, 0.0, 1.0
    elif np.all(np.abs(differing) == abs(differing[0])):
        test = SIGN_TEST
        sign_test = stats.binomtest(int(np.count_nonzero(differing > 0)), differing.size)
        share_won = sign_test.proportion_ci(confidence, method="exact")
        # difference = step * (wins - losses) / n = step * m / n * (2 * share won - 1)
        scale = abs(float(differing[0])) * differing.size / differences.size
        low, high, p_value = scale * (2 * share_won.low - 1), scale * (2 * share_won.high - 1), sign_test.pvalue
    elif differing.size <= EXACT_TEST_MAX_DIFFERING:
        test, p_value = SIGN_FLIP_TEST, _sign_flip_p_value(differing)
    else:
        t_test = stats.ttest_rel(gains_a, gains_b)
        interval = t_test.confidence_interval(confidence)
        low, high, p_value = float(interval.low), float(interval.high), float(t_test.pvalue)
    return PairedDifference(metric=metric, mean_a=float(gains_a.mean()), mean_b=float(gains_b.mean()),
                            difference=float(differences.mean()), ci_low=None if low is None else float(low),
                            ci_high=None if high is None else float(high), p_value=min(1.0, float(p_value)),
                            num_examples=int(gains_a.size), confidence=float(confidence), test=test)


def _sign_flip_p_value(differing: np.ndarray) -> float:
    """Share of the 2^m sign assignments of the differences whose sum is at least as far from 0
    as the observed one (two-sided, the observed assignment included)."""
    sums = np.zeros(1)
    for value in differing:
        sums = np.concatenate([sums + value, sums - value])
    observed = abs(float(differing.sum()))
    # Sums equal to the observed one up to rounding count as at least as extreme.
    return float(np.mean(np.abs(sums) >= observed - 1e-9 * max(1.0, observed)))


def compare_metrics(ranks: np.ndarray, reference: np.ndarray, metrics: Sequence[str],
                    is_tail_target: Optional[np.ndarray] = None, confidence: float = 0.95) -> dict:
    """Paired differences (row minus reference) of each metric: {metric: PairedDifference dict}.

    ``TailRecall@K`` compares ``Recall@K`` over the users whose target is a tail item
    (``is_tail_target``, bool [num_users]).

    Raises:
      ValueError: an unknown metric (quoted), a tail metric without ``is_tail_target``, or ranks
        of different users.
    """
    result = {}
    for metric in metrics:
        base, mask = _metric_and_mask(metric, is_tail_target)
        difference = paired_difference(ranks, reference, base, mask=mask, confidence=confidence)
        result[metric] = {**difference.to_dict(), "metric": metric}
    return result


def _metric_and_mask(metric: str, is_tail_target: Optional[ArrayLike]) -> tuple[str, Optional[ArrayLike]]:
    """("Recall@K", is_tail_target) for "TailRecall@K", (metric, None) otherwise; checks the name."""
    check_metric(metric)
    if not metric.startswith(TAIL_PREFIX):
        return metric, None
    if is_tail_target is None:
        raise ValueError(f"{metric!r} needs is_tail_target (which users' targets are tail items)")
    return metric[len(TAIL_PREFIX):], is_tail_target


def compare_run_groups(runs_a: Sequence[ArrayLike], runs_b: Sequence[ArrayLike], metrics: Sequence[str],
                       is_tail_target: Optional[ArrayLike] = None, confidence: float = 0.95,
                       paired_runs: bool = False) -> dict:
    """Is model A better than model B over several training runs of each, on the same examples?

    A paired test over examples answers for the two *runs* it compares: it holds the trained
    weights fixed, so the spread between two trainings of one config (on ML-1M as large as the
    differences between models) is not in its interval. With several runs (seeds) of each model
    this reports, per metric:

    - ``averaged``: the paired test (as ``paired_difference``) of each example's gain averaged
      over each model's runs (the noise of the choice of examples; averaging shrinks the
      run-to-run noise in the estimate, but the interval still holds the runs fixed);
    - ``across_runs``: a t-test of the runs' metric values, whose noise is the run-to-run spread
      (the examples held fixed): Welch's for independent runs, or a paired one over run i of A
      and run i of B with ``paired_runs``. ``None`` with fewer than two runs a side; with a few
      runs it has little power, which is the honest answer;
    - ``pairings``: the paired test of every run of A against every run of B (with
      ``paired_runs``, run i against run i), and how many are significant each way (descriptive);
    - ``verdict``: "A better" or "B better" only when ``averaged`` and ``across_runs`` are both
      significant the same way (each at 1 - ``confidence``), else "no significant difference",
      or "needs 2+ runs a side".

    Args:
      runs_a, runs_b: Each a sequence of int [N] 0-based target ranks, one per training run, all
        over the same N examples.
      metrics: As in ``compare_metrics`` (``TailRecall@K`` included).
      is_tail_target: bool [N], needed by tail metrics.
      confidence: Level of the intervals and tests, in (0, 1). Default 0.95.
      paired_runs: Run i of A and run i of B share their training (e.g. two serving paths, or
        two samplers, of the same trained models), so they are compared pairwise (bool, default
        False; needs as many runs on each side).

    Returns:
      {metric: {"runs_a": [value per run], "runs_b": [...], "averaged": PairedDifference dict,
      "across_runs": dict or None, "pairings": [PairedDifference dict with "run_a", "run_b"],
      "significant_for_a": int, "significant_for_b": int, "verdict": str}}.

    Raises:
      ValueError: an empty group, ranks of different examples (naming the run), unequal groups
        with ``paired_runs``, an unknown metric (quoted), or a tail metric without
        ``is_tail_target``.
    """
    _check_confidence(confidence)
    groups = []
    for name, runs in (("runs_a", runs_a), ("runs_b", runs_b)):
        runs = [_checked_ranks(ranks, f"{name}[{i}]") for i, ranks in enumerate(runs)]
        if not runs:
            raise ValueError(f"{name} must hold at least one run's ranks, got none")
        groups.append(runs)
    size = groups[0][0].size
    for name, runs in zip(("runs_a", "runs_b"), groups):
        for i, ranks in enumerate(runs):
            if ranks.size != size:
                raise ValueError(f"every run must rank the same examples: {name}[{i}] ranks {ranks.size}, "
                                 f"runs_a[0] {size}")
    if paired_runs and len(groups[0]) != len(groups[1]):
        raise ValueError(f"paired_runs needs as many runs on each side, got {len(groups[0])} and {len(groups[1])}")
    alpha = 1.0 - confidence
    result = {}
    for metric in metrics:
        base, mask = _metric_and_mask(metric, is_tail_target)
        mask = _checked_mask(mask, size, "is_tail_target")
        gains_a, gains_b = ([per_example_gain(ranks, base) for ranks in runs] for runs in groups)
        pairs = ([(i, i) for i in range(len(gains_a))] if paired_runs
                 else [(i, j) for i in range(len(gains_a)) for j in range(len(gains_b))])
        pairings = {(i, j): _paired_gains(gains_a[i], gains_b[j], metric, mask, confidence) for i, j in pairs}
        kept = slice(None) if mask is None else mask
        values_a = [float(gains[kept].mean()) for gains in gains_a]
        values_b = [float(gains[kept].mean()) for gains in gains_b]
        averaged = _paired_gains(np.mean(gains_a, axis=0), np.mean(gains_b, axis=0), metric, mask, confidence)
        across = _across_runs(values_a, values_b, confidence, paired_runs)
        # Both tests estimate the same difference (the mean of per-run means is the mean of the
        # per-user averages), so agreeing in significance is agreeing in direction.
        if across is None:
            verdict = "needs 2+ runs a side"
        elif across["p_value"] is not None and across["p_value"] < alpha and averaged.significant():
            verdict = "A better" if averaged.difference > 0 else "B better"
        else:
            verdict = "no significant difference"
        result[metric] = {
            "runs_a": [round(v, 6) for v in values_a], "runs_b": [round(v, 6) for v in values_b],
            "averaged": {**averaged.to_dict(), "metric": metric}, "across_runs": across,
            "pairings": [{**paired.to_dict(), "run_a": i, "run_b": j} for (i, j), paired in pairings.items()],
            "significant_for_a": sum(p.significant() and p.difference > 0 for p in pairings.values()),
            "significant_for_b": sum(p.significant() and p.difference < 0 for p in pairings.values()),
            "verdict": verdict,
        }
    return result


def compare_run_values(values_a: Sequence[float], values_b: Sequence[float], confidence: float = 0.95,
                       paired_runs: bool = False) -> Optional[dict]:
    """The test over runs of ``compare_run_groups`` from the runs' metric values alone.

    For runs whose per-example ranks are gone but whose metric values were recorded (a results
    page): the run-to-run spread is still there to test, the per-example noise is not, so this is
    half of ``compare_run_groups``'s verdict, never the whole of it.

    Args:
      values_a, values_b: One metric's value per training run of model A and of model B.
      confidence: Level of the interval and the test, in (0, 1). Default 0.95.
      paired_runs: Run i of A and run i of B share their training: a paired t-test (bool,
        default False: Welch's t-test); needs as many values on each side.

    Returns:
      ``{"test", "difference", "num_runs_a", "num_runs_b", "confidence", "ci_low", "ci_high",
      "p_value"}`` (p and the interval ``None``, with a ``note``, when no run differs from another),
      or None with fewer than two runs a side.

    Raises:
      ValueError: a value that is not a finite number (quoted), unequal sides with
        ``paired_runs``, or a confidence outside (0, 1).

    Example:
      >>> test = compare_run_values([0.3046, 0.3030], [0.2899, 0.3023, 0.2997])  # HR@10 per run
      >>> test["test"], round(test["difference"], 4), round(test["p_value"], 2)
      ("Welch's t-test over runs", 0.0065, 0.22)
    """
    _check_confidence(confidence)
    checked = []
    for name, values in (("values_a", values_a), ("values_b", values_b)):
        values = list(values)
        if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) for v in values):
            raise ValueError(f"{name} must be finite numbers, one per run, got {values!r}")
        checked.append([float(v) for v in values])
    if paired_runs and len(checked[0]) != len(checked[1]):
        raise ValueError(f"paired_runs needs as many runs on each side, got {len(checked[0])} and {len(checked[1])}")
    return _across_runs(checked[0], checked[1], confidence, paired_runs)


def _across_runs(values_a: list, values_b: list, confidence: float, paired: bool) -> Optional[dict]:
    """The t-test of two groups of run-level metric values: Welch's, or paired run by run; None
    with fewer than 2 runs a side. Runs without any spread leave it undefined (p ``None``): with
    two or three runs that means the same run twice or a seed that was not applied, not certainty."""
    if min(len(values_a), len(values_b)) < 2:
        return None
    difference = float(np.mean(values_a) - np.mean(values_b))
    spread = np.ptp(np.subtract(values_a, values_b)) if paired else max(np.ptp(values_a), np.ptp(values_b))
    report = {"test": "paired t-test over runs" if paired else "Welch's t-test over runs",
              "difference": round(difference, 6), "num_runs_a": len(values_a), "num_runs_b": len(values_b),
              "confidence": float(confidence)}
    if spread == 0:
        note = ("every run pair differs by the same amount: the t-test is undefined" if paired and difference
                else "the runs' values do not vary: the same run given twice, or the seed not applied?")
        return {**report, "ci_low": None, "ci_high": None, "p_value": None, "note": note}
    with warnings.catch_warnings():
        # One model's runs may all score alike (a variance of 0 is valid on one side); scipy
        # warns of precision loss for exactly that case.
        warnings.simplefilter("ignore", RuntimeWarning)
        test = (stats.ttest_rel(values_a, values_b) if paired
                else stats.ttest_ind(values_a, values_b, equal_var=False))
    interval = test.confidence_interval(confidence)
    return {**report, "ci_low": round(float(interval.low), 6), "ci_high": round(float(interval.high), 6),
            "p_value": float(test.pvalue)}


def check_metric(metric: str, num_items: Optional[int] = None) -> None:
    """Raises ValueError quoting ``metric`` unless ``compare_metrics`` can compute it, with its
    cutoff K at most ``num_items`` when that is given (a longer list than the catalogue would
    score every user a hit)."""
    name = metric[len(TAIL_PREFIX):] if isinstance(metric, str) and metric.startswith(TAIL_PREFIX + "Recall@") \
        else metric
    try:
        per_example_gain(np.zeros(1, np.int64), name)
    except ValueError:
        raise ValueError(f"metric must be HR@K, Recall@K, P@K, NDCG@K, MRR@K or TailRecall@K, got {metric!r}") from None
    cutoff = int(_METRIC.match(name)["k"])
    if num_items is not None and cutoff > num_items:
        raise ValueError(f"metric {metric!r}: K must be in [1, num_items={num_items}], got {cutoff}")


def format_difference(difference: dict) -> str:
    """``+0.0016 [-0.0040, +0.0072] p=0.58`` (difference, confidence interval, p-value); an
    undefined test (p ``None``) reads ``+0.0016 (no test: no spread)``, and a test without an
    interval names itself: ``+0.0120 (exact sign-flip test) p=0.031``."""
    if difference.get("p_value") is None:
        return f"{difference['difference']:+.4f} (no test: no spread)"
    if difference.get("ci_low") is None:
        return f"{difference['difference']:+.4f} ({difference.get('test', 'no interval')}) p={difference['p_value']:.2g}"
    return (f"{difference['difference']:+.4f} [{difference['ci_low']:+.4f}, {difference['ci_high']:+.4f}] "
            f"p={difference['p_value']:.2g}")


# What results pages say of their p-values. A comparison recorded before ``PairedDifference``
# named its test holds a t-test's p (the sign tests came later): it is marked, not relabelled.
PAIRED_TESTS = (f"the paired test of tfx_xmatch.evaluation.paired_difference: the exact sign test when every "
                f"example that differs differs by the same amount (HR, Recall and P of one run a side), else the "
                f"exact sign-flip test when at most {EXACT_TEST_MAX_DIFFERING} examples differ, else a t-test")
UNNAMED_TEST_NOTE = "p-values marked † were computed before the test was recorded: paired t-tests"


def format_recorded_difference(difference: dict) -> str:
    """``format_difference``, marked † when the record does not name its test (a t-test's p)."""
    return format_difference(difference) + ("" if "test" in difference else " †")


def describe_recorded_tests(differences) -> str:
    """``PAIRED_TESTS``, with ``UNNAMED_TEST_NOTE`` when one of ``differences`` (dicts) is marked."""
    marked = any("test" not in difference for difference in differences)
    return PAIRED_TESTS + (f"; {UNNAMED_TEST_NOTE}" if marked else "")
