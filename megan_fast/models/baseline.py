"""The baseline of space-time video super-resolution papers: bicubic x4, in-between frames blended.

Scored beside every model by :mod:`megan_fast.evaluation`, and the global skip
connection of ``MEGANConfig(global_skip=True)`` (docs/DESIGN.md section 3).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from megan_fast.data.imresize import imresize

__all__ = ["bicubic_blend"]


def bicubic_blend(lq: Tensor, times: Sequence[float] | Tensor | None = None) -> Tensor:
    """Baseline for a window: (..., n_in, 3, h, w) -> (..., n_in + (n_in - 1) * k, 3, 4h, 4w).

    Bicubic x4 (MATLAB ``imresize``) of each input frame; the in-between
    frame at time t between two inputs is (1 - t) * first + t * second of
    their upscaled frames.  ``times``: k increasing floats in (0, 1), or a
    (b, k) tensor for a (b, n_in, 3, h, w) window; default [0.5] (the mean).
    """
    n = lq.shape[-4]
    up = imresize(lq, scale=4.0)
    if times is None or (not isinstance(times, Tensor) and list(times) == [0.5]):
        out = up.new_empty(*up.shape[:-4], 2 * n - 1, *up.shape[-3:])
        out[..., 0::2, :, :, :] = up
        out[..., 1::2, :, :, :] = (up[..., :-1, :, :, :] + up[..., 1:, :, :, :]) / 2
        return out
    if isinstance(times, Tensor):
        k = times.shape[-1]
        t = times.to(device=up.device, dtype=up.dtype).reshape(*times.shape[:-1], 1, k, 1, 1, 1)
    else:
        k = len(times)
        t = torch.cat([up.new_full((1,), float(v)) for v in times]).reshape(k, 1, 1, 1)
    first, second = up[..., :-1, :, :, :].unsqueeze(-4), up[..., 1:, :, :, :].unsqueeze(-4)
    between = (1 - t) * first + t * second  # (..., n - 1, k, 3, H, W)
    pairs = torch.cat((first, between), -4).flatten(-5, -4)
    return torch.cat((pairs, up[..., -1:, :, :, :]), -4)
