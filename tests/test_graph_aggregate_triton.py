"""Triton LMGA graph-aggregation kernels (megan_fast/triton/graph_aggregate.py) against the plain formula.

Without a GPU the kernels run on CPU tensors under the Triton interpreter
(TRITON_INTERPRET=1, set before triton is imported: tests/conftest.py does it
when no GPU is present).  The interpreter is slow and serial, so the problems
are tiny; they are chosen to hit the kernels' paths: p = 2, 5, 7 (the
unrolled pair loops), tiny hd / c (broadcast path) and hd, c >= 16 (tl.dot
path, with padding and several channel chunks), pixel counts that are not a
multiple of the tile (tails) and several tiles per program (the persistent
backward loop), equal entries (sign(0) = 0 and leaky_relu'(0)), non-contiguous
inputs and empty problems.  On a GPU: fp16 / bf16 and MEGAN's full size.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from _triton_util import DEVICE, cuda_only, skip_module_without_triton  # noqa: E402

skip_module_without_triton()
from megan_fast.triton import graph_aggregate as tga  # noqa: E402

# The GPU kernels take fp32/fp16/bf16 (float64 is a TypeError there): the
# exact checks run in float64 on the CPU and in float32 on a GPU.
EXACT = torch.float64 if DEVICE == "cpu" else torch.float32
F64 = pytest.param(torch.float64, marks=pytest.mark.skipif(DEVICE != "cpu", reason="float64 runs on the CPU only"))


# --------------------------------------------------------------------------- helpers


def formula(nodes, w1, b1, w2, slope):
    """The op written out with every difference and hidden unit materialised."""
    p = nodes.shape[1]
    diff = (nodes.unsqueeze(2) - nodes.unsqueeze(1)).abs()  # (b, p, q, c, h, w)
    hidden = torch.einsum("kc,bpqchw->bpqkhw", w1, diff) + b1.view(1, 1, 1, -1, 1, 1)
    score = torch.einsum("k,bpqkhw->bpqhw", w2, F.leaky_relu(hidden, slope))
    self_loop = torch.eye(p, dtype=torch.bool, device=nodes.device).view(1, p, p, 1, 1)
    adjacency = torch.softmax(score.masked_fill(self_loop, float("-inf")), dim=2)
    out = torch.einsum("bpqhw,bqchw->bpchw", adjacency, nodes)
    return out, adjacency


def problem(b=2, p=5, c=6, hd=4, h=3, w=5, dtype=EXACT, device=DEVICE):
    g = torch.Generator().manual_seed(1234 + 7 * p + c)
    nodes = torch.randn(b, p, c, h, w, generator=g, dtype=torch.float64)
    w1 = torch.randn(hd, c, generator=g, dtype=torch.float64) / max(c, 1) ** 0.5
    b1 = torch.randn(hd, generator=g, dtype=torch.float64) * 0.1
    w2 = torch.randn(hd, generator=g, dtype=torch.float64)
    return [t.to(device=device, dtype=dtype) for t in (nodes, w1, b1, w2)]


def reference(nodes, w1, b1, w2, slope, grad_out, dtype=torch.float64):
    """(out, adjacency, grad_nodes, grad_w1, grad_b1, grad_w2) of the formula in `dtype`, by autograd."""
    leaves = [t.detach().to(dtype).requires_grad_(True) for t in (nodes, w1, b1, w2)]
    out, adj = formula(*leaves, slope)
    grads = torch.autograd.grad(out, leaves, grad_out.to(dtype))
    return (out.detach(), adj.detach(), *grads)


def triton_all(nodes, w1, b1, w2, slope, grad_out):
    out, adj = tga.graph_aggregate_forward(nodes, w1, b1, w2, slope, True)
    grads = tga.graph_aggregate_backward(grad_out, nodes, w1, b1, w2, slope)
    return (out, adj, *grads)


NAMES = ("out", "adjacency", "grad_nodes", "grad_w1", "grad_b1", "grad_w2")


def max_err(a, e):
    return (a.double() - e.double()).abs().max().item() if a.numel() else 0.0


def assert_close(got, ref, tol):
    """Max-abs error <= tol * (1 + max|ref|), per tensor (grad_w1 & co. sum over many pixels)."""
    for name, a, e in zip(NAMES, got, ref):
        assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} != {tuple(e.shape)}"
        bound = tol * (1.0 + (e.double().abs().max().item() if e.numel() else 0.0))
        err = max_err(a, e)
        assert err <= bound, f"{name}: max abs error {err:.3e} > {bound:.3e}"


def check(nodes, w1, b1, w2, slope=0.2, tol=None):
    """Kernels in nodes' dtype against the formula in float64 (same, rounded, inputs)."""
    tol = tol if tol is not None else (1e-9 if nodes.dtype == torch.float64 else 1e-5)
    grad_out = torch.randn(nodes.shape, dtype=torch.float64, device=nodes.device).to(nodes.dtype)
    got = triton_all(nodes, w1, b1, w2, slope, grad_out)
    ref = reference(nodes, w1, b1, w2, slope, grad_out)
    for name, t in zip(NAMES, got):
        assert t.dtype == nodes.dtype and t.device == nodes.device, name
        assert torch.isfinite(t).all(), name
    assert_close(got, [r.to(nodes.dtype) for r in ref], tol)
    assert (got[1].diagonal(dim1=1, dim2=2) == 0).all(), "adjacency diagonal must be exactly 0"
    return got


