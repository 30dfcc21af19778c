"""Triton kernels of upsample_bilinear2x (megan_fast/triton/upsample.py) against F.interpolate.

Without a GPU they run on CPU tensors under the interpreter (tests/conftest.py
sets TRITON_INTERPRET=1): tiny planes that still cover both borders, 1-pixel
axes (every tap clamped), non-contiguous inputs and an empty batch.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from _triton_util import DEVICE, cuda_only, skip_module_without_triton  # noqa: E402

skip_module_without_triton()
from megan_fast.triton import upsample as tup  # noqa: E402

EXACT = torch.float64 if DEVICE == "cpu" else torch.float32


def check(x, scale, tol):
    ref = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False) * scale
    g = torch.randn_like(ref)
    xr = x.detach().requires_grad_(True)
    (g_ref,) = torch.autograd.grad(F.interpolate(xr, scale_factor=2, mode="bilinear", align_corners=False) * scale,
                                   xr, g) if ref.numel() else (torch.zeros_like(x),)
    out = tup.upsample_bilinear2x_forward(x, scale)
    gx = tup.upsample_bilinear2x_backward(g, scale)
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    torch.testing.assert_close(gx, g_ref, atol=tol, rtol=tol)
    assert out.is_contiguous() and gx.is_contiguous()


@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 1, 1, 1), (1, 2, 1, 5), (2, 1, 6, 1)])
@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_matches_interpolate(shape, scale):
    check(torch.randn(shape, dtype=EXACT, device=DEVICE), scale, 1e-6 if EXACT == torch.float32 else 1e-12)


def test_non_contiguous_and_empty():
    base = torch.randn(2, 4, 6, 9, dtype=EXACT, device=DEVICE)
    check(base[:, 1::2, :, ::2], 2.0, 1e-6 if EXACT == torch.float32 else 1e-12)
    check(torch.randn(0, 2, 3, 3, dtype=EXACT, device=DEVICE), 2.0, 0)


def test_through_the_public_function():
    from megan_fast.ops import upsample_bilinear2x, use_backend

    x = torch.randn(1, 2, 3, 4, dtype=EXACT, device=DEVICE, requires_grad=True)
    with use_backend("triton"):
        out = upsample_bilinear2x(x, 2.0)
        out.sum().backward()
    ref = F.interpolate(x.detach(), scale_factor=2, mode="bilinear", align_corners=False) * 2
    torch.testing.assert_close(out.detach(), ref)
    assert x.grad is not None and x.grad.shape == x.shape


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    x = torch.randn(2, 64, 45, 36, device=DEVICE).to(dtype)
    ref = F.interpolate(x.float(), scale_factor=2, mode="bilinear", align_corners=False) * 2
    torch.testing.assert_close(tup.upsample_bilinear2x_forward(x, 2.0).float(), ref, atol=2e-2, rtol=1e-2)


@cuda_only
def test_opcheck_cuda_kernels():
    x = torch.randn(2, 3, 5, 6, device=DEVICE, requires_grad=True)
    torch.library.opcheck(torch.ops.megan_fast.upsample_bilinear2x.default, (x, 2.0))
