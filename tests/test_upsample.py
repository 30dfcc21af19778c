"""upsample_bilinear2x (C++ kernels, and the public function on every backend) against F.interpolate."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megan_fast.ops import upsample_bilinear2x, use_backend

BACKENDS = ["native", "reference", "stock"]


def expected(x, scale):
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False) * scale


def check(backend, x, scale=1.0, tol=1e-12):
    x = x.detach().requires_grad_(True)
    ref = expected(x, scale)
    g = torch.randn_like(ref)
    (g_ref,) = torch.autograd.grad(ref, x, g) if ref.numel() else (torch.zeros_like(x),)
    with use_backend(backend):
        out = upsample_bilinear2x(x, scale)
        (g_out,) = torch.autograd.grad(out, x, g) if out.numel() else (torch.zeros_like(x),)
    assert out.shape == ref.shape
    assert out.is_contiguous() or backend != "native"  # F.interpolate keeps channels-last
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    torch.testing.assert_close(g_out, g_ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 1, 1, 1), (1, 2, 1, 6), (3, 2, 4, 1), (1, 64, 16, 16)])
@pytest.mark.parametrize("scale", [1.0, 2.0, -0.3])
def test_matches_interpolate_float64(backend, shape, scale):
    check(backend, torch.randn(shape, dtype=torch.float64), scale)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32(backend):
    check(backend, torch.randn(2, 8, 9, 13), 2.0, tol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous(backend):
    base = torch.randn(2, 6, 10, 14, dtype=torch.float64)
    check(backend, base[:, ::2, 1:, ::2], 2.0)  # strided channels, offset rows, every other column
    check(backend, torch.randn(2, 7, 5, 3, dtype=torch.float64).permute(0, 3, 1, 2), 1.0)  # channels last


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    check(backend, torch.randn(0, 3, 4, 5, dtype=torch.float64), 2.0)


def test_backward_is_a_gather_written_once_and_deterministic():
    g = torch.randn(3, 4, 18, 22)
    a = torch.ops.megan_fast.upsample_bilinear2x_backward(g, 2.0)
    b = torch.ops.megan_fast.upsample_bilinear2x_backward(g, 2.0)
    assert torch.equal(a, b) and a.shape == (3, 4, 9, 11)


def test_gradcheck_native():
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    with use_backend("native"):
        assert torch.autograd.gradcheck(lambda t: upsample_bilinear2x(t, 2.0), (x,))


def test_opcheck_native():
    x = torch.randn(2, 3, 4, 5, requires_grad=True)
    torch.library.opcheck(torch.ops.megan_fast.upsample_bilinear2x.default, (x, 2.0))
    torch.library.opcheck(torch.ops.megan_fast.upsample_bilinear2x.default, (x.detach().transpose(2, 3), 1.0))
    torch.library.opcheck(torch.ops.megan_fast.upsample_bilinear2x_backward.default, (torch.randn(2, 3, 8, 10), 2.0))


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_torch_compile_fullgraph(backend):
    x = torch.randn(2, 3, 5, 6, requires_grad=True)
    with use_backend(backend):
        fn = torch.compile(lambda t: upsample_bilinear2x(t, 2.0).square().sum(), fullgraph=True, backend="aot_eager")
        (g,) = torch.autograd.grad(fn(x), x)
        (g_eager,) = torch.autograd.grad(upsample_bilinear2x(x, 2.0).square().sum(), x)
    torch.testing.assert_close(g, g_eager)


def test_autocast_runs_in_float32_on_cpu():
    x = torch.randn(1, 2, 3, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = upsample_bilinear2x(x.bfloat16(), 2.0)
        direct = torch.ops.megan_fast.upsample_bilinear2x(x.bfloat16(), 2.0)
    assert out.dtype == direct.dtype == torch.float32


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="input must be 4-D"):
        upsample_bilinear2x(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="h, w >= 1"):
        upsample_bilinear2x(torch.zeros(1, 2, 0, 3))
    with pytest.raises(TypeError, match="dtype torch.int64"):
        upsample_bilinear2x(torch.zeros(1, 1, 2, 2, dtype=torch.int64))
    with pytest.raises(TypeError, match="scale must be a Python float"):
        upsample_bilinear2x(torch.zeros(1, 1, 2, 2), torch.tensor(2.0))


def test_second_order_gradients_match_interpolate():
    x = torch.randn(1, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(1, 2, 6, 8, dtype=torch.float64)
    with use_backend("native"):
        (g,) = torch.autograd.grad((upsample_bilinear2x(x, 2.0) * w).square().sum(), x, create_graph=True)
        (gg,) = torch.autograd.grad(g.square().sum(), x)
    (g_ref,) = torch.autograd.grad((expected(x, 2.0) * w).square().sum(), x, create_graph=True)
    (gg_ref,) = torch.autograd.grad(g_ref.square().sum(), x)
    torch.testing.assert_close(gg, gg_ref)
    assert torch.autograd.gradgradcheck(lambda t: upsample_bilinear2x(t, 2.0), (x,))