# --------------------------------------------------------------------------- float64 / float32


@pytest.mark.parametrize("p", [2, 5, 7])
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_matches_formula(p, dtype):
    check(*problem(p=p, b=2 if dtype == torch.float64 else 1, dtype=dtype))


@pytest.mark.parametrize(
    "shape",
    [
        dict(c=3, hd=5, h=3, w=5),  # odd sizes, one partial tile per image (broadcast path)
        dict(p=3, c=3, hd=5, h=5, w=7),  # 3 tiles per image: tails and several tiles per program
        dict(p=3, c=20, hd=17, h=2, w=3, b=1),  # tl.dot path, hd and c padded to 32, two channel chunks
        dict(p=5, c=64, hd=16, h=2, w=3, b=1),  # MEGAN's c and hd: tl.dot, four channel chunks
        dict(p=2, c=40, hd=5, h=2, w=9, b=1),  # tl.dot with hd < 16; a partial and an empty chunk
    ],
)
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_sizes(shape, dtype):
    check(*problem(dtype=dtype, **shape))


@pytest.mark.parametrize("slope", [0.0, 0.2, 1.5])
def test_negative_slope(slope):
    check(*problem(p=4, c=5, hd=6), slope=slope)


@pytest.mark.parametrize("slope", [0.2, 0.0])
def test_equal_entries(slope):
    """E_p == E_q in some channels (sign(0) = 0) and in all channels with b1 = 0 at
    some hidden units, i.e. z = 0 exactly: leaky_relu'(0) = slope, as in torch."""
    nodes, w1, b1, w2 = problem(b=1, p=4, c=5, hd=6, h=3, w=5)
    nodes[:, 1, :2] = nodes[:, 0, :2]  # two channels equal everywhere
    nodes[:, 2, :, 1] = nodes[:, 3, :, 1]  # nodes 2 and 3 equal on a whole row of pixels
    nodes[:, :, :, 2, 4] = nodes[:, :1, :, 2, 4]  # every node equal at one pixel
    b1[::2] = 0.0
    check(nodes, w1, b1, w2, slope=slope)


def test_leaky_relu_derivative_at_zero_matches_torch():
    z = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(F.leaky_relu(z, 0.3).sum(), z)
    assert torch.equal(g, torch.full_like(g, 0.3))  # the kernels use 1 if z > 0 else slope


def test_non_contiguous_inputs():
    base, w1, b1, w2 = problem(b=2, p=3, c=4, hd=5, h=7, w=6)
    nodes = base.permute(0, 2, 1, 3, 4).contiguous().permute(0, 2, 1, 3, 4)[..., ::2, 1:]  # (2, 3, 4, 4, 5)
    assert not nodes.is_contiguous()
    w1t = w1.t().contiguous().t()
    assert not w1t.is_contiguous()
    got = check(nodes, w1t, b1, w2)
    assert got[0].is_contiguous() and got[2].is_contiguous()
    grad_out = torch.randn(nodes.shape[::-1], dtype=nodes.dtype, device=nodes.device).permute(4, 3, 2, 1, 0)
    ref = reference(nodes, w1, b1, w2, 0.2, grad_out)
    grads = tga.graph_aggregate_backward(grad_out, nodes, w1t, b1, w2, 0.2)
    assert_close((ref[0], ref[1], *grads), ref, 1e-9 if EXACT == torch.float64 else 1e-5)


def test_without_adjacency():
    nodes, w1, b1, w2 = problem(p=3)
    out, adj = tga.graph_aggregate_forward(nodes, w1, b1, w2, 0.2, False)
    assert adj.numel() == 0 and adj.dtype == nodes.dtype and adj.device == nodes.device
    out_ref, _ = tga.graph_aggregate_forward(nodes, w1, b1, w2, 0.2, True)
    assert torch.equal(out, out_ref)


@pytest.mark.parametrize("shape", [dict(b=0), dict(h=0), dict(w=0)])
def test_empty(shape):
    nodes, w1, b1, w2 = problem(p=3, **shape)
    out, adj = tga.graph_aggregate_forward(nodes, w1, b1, w2, 0.2, True)
    assert out.shape == nodes.shape and adj.shape == (nodes.shape[0], 3, 3, *nodes.shape[3:])
    grads = tga.graph_aggregate_backward(torch.zeros_like(nodes), nodes, w1, b1, w2, 0.2)
    for g, t in zip(grads, (nodes, w1, b1, w2)):
        assert g.shape == t.shape and g.dtype == t.dtype
    for g in grads[1:]:
        assert (g == 0).all()


