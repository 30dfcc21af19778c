"""Thin ``nn.Module`` wrappers over the fused ops (the network's blocks are in megan_fast.models.blocks)."""

from megan_fast.nn.deform_conv import DCNPack, ModulatedDeformConv2d
from megan_fast.nn.graph_aggregation import GraphAggregation
from megan_fast.nn.nonlocal_block import NonLocalBlock

__all__ = ["ModulatedDeformConv2d", "DCNPack", "NonLocalBlock", "GraphAggregation"]
