"""graph_aggregate against the plain formula on output, adjacency and every gradient, per backend."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megan_fast.ops import _backend, graph_aggregate, use_backend

BACKENDS = ["native", "reference"]


def formula(nodes, w1, b1, w2, slope):
    """Written out independently of megan_fast.reference: explicit loops over node pairs."""
    b, p, c, h, w = nodes.shape
    scores = nodes.new_full((b, p, p, h, w), float("-inf"))
    for i in range(p):
        for j in range(p):
            if i != j:
                d = (nodes[:, i] - nodes[:, j]).abs()  # (b, c, h, w)
                hidden = F.leaky_relu(torch.einsum("kc,bchw->bkhw", w1, d) + b1.view(1, -1, 1, 1), slope)
                scores[:, i, j] = torch.einsum("k,bkhw->bhw", w2, hidden)
    adjacency = torch.softmax(scores, dim=2)
    out = torch.stack([sum(adjacency[:, i, j, None] * nodes[:, j] for j in range(p) if j != i) for i in range(p)], 1)
    return out, adjacency


def problem(b=2, p=5, c=6, hd=4, h=3, w=5, dtype=torch.float64):
    return (
        torch.randn(b, p, c, h, w, dtype=dtype),
        torch.randn(hd, c, dtype=dtype) / c**0.5,
        torch.randn(hd, dtype=dtype) * 0.1,
        torch.randn(hd, dtype=dtype),
    )


def run(backend, nodes, w1, b1, w2, slope):
    with use_backend(backend):
        return graph_aggregate(nodes, w1, b1, w2, slope, return_adjacency=True)


def check(backend, nodes, w1, b1, w2, slope=0.2, atol=1e-10, rtol=1e-10):
    leaves = [t.detach().clone().requires_grad_(True) for t in (nodes, w1, b1, w2)]
    ref_leaves = [t.detach().clone().requires_grad_(True) for t in (nodes, w1, b1, w2)]
    out, adj = run(backend, *leaves, slope)
    out_ref, adj_ref = formula(*ref_leaves, slope)
    torch.testing.assert_close(out, out_ref, atol=atol, rtol=rtol, msg=lambda m: f"out: {m}")
    torch.testing.assert_close(adj, adj_ref, atol=atol, rtol=rtol, msg=lambda m: f"adjacency: {m}")
    assert (adj.diagonal(dim1=1, dim2=2) == 0).all()
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, g)
    grads_ref = torch.autograd.grad(out_ref, ref_leaves, g)
    for name, a, e in zip(("nodes", "w1", "b1", "w2"), grads, grads_ref):
        torch.testing.assert_close(a, e, atol=atol, rtol=rtol, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [2, 5, 7])
def test_matches_formula_float64(backend, p):
    check(backend, *problem(p=p))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [dict(c=3, hd=5, h=3, w=7), dict(b=1, c=64, hd=16, h=4, w=5), dict(h=1, w=1)])
def test_odd_and_megan_sizes(backend, shape):
    check(backend, *problem(**shape))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("slope", [0.0, 0.2, 1.5])
def test_negative_slope(backend, slope):
    check(backend, *problem(), slope=slope)


@pytest.mark.parametrize("backend", BACKENDS)
def test_equal_entries_use_zero_derivative_of_abs(backend):
    nodes, w1, b1, w2 = problem(p=4)
    nodes[:, 1, :3] = nodes[:, 2, :3]  # |E_1 - E_2| = 0 in three channels
    nodes[:, 3] = nodes[:, 0]  # two identical nodes
    check(backend, nodes, w1, b1, w2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32(backend):
    nodes, w1, b1, w2 = problem(b=2, p=5, c=64, hd=16, h=5, w=6, dtype=torch.float32)
    check(backend, nodes, w1, b1, w2, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous(backend):
    nodes, w1, b1, w2 = problem(p=3, c=4)
    nodes = nodes.permute(0, 1, 2, 4, 3).contiguous().permute(0, 1, 2, 4, 3)
    w1 = w1.t().contiguous().t()
    assert not nodes.is_contiguous() and not w1.is_contiguous()
    check(backend, nodes, w1, b1, w2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    nodes, w1, b1, w2 = (t.requires_grad_(True) for t in problem(b=0))
    out, adj = run(backend, nodes, w1, b1, w2, 0.2)
    assert out.shape == nodes.shape and adj.shape == (0, 5, 5, 3, 5)
    grads = torch.autograd.grad(out, (nodes, w1, b1, w2), torch.ones_like(out))
    assert grads[0].shape == nodes.shape and all((g == 0).all() for g in grads[1:])


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_adjacency_returns_only_out(backend):
    nodes, w1, b1, w2 = problem()
    with use_backend(backend):
        out = graph_aggregate(nodes, w1, b1, w2)
    assert isinstance(out, torch.Tensor) and out.shape == nodes.shape


def test_gradcheck_native():
    nodes, w1, b1, w2 = (t.requires_grad_(True) for t in problem(b=1, p=3, c=3, hd=4, h=2, w=3))
    assert torch.autograd.gradcheck(lambda *a: run("native", *a, 0.2)[0], (nodes, w1, b1, w2))


@pytest.mark.parametrize("return_adjacency", [True, False])
@pytest.mark.parametrize("c,hd", [(3, 4), (64, 16)])  # padded sizes, and MEGAN's (no padding: no aliasing)
def test_opcheck_native(return_adjacency, c, hd):
    nodes, w1, b1, w2 = (t.requires_grad_(True) for t in problem(b=1, p=3, c=c, hd=hd, h=2, w=3))
    torch.library.opcheck(torch.ops.megan_fast.graph_aggregate.default, (nodes, w1, b1, w2, 0.2, return_adjacency))
    g = torch.randn(1, 3, c, 2, 3, dtype=torch.float64)
    args = (g, nodes.detach(), w1.detach(), b1.detach(), w2.detach(), 0.2)
    torch.library.opcheck(torch.ops.megan_fast.graph_aggregate_backward.default, args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    nodes, w1, b1, w2 = (t.float().requires_grad_(True) for t in problem())
    with use_backend(backend):
        f = torch.compile(lambda *a: graph_aggregate(*a, 0.2).square().sum(), fullgraph=True, backend="aot_eager")
        y = f(nodes, w1, b1, w2)
        grads = torch.autograd.grad(y, (nodes, w1, b1, w2))
    y_ref = formula(nodes, w1, b1, w2, 0.2)[0].square().sum()
    grads_ref = torch.autograd.grad(y_ref, (nodes, w1, b1, w2))
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-5)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_triton_backend_through_the_public_function():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the Triton tests run on it (tests/test_graph_aggregate_triton.py)")
    assert _backend.triton_status("cpu") is None
    check("triton", *problem(b=1, p=3, c=3, hd=2, h=2, w=3), atol=1e-9, rtol=1e-9)


def test_errors_name_the_argument():
    nodes, w1, b1, w2 = problem(dtype=torch.float32)
    cases = [
        ((nodes[0], w1, b1, w2), ValueError, r"nodes must be 5-D \(b, p, c, h, w\)"),
        ((nodes[:, :1], w1, b1, w2), ValueError, r"p >= 2 nodes"),
        ((nodes, w1[:, :5], b1, w2), ValueError, r"w1 must have shape \(hd, 6\)"),
        ((nodes, w1, b1[:3], w2), ValueError, r"b1 must have shape \(4,\)"),
        ((nodes, w1, b1, w2[None]), ValueError, r"w2 must have shape \(4,\)"),
        ((nodes, w1.double(), b1, w2), TypeError, r"w1 has dtype torch.float64 but nodes has torch.float32"),
        ((nodes, w1, b1.to("meta"), w2), ValueError, r"b1 is on meta but nodes is on cpu"),
        ((nodes.half(), w1.half(), b1.half(), w2.half()), TypeError, r"nodes dtype torch.float16 is not supported"),
    ]
    for args, exc, pattern in cases:
        with pytest.raises(exc, match=pattern):
            graph_aggregate(*args)
