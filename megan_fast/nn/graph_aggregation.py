"""The learned graph aggregation of LMGA as a module: the edge MLP's parameters over :func:`graph_aggregate`."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from megan_fast.ops.graph_aggregate import graph_aggregate


class GraphAggregation(nn.Module):
    """Learned per-pixel graph aggregation over p nodes (:func:`megan_fast.ops.graph_aggregate`).

    Holds the edge MLP: ``w1`` (hidden, channels), ``b1`` (hidden,), ``w2``
    (hidden,), initialised like ``nn.Linear(channels, hidden)`` followed by
    ``nn.Linear(hidden, 1, bias=False)``.

    Shape:
        nodes (b, p, channels, h, w) -> (b, p, channels, h, w); with
        ``return_adjacency`` also A (b, p, p, h, w).
    """

    def __init__(self, channels: int = 64, hidden: int = 16, negative_slope: float = 0.2) -> None:
        super().__init__()
        self.channels, self.hidden, self.negative_slope = channels, hidden, float(negative_slope)
        self.w1 = nn.Parameter(torch.empty(hidden, channels))
        self.b1 = nn.Parameter(torch.empty(hidden))
        self.w2 = nn.Parameter(torch.empty(hidden))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.w1, a=math.sqrt(5))
        bound1 = 1 / math.sqrt(self.channels)
        nn.init.uniform_(self.b1, -bound1, bound1)
        bound2 = 1 / math.sqrt(self.hidden)
        nn.init.uniform_(self.w2, -bound2, bound2)

    def forward(self, nodes: Tensor, return_adjacency: bool = False):
        return graph_aggregate(nodes, self.w1, self.b1, self.w2, self.negative_slope, return_adjacency)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, hidden={self.hidden}, negative_slope={self.negative_slope}"
