"""Triton kernels of the x2 bilinear upsampling (align_corners=False) times a scale.

Forward: one lane per output element, four loads.  Backward: one lane per
input element gathering the (at most) 4 x 4 output gradients it fed: no
atomics, every gradient written once.  The per-axis taps are those of
csrc/cpu/upsample.cpp (docs/DESIGN.md section 2).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from megan_fast.triton._utils import expect, launch, numel_needs_int64, precision, runnable

BLOCK = 1024


@triton.jit
def _tap(o, L):
    """Output o of an axis of length L: (i0, i1, w0, w1), y[o] = w0 x[i0] + w1 x[i1]."""
    j = o // 2
    even = (o % 2) == 0
    i0 = tl.where(even, tl.maximum(j - 1, 0), j)
    i1 = tl.where(even, j, tl.minimum(j + 1, L - 1))
    w0 = tl.where(o == 0, 1.0, tl.where(even, 0.25, 0.75))
    w1 = tl.where(o == 0, 0.0, tl.where(even, 0.75, 0.25))
    return i0, i1, w0, w1


@triton.jit
def _weight(o, i, L):
    """The weight of input i in output o of an axis of length L (0 if o does not read i)."""
    i0, i1, w0, w1 = _tap(o, L)
    return tl.where(i0 == i, w0, 0.0) + tl.where(i1 == i, w1, 0.0)


@triton.jit
def _lanes(INT64: tl.constexpr, BLOCK: tl.constexpr):
    """This program's BLOCK element offsets (int64 when the tensors are that large)."""
    pid = tl.program_id(0)
    if INT64:
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    else:
        offs = pid * BLOCK + tl.arange(0, BLOCK)
    return offs


@triton.jit
def _up_fwd_kernel(x_ptr, y_ptr, total, H, W, scale, CDT: tl.constexpr, INT64: tl.constexpr, BLOCK: tl.constexpr):
    offs = _lanes(INT64, BLOCK)
    ok = offs < total
    W2 = 2 * W
    ox = offs % W2
    oy = (offs // W2) % (2 * H)
    plane = offs // (W2 * 2 * H)
    base = x_ptr + plane * H * W
    y0, y1, h0, h1 = _tap(oy, H)
    x0, x1, w0, w1 = _tap(ox, W)
    v00 = tl.load(base + y0 * W + x0, mask=ok, other=0.0).to(CDT)
    v01 = tl.load(base + y0 * W + x1, mask=ok, other=0.0).to(CDT)
    v10 = tl.load(base + y1 * W + x0, mask=ok, other=0.0).to(CDT)
    v11 = tl.load(base + y1 * W + x1, mask=ok, other=0.0).to(CDT)
    val = scale * (h0 * (w0 * v00 + w1 * v01) + h1 * (w0 * v10 + w1 * v11))
    tl.store(y_ptr + offs, val.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _up_bwd_kernel(g_ptr, gx_ptr, total, H, W, scale, CDT: tl.constexpr, INT64: tl.constexpr, BLOCK: tl.constexpr):
    offs = _lanes(INT64, BLOCK)
    ok = offs < total
    ix = offs % W
    iy = (offs // W) % H
    plane = offs // (W * H)
    W2 = 2 * W
    base = g_ptr + plane * 4 * H * W
    acc = tl.zeros((BLOCK,), dtype=CDT)
    for dy in tl.static_range(4):
        oy = 2 * iy + dy - 1
        wy = tl.where((oy >= 0) & (oy < 2 * H), _weight(oy, iy, H), 0.0)
        row = tl.zeros((BLOCK,), dtype=CDT)
        for dx in tl.static_range(4):
            ox = 2 * ix + dx - 1
            inside = (ox >= 0) & (ox < W2) & (oy >= 0) & (oy < 2 * H)
            wx = tl.where(inside, _weight(ox, ix, W), 0.0)
            g = tl.load(base + oy * W2 + ox, mask=ok & inside, other=0.0).to(CDT)
            row += wx * g
        acc += wy * row
    tl.store(gx_ptr + offs, (scale * acc).to(gx_ptr.dtype.element_ty), mask=ok)


def _run(kernel, src: Tensor, dst: Tensor, h: int, w: int, scale: float) -> Tensor:
    """One lane per element of ``dst`` (the kernel's output); h, w are the low-resolution sizes."""
    if dst.numel() == 0:
        return dst
    big = dst if dst.numel() > src.numel() else src
    # float64 (the interpreter's tests) computes in float64; the scale argument is a float32 scalar (1 and 2, the
    # scales MEGAN uses, are exact).
    meta = dict(CDT=precision(src.dtype, src.device).compute, INT64=numel_needs_int64(big),
                BLOCK=BLOCK)
    total = dst.numel()
    launch(kernel, (triton.cdiv(total, BLOCK),), (src, dst, total, h, w, float(scale)), meta,
           "upsample_bilinear2x", src.dtype, src.device)
    return dst


def upsample_bilinear2x_forward(input: Tensor, scale: float) -> Tensor:
    """(n, c, h, w) -> (n, c, 2h, 2w) = scale * bilinear x2 (align_corners=False), contiguous, input's dtype."""
    runnable(input, "upsample_bilinear2x")
    expect(input.dim() == 4, "upsample_bilinear2x: input must be 4-D")
    x = input.contiguous()
    n, c, h, w = x.shape
    return _run(_up_fwd_kernel, x, x.new_empty(n, c, 2 * h, 2 * w), h, w, scale)


def upsample_bilinear2x_backward(grad_output: Tensor, scale: float) -> Tensor:
    """grad_output (n, c, 2h, 2w) -> grad_input (n, c, h, w), contiguous, grad_output's dtype."""
    runnable(grad_output, "upsample_bilinear2x")
    expect(grad_output.dim() == 4 and grad_output.shape[2] % 2 == 0 and grad_output.shape[3] % 2 == 0,
           "upsample_bilinear2x_backward: grad_output must be 4-D with even sizes")
    g = grad_output.contiguous()
    n, c, h2, w2 = g.shape
    return _run(_up_bwd_kernel, g, g.new_empty(n, c, h2 // 2, w2 // 2), h2 // 2, w2 // 2, scale)


__all__ = ["upsample_bilinear2x_forward", "upsample_bilinear2x_backward"]
