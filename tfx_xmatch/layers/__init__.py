"""Keras layers shared by the tfx_xmatch models."""

from tfx_xmatch.layers.all_to_all_interaction import AllToAllInteraction
from tfx_xmatch.layers.causal_transformer_block import CausalTransformerBlock
from tfx_xmatch.layers.drift_denoiser import DriftDenoiser
from tfx_xmatch.layers.item_tower import ItemTower
from tfx_xmatch.layers.mean_pooling_encoder import MeanPoolingEncoder
from tfx_xmatch.layers.mixed_attention import MixedAttention
from tfx_xmatch.layers.noise_schedule import NoiseSchedule
from tfx_xmatch.layers.residual_quantizer import ResidualQuantizer
from tfx_xmatch.layers.sasrec_encoder import SASRecEncoder
from tfx_xmatch.layers.target_attention import TargetAttention
from tfx_xmatch.layers.vector_quantizer import VectorQuantizer

__all__ = [
    "AllToAllInteraction",
    "CausalTransformerBlock",
    "DriftDenoiser",
    "ItemTower",
    "MeanPoolingEncoder",
    "MixedAttention",
    "NoiseSchedule",
    "ResidualQuantizer",
    "SASRecEncoder",
    "TargetAttention",
    "VectorQuantizer",
]
