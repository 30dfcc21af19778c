"""Thin ``nn.Module`` wrappers over the fused ops, and the LMGA block."""

from megan_fast.nn.deform_conv import DCNPack, ModulatedDeformConv2d
from megan_fast.nn.lmga import LMGA, GraphAggregation
from megan_fast.nn.nonlocal_block import NonLocalBlock

__all__ = ["ModulatedDeformConv2d", "DCNPack", "NonLocalBlock", "GraphAggregation", "LMGA"]