def test_zero_channels():
    """c = 0: every score is w2 . leaky_relu(b1), so A is uniform off the diagonal."""
    nodes, w1, b1, w2 = problem(b=1, p=4, c=0, hd=3)
    out, adj = tga.graph_aggregate_forward(nodes, w1, b1, w2, 0.2, True)
    expected = (1 - torch.eye(4, dtype=adj.dtype, device=adj.device)).view(1, 4, 4, 1, 1) / 3
    torch.testing.assert_close(adj, expected.expand_as(adj), atol=1e-12, rtol=0)
    assert out.shape == nodes.shape
    grads = tga.graph_aggregate_backward(torch.zeros_like(nodes), nodes, w1, b1, w2, 0.2)
    assert all((g == 0).all() for g in grads)


def test_backward_is_deterministic():
    nodes, w1, b1, w2 = problem(b=2, p=3, c=3, hd=4, h=5, w=7)
    grad_out = torch.randn_like(nodes)
    first = tga.graph_aggregate_backward(grad_out, nodes, w1, b1, w2, 0.2)
    second = tga.graph_aggregate_backward(grad_out, nodes, w1, b1, w2, 0.2)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_unsupported_dtype_is_refused_by_the_public_op():
    # Dtype tables live in the public op only (the launchers assert what the kernels need).
    from megan_fast.ops import graph_aggregate, use_backend

    nodes, w1, b1, w2 = problem(p=3, h=1, w=2, dtype=torch.float64 if DEVICE == "cuda" else torch.float16)
    with use_backend("triton"), pytest.raises(TypeError, match="dtype"):
        graph_aggregate(nodes, w1, b1, w2, 0.2)


# --------------------------------------------------------------------------- GPU only


@cuda_only
def test_float64_on_gpu_is_a_clear_type_error():
    nodes, w1, b1, w2 = problem(p=3, dtype=torch.float64)
    with pytest.raises(TypeError, match="float64"):
        tga.graph_aggregate_forward(nodes, w1, b1, w2, 0.2, False)
    with pytest.raises(TypeError, match="float64"):
        tga.graph_aggregate_backward(torch.zeros_like(nodes), nodes, w1, b1, w2, 0.2)


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [dict(p=5, c=64, hd=16, h=16, w=24), dict(p=3, c=3, hd=5, h=9, w=11)])
def test_half_precision_within_twice_the_formulas_error(dtype, shape):
    """Both the kernels and the formula in `dtype`, both against float64 on the same rounded inputs."""
    nodes, w1, b1, w2 = problem(dtype=dtype, **shape)
    grad_out = torch.randn(nodes.shape, dtype=torch.float64, device=DEVICE).to(dtype)
    exact = reference(nodes, w1, b1, w2, 0.2, grad_out)
    formula_lp = reference(nodes, w1, b1, w2, 0.2, grad_out, dtype=dtype)
    got = triton_all(nodes, w1, b1, w2, 0.2, grad_out)
    for name, a, f, e in zip(NAMES, got, formula_lp, exact):
        assert a.dtype == dtype, name
        floor = 1e-6 * (1.0 + e.abs().max().item())
        assert max_err(a, e) <= 2 * max_err(f, e) + floor, (
            f"{name}: kernel error {max_err(a, e):.3e}, formula's own error in {dtype} {max_err(f, e):.3e}")


@cuda_only
def test_megan_size_smoke():
    """MEGAN's LMGA: b=7, p=5, c=64, hd=16, 64x112 pixels, float32."""
    nodes, w1, b1, w2 = problem(b=7, p=5, c=64, hd=16, h=64, w=112, dtype=torch.float32)
    grad_out = torch.randn_like(nodes)
    got = triton_all(nodes, w1, b1, w2, 0.2, grad_out)
    ref = reference(nodes, w1, b1, w2, 0.2, grad_out)
    assert all(torch.isfinite(t).all() for t in got)
    assert_close(got, [r.float() for r in ref], 1e-4)
    again = tga.graph_aggregate_backward(grad_out, nodes, w1, b1, w2, 0.2)
    assert all(torch.equal(a, b) for a, b in zip(again, got[2:])), "backward must be deterministic"


@cuda_only
@pytest.mark.parametrize("return_adjacency", [True, False])
def test_opcheck_cuda_kernels(return_adjacency):
    # The op's CUDA kernels are the Triton ones: opcheck them as tests/test_graph_aggregate.py does the C++ ones.
    nodes, w1, b1, w2 = (t.requires_grad_(True) for t in problem(b=1, p=3, c=16, hd=16, h=2, w=3,
                                                                 dtype=torch.float32))
    torch.library.opcheck(torch.ops.megan_fast.graph_aggregate.default, (nodes, w1, b1, w2, 0.2, return_adjacency))
    g = torch.randn(1, 3, 16, 2, 3, device=DEVICE)
    torch.library.opcheck(torch.ops.megan_fast.graph_aggregate_backward.default,
                          (g, nodes.detach(), w1.detach(), b1.detach(), w2.detach(), 0.2))
