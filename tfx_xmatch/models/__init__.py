"""Retrieval models (each a tfrs.models.Model), by the name a config uses."""

from tfx_xmatch.models.sparc import SPARC
from tfx_xmatch.models.sparcode import SparCode
from tfx_xmatch.models.t2diff import T2Diff
from tfx_xmatch.models.two_tower import TwoTower

MODELS = {"two_tower": TwoTower, "sparcode": SparCode, "sparc": SPARC, "t2diff": T2Diff}

__all__ = ["MODELS", "SPARC", "SparCode", "T2Diff", "TwoTower"]
