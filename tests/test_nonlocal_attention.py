"""nonlocal_attention against the explicit formula on forward and every gradient, per backend."""

from __future__ import annotations

import pytest
import torch

from megan_fast.ops import _backend, nonlocal_attention, use_backend

BACKENDS = ["native", "reference", "stock"]


def formula(q, k, v, scale):
    """The explicit formula in float64: the ground truth."""
    q64, k64, v64 = q.double(), k.double(), v.double()
    return torch.softmax(scale * q64 @ k64.transpose(1, 2), dim=-1) @ v64


def problem(b=2, n=9, m=11, d=5, dv=7, dtype=torch.float64, logit_scale=1.0):
    q = torch.randn(b, n, d, dtype=dtype) * logit_scale
    k = torch.randn(b, m, d, dtype=dtype)
    v = torch.randn(b, m, dv, dtype=dtype)
    return q, k, v


def grads_of(fn, q, k, v, scale, g):
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out = fn(*leaves, scale)
    return (out.detach(), *torch.autograd.grad(out, leaves, g.to(out.dtype)))


def run(backend):
    def fn(q, k, v, scale):
        with use_backend(backend):
            return nonlocal_attention(q, k, v, scale)

    return fn


def check(backend, q, k, v, scale=1.0, atol=1e-10, rtol=1e-10):
    g = torch.randn(q.shape[0], q.shape[1], v.shape[2], dtype=torch.float64)
    expected = grads_of(formula, q, k, v, scale, g)
    got = grads_of(run(backend), q, k, v, scale, g)
    for name, a, e in zip(("out", "grad_q", "grad_k", "grad_v"), got, expected):
        torch.testing.assert_close(a.double(), e.double(), atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


SHAPES = {
    "n!=m d!=dv": dict(n=9, m=11, d=5, dv=7),
    "single query and key": dict(n=1, m=1, d=3, dv=2),
    "odd": dict(n=37, m=129, d=5, dv=7),
    "megan head": dict(n=64, m=64, d=32, dv=32),
    "several blocks": dict(b=1, n=300, m=700, d=8, dv=4),
    "batch 3": dict(b=3, n=17, m=23, d=4, dv=4),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(SHAPES))
def test_matches_formula_float64(backend, name):
    atol = 1e-10 if backend != "stock" else 1e-9
    check(backend, *problem(**SHAPES[name]), atol=atol, rtol=atol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [0.125, 3.0])
def test_scale(backend, scale):
    check(backend, *problem(), scale=scale)


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_large_logits_are_stable(backend):
    # Logits of about +-1000: a naive exp overflows; the softmax must not.
    q, k, v = problem(n=20, m=30, d=4, logit_scale=300.0)
    check(backend, q, k, v, atol=1e-8, rtol=1e-8)
    out = run(backend)(q.float(), k.float(), v.float(), 1.0)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32(backend):
    q, k, v = problem(b=2, n=130, m=70, d=32, dv=32, dtype=torch.float32)
    check(backend, q, k, v, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    q, k, v = problem(n=12, m=10, d=6, dv=6)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)
    k = torch.cat([k, k], dim=2)[:, :, ::2]
    v = v.permute(1, 0, 2).contiguous().permute(1, 0, 2)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    check(backend, q, k, v)


@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("b,n,m", [(0, 5, 6), (2, 0, 6), (2, 5, 0)])
def test_empty(backend, b, n, m):
    q, k, v = problem(b=b, n=n, m=m, d=3, dv=4)
    out, gq, gk, gv = grads_of(run(backend), q, k, v, 1.0, torch.randn(b, n, 4, dtype=torch.float64))
    assert out.shape == (b, n, 4) and gq.shape == q.shape and gk.shape == k.shape and gv.shape == v.shape
    for t in (out, gq, gk, gv):
        assert torch.isfinite(t).all() and (t == 0).all()


def test_gradcheck_native():
    q, k, v = (t.requires_grad_(True) for t in problem(b=2, n=6, m=5, d=3, dv=4))
    assert torch.autograd.gradcheck(lambda a, b_, c: run("native")(a, b_, c, 0.7), (q, k, v))


def test_opcheck_native():
    q, k, v = (t.requires_grad_(True) for t in problem(b=2, n=6, m=5, d=3, dv=4))
    torch.library.opcheck(torch.ops.megan_fast.nonlocal_attention.default, (q, k, v, 0.7))
    out, lse = torch.ops.megan_fast.nonlocal_attention(q.detach(), k.detach(), v.detach(), 0.7)
    assert lse.dtype == torch.float64 and lse.shape == (2, 6)
    torch.testing.assert_close(lse, torch.logsumexp(0.7 * q.detach() @ k.detach().transpose(1, 2), -1))
    g = torch.randn_like(out)
    torch.library.opcheck(
        torch.ops.megan_fast.nonlocal_attention_backward.default,
        (g, q.detach(), k.detach(), v.detach(), out, lse, 0.7),
    )
    # transposed views, as the non-local block passes them: the fake kernel's strides must be the kernel's
    qt, kt, vt = (t.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(True) for t in (q, k, v))
    torch.library.opcheck(torch.ops.megan_fast.nonlocal_attention.default, (qt, kt, vt, 0.7))
    torch.library.opcheck(
        torch.ops.megan_fast.nonlocal_attention_backward.default,
        (g, qt.detach(), kt.detach(), vt.detach(), out, lse, 0.7),
    )


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_torch_compile_fullgraph(backend):
    q, k, v = (t.requires_grad_(True) for t in problem(dtype=torch.float32))
    with use_backend(backend):
        f = torch.compile(lambda a, b_, c: nonlocal_attention(a, b_, c, 0.5).square().sum(), fullgraph=True,
                          backend="aot_eager")
        y = f(q, k, v)
        grads = torch.autograd.grad(y, (q, k, v))
    y_ref = formula(q, k, v, 0.5).square().sum()
    grads_ref = torch.autograd.grad(y_ref, (q, k, v))
    torch.testing.assert_close(y.double(), y_ref, atol=1e-4, rtol=1e-5)
    for a, b_ in zip(grads, grads_ref):
        torch.testing.assert_close(a.double(), b_.double(), atol=1e-4, rtol=1e-4)


def test_triton_backend_through_the_public_function():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the Triton tests run on it (tests/test_nonlocal_attention_triton.py)")
    reason = _backend.triton_status("cpu")
    assert reason is None, reason
    check("triton", *problem(b=1, n=5, m=7, d=3, dv=4), atol=1e-9, rtol=1e-9)


def test_errors_name_the_argument():
    q, k, v = problem(dtype=torch.float32)
    cases = [
        ((q[0], k, v), ValueError, r"q must be 3-D"),
        ((q, k[0], v), ValueError, r"k must be 3-D"),
        ((q, k, v[..., None]), ValueError, r"v must be 3-D"),
        ((q, k[:, :, :4], v), ValueError, r"k must have shape \(2, m, 5\)"),
        ((q, k[:1], v), ValueError, r"k must have shape \(2, m, 5\)"),
        ((q, k, v[:, :3]), ValueError, r"v must have shape \(2, 11, dv\)"),
        ((q, k.double(), v), TypeError, r"k has dtype torch.float64 but q has torch.float32"),
        ((q.half(), k.half(), v.half()), TypeError, r"q dtype torch.float16 is not supported on cpu"),
        ((q, k.to("meta"), v), ValueError, r"k is on meta but q is on cpu"),
    ]
    for args, exc, pattern in cases:
        with pytest.raises(exc, match=pattern):
            nonlocal_attention(*args)
    with pytest.raises(TypeError, match="scale must be a Python float"):
        nonlocal_attention(q, k, v, torch.tensor(1.0))


def test_cuda_auto_rule():
    # The measured rule (H100): Triton for large forward-only fp16/bf16 problems, SDPA otherwise; auto runs it
    # on CUDA once both passes have run on a real GPU (megan_fast/ops/_backend.GPU_VERIFIED), SDPA until then.
    import importlib

    mod = importlib.import_module("megan_fast.ops.nonlocal_attention")
    big = 1 << 11  # n * m = 2^22
    for n, dtype, grad, want in [(big, torch.bfloat16, False, "triton"), (big, torch.float16, False, "triton"),
                                 (big, torch.bfloat16, True, "stock"), (big, torch.float32, False, "stock"),
                                 (big // 2, torch.bfloat16, False, "stock")]:
        q = torch.empty(1, n, 4, dtype=dtype, device="meta", requires_grad=grad)
        assert mod._cuda_pick(q, q, q, 1.0) == want, (n, dtype, grad)
    with torch.no_grad():
        q = torch.empty(1, big, 4, dtype=torch.bfloat16, device="meta", requires_grad=True)
        assert mod._cuda_pick(q, q, q, 1.0) == "triton"
    assert not _backend.gpu_verified("nonlocal_attention") and mod.FUSED.cuda_auto("triton") == "stock"


def test_stock_makes_transposed_views_contiguous_for_sdpa():
    import importlib

    mod = importlib.import_module("megan_fast.ops.nonlocal_attention")
    q, k, v = (torch.randn(2, 6, 20, dtype=torch.float64).transpose(1, 2) for _ in range(3))
    assert q.stride(-1) != 1
    torch.testing.assert_close(mod._stock(q, k, v, 1.0), torch.softmax(q @ k.transpose(1, 2), -1) @ v)
