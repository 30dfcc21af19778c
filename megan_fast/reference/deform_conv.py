"""Plain-PyTorch modulated deformable convolution (gather-based bilinear sampling + matmul).

Used by the tests as the ground truth beside torchvision, and as the fallback
backend on devices without a kernel.  Autograd provides every gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _bilinear_corners(y: Tensor, x: Tensor, h: int, w: int):
    """Yields (flat index, weight) for the 4 floor-based corners of each point.

    The weight of a corner outside the image is 0.  There is deliberately no
    early-out for points with y <= -1 etc.: the floor formula already gives
    value 0 there, and its autograd derivative is torchvision's offset-gradient
    convention (one-sided difference of the floor formula, non-zero at y = -1).
    Non-finite points are moved far outside so they read nothing.
    """
    finite = torch.isfinite(y) & torch.isfinite(x)
    far = torch.full_like(y, -4.0)
    y = torch.where(finite, y, far)
    x = torch.where(finite, x, far)
    # Far-away points can't touch the image; clamp them so the floor fits in int64.
    y = y.clamp(-4.0, h + 4.0)
    x = x.clamp(-4.0, w + 4.0)
    y0 = torch.floor(y)
    x0 = torch.floor(x)
    ly, lx = y - y0, x - x0
    for dy, wy in ((0, 1 - ly), (1, ly)):
        for dx, wx in ((0, 1 - lx), (1, lx)):
            yc, xc = y0 + dy, x0 + dx
            inside = (yc >= 0) & (yc <= h - 1) & (xc >= 0) & (xc <= w - 1)
            idx = (yc.clamp(0, h - 1) * w + xc.clamp(0, w - 1)).long()
            yield idx, wy * wx * inside.to(y.dtype)


def modulated_deform_conv2d_reference(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (0, 0),
    dilation: tuple[int, int] = (1, 1),
    mask: Tensor | None = None,
) -> Tensor:
    """Same contract as :func:`megan_fast.ops.modulated_deform_conv2d` (arguments already checked).

    Shapes: input (b, c_in, h, w), offset (b, 2*og*kh*kw, h_out, w_out),
    weight (c_out, c_in/groups, kh, kw), mask (b, og*kh*kw, h_out, w_out) or None,
    bias (c_out,) or None -> (b, c_out, h_out, w_out).
    """
    b, c_in, h, w = input.shape
    c_out, cg, kh, kw = weight.shape
    groups = c_in // cg
    k = kh * kw
    og = offset.shape[1] // (2 * k)
    h_out, w_out = offset.shape[2], offset.shape[3]
    n = k * h_out * w_out
    dev, dt = input.device, input.dtype

    # Sampling grid before offsets: (k, h_out, w_out).
    ki = torch.arange(kh, device=dev, dtype=dt).repeat_interleave(kw)
    kj = torch.arange(kw, device=dev, dtype=dt).repeat(kh)
    oy = torch.arange(h_out, device=dev, dtype=dt) * stride[0] - padding[0]
    ox = torch.arange(w_out, device=dev, dtype=dt) * stride[1] - padding[1]
    base_y = oy.view(1, -1, 1) + (ki * dilation[0]).view(-1, 1, 1)
    base_x = ox.view(1, 1, -1) + (kj * dilation[1]).view(-1, 1, 1)

    off = offset.reshape(b, og, k, 2, h_out, w_out)
    y = (base_y + off[:, :, :, 0]).reshape(b, og, n)
    x = (base_x + off[:, :, :, 1]).reshape(b, og, n)

    cpg = c_in // og
    src = input.reshape(b, og, cpg, h * w)
    cols = input.new_zeros(b, og, cpg, n)
    for idx, wgt in _bilinear_corners(y, x, h, w):
        gathered = torch.gather(src, 3, idx.unsqueeze(2).expand(b, og, cpg, n))
        cols = cols + wgt.unsqueeze(2) * gathered
    if mask is not None:
        cols = cols * mask.reshape(b, og, 1, n)

    # (b, c_in, k, p) -> (b, groups, cg*k, p); weight (groups, c_out/groups, cg*k).
    cols = cols.reshape(b, groups, cg * k, h_out * w_out)
    wmat = weight.reshape(groups, c_out // groups, cg * k)
    out = torch.matmul(wmat.unsqueeze(0), cols).reshape(b, c_out, h_out, w_out)
    if bias is not None:
        out = out + bias.view(1, -1, 1, 1)
    return out
