"""Full-ranking retrieval metrics (HR, NDCG, MRR, precision, tail recall, coverage)."""

from tfx_xmatch.evaluation.full_ranking import (
    TIE_POLICIES,
    FullRankingEvaluator,
    evaluate_full_ranking,
)

__all__ = ["TIE_POLICIES", "FullRankingEvaluator", "evaluate_full_ranking"]
