"""Plain-PyTorch LMGA graph aggregation: every difference and hidden unit materialised."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def graph_aggregate_reference(
    nodes: Tensor,
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    negative_slope: float = 0.2,
    return_adjacency: bool = False,
):
    """The formula of docs/DESIGN.md section 2, literally.

    nodes (b, p, c, h, w), w1 (hd, c), b1 (hd,), w2 (hd,) -> out (b, p, c, h, w)
    and, if ``return_adjacency``, A (b, p, p, h, w).  Stores the (b, p, p, c, h, w)
    differences and the (b, p, p, hd, h, w) hidden layer.
    """
    p = nodes.shape[1]
    diff = (nodes.unsqueeze(2) - nodes.unsqueeze(1)).abs()  # (b, p, q, c, h, w)
    hidden = torch.einsum("jc,bpqchw->bpqjhw", w1, diff) + b1.view(1, 1, 1, -1, 1, 1)
    hidden = F.leaky_relu(hidden, negative_slope)
    score = torch.einsum("j,bpqjhw->bpqhw", w2, hidden)
    self_loop = torch.eye(p, dtype=torch.bool, device=nodes.device).view(1, p, p, 1, 1)
    adjacency = torch.softmax(score.masked_fill(self_loop, float("-inf")), dim=2)
    out = torch.einsum("bpqhw,bqchw->bpchw", adjacency, nodes)
    if return_adjacency:
        return out, adjacency
    return out
