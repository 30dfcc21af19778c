"""The baseline of space-time video super-resolution papers: bicubic x4, in-between frames blended.

Scored beside every model by :mod:`megan_fast.evaluation`, and the global skip
connection of ``MEGANConfig(global_skip=True)`` (docs/DESIGN.md section 3).
"""

from __future__ import annotations

from torch import Tensor

from megan_fast.data.imresize import imresize

__all__ = ["bicubic_blend"]


def bicubic_blend(lq: Tensor) -> Tensor:
    """Baseline for a window: (..., n_in, 3, h, w) -> (..., 2*n_in - 1, 3, 4h, 4w).

    Bicubic x4 (MATLAB ``imresize``) of each input frame; each in-between
    frame is the mean of its two upscaled neighbours.
    """
    n = lq.shape[-4]
    up = imresize(lq, scale=4.0)
    out = up.new_empty(*up.shape[:-4], 2 * n - 1, *up.shape[-3:])
    out[..., 0::2, :, :, :] = up
    out[..., 1::2, :, :, :] = (up[..., :-1, :, :, :] + up[..., 1:, :, :, :]) / 2
    return out
