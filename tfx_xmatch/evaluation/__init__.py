"""Full-ranking retrieval metrics (HR, NDCG, MRR, precision, tail recall, coverage) and paired
significance of a difference between two models."""

from tfx_xmatch.evaluation.full_ranking import (
    TIE_POLICIES,
    FullRankingEvaluator,
    evaluate_full_ranking,
)
from tfx_xmatch.evaluation.significance import PairedDifference, paired_difference, per_example_gain

__all__ = ["TIE_POLICIES", "FullRankingEvaluator", "PairedDifference", "evaluate_full_ranking",
           "paired_difference", "per_example_gain"]
