"""Plain-PyTorch dot-product attention: the explicit formula, n x m matrix and all."""

from __future__ import annotations

import torch
from torch import Tensor


def nonlocal_attention_reference(q: Tensor, k: Tensor, v: Tensor, scale: float = 1.0) -> Tensor:
    """softmax(scale * q @ k^T, dim=-1) @ v.  q (b, n, d), k (b, m, d), v (b, m, dv) -> (b, n, dv).

    Rows with no keys (m = 0) give zeros (an empty sum), as the fused kernels do.
    """
    attn = torch.softmax(torch.matmul(q, k.transpose(1, 2)) * scale, dim=-1)
    return torch.matmul(attn, v)
