"""Bicubic resizing with the semantics of MATLAB's ``imresize(img, scale, 'bicubic')``.

Video super-resolution data sets make their low-resolution inputs with MATLAB's
bicubic ``imresize``, and scores are only comparable if the inputs are made the
same way; ``torch.nn.functional.interpolate(mode="bicubic", antialias=True)``
uses another cubic kernel (a = -0.75) and other borders, so it is not a
substitute.  This module implements MATLAB's definition (as documented for
``imresize``) in PyTorch:

- Kernel: Keys' cubic convolution with a = -0.5,
  ``k(x) = 1.5|x|^3 - 2.5|x|^2 + 1`` for ``|x| <= 1``,
  ``-0.5|x|^3 + 2.5|x|^2 - 4|x| + 2`` for ``1 < |x| <= 2``, else 0.
- Output size along an axis: ``ceil(in * scale)``; given a size instead, the
  scale is ``out / in``.
- Output sample ``j`` (0-based) sits at input coordinate
  ``(j + 0.5) / scale - 0.5`` (pixel centres at integers).
- Downscaling (scale < 1) with antialiasing widens the kernel by ``1/scale``:
  ``h(x) = scale * k(scale * x)``, support ``4 / scale`` input pixels.
- Taps: ``ceil(support) + 2`` consecutive input indices starting at
  ``floor(centre - support / 2)``; the weights of each output sample are
  normalised to sum to 1.
- Indices outside the image are mirrored symmetrically (the edge pixel is
  repeated: ..., 1, 0, 0, 1, ..., n-1, n-1, n-2, ...).
- The two axes are resized one after the other, the axis with the smaller
  scale first (the order MATLAB uses; it changes the result only by rounding).

The weights are computed in float64 and applied as a dense (out, in) matrix per
axis, so one resize is two batched matrix products.  MATLAB rounds integer
images back to their integer type; this function works on floating tensors only
and does not round or clamp (round yourself to reproduce uint8 outputs).
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["imresize", "bicubic_downscale_x4", "cubic_kernel", "resize_matrix"]


def cubic_kernel(x: Tensor) -> Tensor:
    """Keys' cubic convolution kernel with a = -0.5 (MATLAB's ``cubic``), elementwise."""
    ax = x.abs()
    ax2 = ax * ax
    ax3 = ax2 * ax
    near = (1.5 * ax3 - 2.5 * ax2 + 1.0) * (ax <= 1)
    far = (-0.5 * ax3 + 2.5 * ax2 - 4.0 * ax + 2.0) * ((ax > 1) & (ax <= 2))
    return near + far


@functools.lru_cache(maxsize=64)
def _resize_matrix(in_len: int, out_len: int, scale: float, antialiasing: bool) -> np.ndarray:
    """The float64 matrix of :func:`resize_matrix`, cached as a numpy array: no tensor is kept between calls (a
    cached tensor made while tracing, ``torch.export``'s fake tensors, would leak into later calls)."""
    support = 4.0
    widen = antialiasing and scale < 1
    if widen:
        support = 4.0 / scale
    centre = (np.arange(out_len, dtype=np.float64) + 0.5) / scale - 0.5  # (out,)
    taps = math.ceil(support) + 2
    first = np.floor(centre - support / 2)  # (out,)
    idx = first[:, None] + np.arange(taps, dtype=np.float64)[None, :]  # (out, taps)
    dist = centre[:, None] - idx
    weights = scale * _cubic(scale * dist) if widen else _cubic(dist)
    weights = weights / weights.sum(axis=1, keepdims=True)
    # Symmetric (half-sample) mirroring: period 2n, the second half reversed.
    period = 2 * in_len
    m = np.remainder(idx.astype(np.int64), period)
    m = np.where(m >= in_len, period - 1 - m, m)
    mat = np.zeros((out_len, in_len), dtype=np.float64)
    np.add.at(mat, (np.arange(out_len)[:, None], m), weights)
    mat.setflags(write=False)
    return mat


def _cubic(x: np.ndarray) -> np.ndarray:
    """:func:`cubic_kernel` in numpy (float64), for the cached matrices."""
    ax = np.abs(x)
    ax2 = ax * ax
    ax3 = ax2 * ax
    near = (1.5 * ax3 - 2.5 * ax2 + 1.0) * (ax <= 1)
    far = (-0.5 * ax3 + 2.5 * ax2 - 4.0 * ax + 2.0) * ((ax > 1) & (ax <= 2))
    return near + far


def resize_matrix(
    in_len: int,
    out_len: int,
    scale: float | None = None,
    antialiasing: bool = True,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> Tensor:
    """The (out_len, in_len) matrix that resizes one axis (rows sum to 1).

    Args:
        in_len: input length (>= 1).
        out_len: output length (>= 1).
        scale: the scale factor; default ``out_len / in_len`` (MATLAB uses the
            given scale, not the ratio of the rounded sizes, when one is given).
        antialiasing: widen the kernel by 1/scale when downscaling.
        dtype, device: of the returned matrix (computed in float64).
    """
    if in_len < 1 or out_len < 1:
        raise ValueError(f"imresize: lengths must be >= 1, got in_len={in_len}, out_len={out_len}")
    if scale is None:
        scale = out_len / in_len
    mat = _resize_matrix(int(in_len), int(out_len), float(scale), bool(antialiasing))
    return torch.tensor(mat, dtype=dtype, device=device)


def _pair(value, name: str) -> tuple:
    if isinstance(value, (int, float)):
        return (value, value)
    if isinstance(value, Sequence) and len(value) == 2:
        return tuple(value)
    raise ValueError(f"imresize: {name} must be a number or a pair (h, w), got {value!r}")


def _out_len(in_len: int, scale: float) -> int:
    exact = in_len * scale
    # Guard against representation noise (0.1 * 30 = 3.0000000000000004).
    nearest = round(exact)
    if abs(exact - nearest) < 1e-9:
        return max(1, int(nearest))
    return max(1, math.ceil(exact))


def imresize(
    img: Tensor,
    scale: float | Sequence[float] | None = None,
    size: Sequence[int] | None = None,
    antialiasing: bool = True,
) -> Tensor:
    """Resizes the last two dimensions with MATLAB's bicubic ``imresize`` definition.

    Args:
        img: (..., h, w) floating tensor, typically (b, c, h, w) or (t, 3, h, w)
            in [0, 1] (any range works: the operator is linear).  float32 and
            float64 are computed in their own dtype; float16 and bfloat16 in
            float32, then cast back.
        scale: scale factor, or a pair (scale_h, scale_w); the output size is
            ``ceil(h * scale_h), ceil(w * scale_w)``.  Give ``scale`` or
            ``size``, not both.
        size: output size (out_h, out_w); the scales are ``out / in``.
        antialiasing: when downscaling, widen the kernel by 1/scale (MATLAB's
            default, True).

    Returns:
        (..., out_h, out_w) tensor of ``img``'s dtype and device.

    Example:
        >>> lr = imresize(gt, scale=0.25)  # (t, 3, 256, 448) -> (t, 3, 64, 112)
    """
    if not isinstance(img, Tensor):
        raise TypeError(f"imresize: img must be a torch.Tensor, got {type(img).__name__}")
    if not img.is_floating_point():
        raise TypeError(f"imresize: img must be a floating tensor, got {img.dtype} (convert with img.float() / 255)")
    if img.dim() < 2:
        raise ValueError(f"imresize: img must have shape (..., h, w), got {tuple(img.shape)}")
    if (scale is None) == (size is None):
        raise ValueError("imresize: give exactly one of scale and size")
    h, w = img.shape[-2:]
    if h < 1 or w < 1:
        raise ValueError(f"imresize: img must have h, w >= 1, got {tuple(img.shape)}")
    if scale is not None:
        sh, sw = (float(s) for s in _pair(scale, "scale"))
        if not (sh > 0 and sw > 0 and math.isfinite(sh) and math.isfinite(sw)):
            raise ValueError(f"imresize: scale must be positive and finite, got {scale!r}")
        oh, ow = _out_len(h, sh), _out_len(w, sw)
    else:
        oh, ow = (int(s) for s in _pair(size, "size"))
        if oh < 1 or ow < 1:
            raise ValueError(f"imresize: size must be positive, got {size!r}")
        sh, sw = oh / h, ow / w

    compute = img.dtype if img.dtype in (torch.float32, torch.float64) else torch.float32
    x = img.to(compute)
    mh = resize_matrix(h, oh, sh, antialiasing, compute, img.device)  # (oh, h)
    mw = resize_matrix(w, ow, sw, antialiasing, compute, img.device)  # (ow, w)

    def along_h(t: Tensor) -> Tensor:
        return mh @ t  # (oh, h) @ (..., h, w)

    def along_w(t: Tensor) -> Tensor:
        return t @ mw.T  # (..., h, w) @ (w, ow)

    # The axis with the smaller scale first (ties: height first), as MATLAB.
    if sh <= sw:
        x = along_w(along_h(x))
    else:
        x = along_h(along_w(x))
    return x.to(img.dtype)


def bicubic_downscale_x4(img: Tensor) -> Tensor:
    """MATLAB-style bicubic x4 downscaling (with antialiasing): (..., h, w) -> (..., ceil(h/4), ceil(w/4))."""
    return imresize(img, scale=0.25)
