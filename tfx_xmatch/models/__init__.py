"""Retrieval models (each a tfrs.models.Model), by the name a config uses."""

from tfx_xmatch.models.sparcode import SparCode
from tfx_xmatch.models.two_tower import TwoTower

MODELS = {"two_tower": TwoTower, "sparcode": SparCode}

__all__ = ["MODELS", "SparCode", "TwoTower"]
