"""Full-ranking retrieval metrics (HR, NDCG, MRR, precision, tail recall, coverage) and paired
significance of a difference between two models."""

from tfx_xmatch.evaluation.full_ranking import (
    TIE_POLICIES,
    FullRankingEvaluator,
    evaluate_full_ranking,
    is_tail_target,
)
from tfx_xmatch.evaluation.significance import (
    PairedDifference,
    check_metric,
    compare_metrics,
    compare_run_groups,
    compare_run_values,
    describe_recorded_tests,
    format_difference,
    format_recorded_difference,
    paired_difference,
    per_example_gain,
)

__all__ = ["TIE_POLICIES", "FullRankingEvaluator", "PairedDifference", "check_metric", "compare_metrics",
           "compare_run_groups", "compare_run_values", "describe_recorded_tests", "evaluate_full_ranking",
           "format_difference", "format_recorded_difference", "is_tail_target",
           "paired_difference", "per_example_gain"]
