"""Triton fused attention kernels (megan_fast/triton/nonlocal_attention.py) against the explicit formula.

Without a GPU the kernels run on CPU tensors under the Triton interpreter
(TRITON_INTERPRET=1, set before triton is imported: tests/conftest.py does it
when no GPU is present).  The interpreter is slow and serial, so the problems
are tiny, but larger than the CPU blocks (16 x 16): they span several query
and key blocks (online-softmax rescaling across blocks) and end in partial
tails, with head dims that are not powers of two (padded, masked columns).
Ground truth: softmax(scale q k^T) v, logsumexp and their autograd gradients,
all in float64.
"""

from __future__ import annotations

import math

import pytest
import torch

from _triton_util import DEVICE, cuda_only, launched_kernels, skip_module_without_triton

skip_module_without_triton()

from megan_fast.triton import nonlocal_attention as tna  # noqa: E402

TOL = {torch.float64: 1e-9, torch.float32: 1e-5}


# --------------------------------------------------------------------------- helpers


def formula(q, k, v, scale):
    """(out, lse) by the explicit formula, in the inputs' dtype (n x m matrix and all)."""
    logits = scale * (q @ k.transpose(1, 2))
    return torch.softmax(logits, dim=-1) @ v, torch.logsumexp(logits, dim=-1)


def problem(b=2, n=37, m=21, d=5, dv=7, dtype=torch.float64, q_scale=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype=dtype, device=DEVICE)

    return rnd(b, n, d) * q_scale, rnd(b, m, d), rnd(b, m, dv)


def expected(q, k, v, scale, grad_out):
    """float64 ground truth: out, lse, grad_q, grad_k, grad_v."""
    leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    out, lse = formula(*leaves, scale)
    grads = torch.autograd.grad(out, leaves, grad_out.double())
    return (out.detach(), lse.detach(), *grads)


def forward_or_skip(q, k, v, scale):
    """The Triton forward; on a GPU whose Triton has no float64 tl.dot, skips (documented TypeError)."""
    if q.is_cuda and q.dtype == torch.float64:
        try:
            return tna.nonlocal_attention_forward(q, k, v, scale)
        except TypeError as exc:
            assert "float64" in str(exc)
            pytest.skip("float64 tl.dot is not supported by this Triton / GPU (the CPU backends cover float64)")
    return tna.nonlocal_attention_forward(q, k, v, scale)


def triton_all(q, k, v, scale, grad_out):
    out, lse = forward_or_skip(q, k, v, scale)
    grads = tna.nonlocal_attention_backward(grad_out, q, k, v, out, lse, scale)
    return (out, lse, *grads)


NAMES = ("out", "lse", "grad_q", "grad_k", "grad_v")


def check(q, k, v, scale=1.0, tol=None, grad_out=None):
    if grad_out is None:
        gen = torch.Generator().manual_seed(1)
        grad_out = torch.randn(q.shape[0], q.shape[1], v.shape[2], generator=gen, dtype=torch.float64)
        grad_out = grad_out.to(dtype=q.dtype, device=q.device)
    tol = TOL[q.dtype] if tol is None else tol
    got = triton_all(q, k, v, scale, grad_out)
    exp = expected(q, k, v, scale, grad_out)
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    assert got[1].dtype == lse_dtype
    for name, g, e, like in zip(NAMES, got, exp, (None, None, q, k, v)):
        if like is not None:
            assert g.dtype == like.dtype and g.shape == like.shape, name
        else:
            assert name == "lse" or g.dtype == q.dtype, name
        torch.testing.assert_close(g.double(), e, atol=tol, rtol=tol, msg=lambda msg: f"{name}: {msg}")
    return got


# --------------------------------------------------------------------------- shapes and dtypes

SHAPES = {
    # n != m, d != dv, odd head dims; 3 query blocks and 2 key blocks, both with tails
    "n!=m d!=dv odd": dict(b=2, n=37, m=21, d=5, dv=7),
    "single query and key": dict(b=1, n=1, m=1, d=5, dv=7),
    "one query, key tail": dict(b=2, n=1, m=37, d=3, dv=2),
    "one key, query tail": dict(b=1, n=37, m=1, d=7, dv=5),
    # exact multiples of the CPU blocks and 16-wide heads: the unmasked code paths
    "exact blocks": dict(b=1, n=32, m=48, d=16, dv=16),
    # MEGAN's head dim, several blocks each way
    "megan head": dict(b=1, n=40, m=70, d=32, dv=32),
    # head dims padded to 32 and to 16
    "wide d narrow dv": dict(b=1, n=19, m=33, d=20, dv=3),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", list(SHAPES))
def test_matches_formula(name, dtype):
    check(*problem(**SHAPES[name], dtype=dtype), scale=1 / math.sqrt(SHAPES[name]["d"]))


@pytest.mark.parametrize("scale", [3.0, -0.5, 0.0])
def test_scale(scale):
    # A negative scale flips which logit is the row max: the max must be taken after scaling.
    check(*problem(b=1, n=20, m=35), scale=scale)


def test_batches_are_independent():
    q, k, v = problem(b=3, n=18, m=17, d=4, dv=4)
    got = triton_all(q, k, v, 0.5, torch.ones(3, 18, 4, dtype=q.dtype, device=DEVICE))
    for i in range(3):
        one = triton_all(q[i:i + 1], k[i:i + 1], v[i:i + 1], 0.5, torch.ones(1, 18, 4, dtype=q.dtype, device=DEVICE))
        for name, a, e in zip(NAMES, got, one):
            torch.testing.assert_close(a[i:i + 1], e, atol=1e-12, rtol=1e-12, msg=lambda msg: f"{name}: {msg}")


# --------------------------------------------------------------------------- numerics


# With sign = -1, the dQ kernel's exp2 of a 0-loaded tail key overflows before the key
# mask replaces it by 0, and the dK/dV tail program computes inf / NaN in key rows past
# m, which it never stores: numpy (the interpreter) warns about both.
@pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul:RuntimeWarning")
@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["positive", "negative"])
def test_large_logits_float64(sign):
    # Logits of about +-1000 (a naive exp overflows).  With sign = -1 every logit of a
    # row is about -1000: exp2(0 - lse2) of a 0-loaded tail key would be inf, so the
    # key masks must really force p = 0.
    q, k, v = problem(b=2, n=21, m=19, d=4, dv=3)
    q = q.abs() * 250.0
    k = sign * (k.abs() + 0.5)
    logits = (q @ k.transpose(1, 2)).abs()
    assert logits.max() > 900
    got = check(q, k, v, tol=1e-8)
    for t in got:
        assert torch.isfinite(t).all()


def test_large_logits_float32():
    q, k, v = problem(b=1, n=21, m=19, d=4, dv=3, q_scale=300.0)
    assert (q @ k.transpose(1, 2)).abs().max() > 900
    qf, kf, vf = (t.float() for t in (q, k, v))
    g = torch.randn(1, 21, 3, dtype=torch.float64, device=DEVICE)
    got = triton_all(qf, kf, vf, 1.0, g.float())
    exp = expected(q, k, v, 1.0, g)
    # fp32 logits of 1000 carry absolute rounding errors of ~1e-4 (torch's formula too):
    # the softmax weights are then good to ~1e-4 relative, the lse to ~1e-4 absolute.
    for name, a, e in zip(NAMES, got, exp):
        assert torch.isfinite(a).all(), name
        scale_ = e.abs().max().item() + 1.0
        assert (a.double() - e).abs().max().item() <= 2e-3 * scale_, name


def test_non_contiguous_inputs():
    b, n, m, d, dv = 2, 23, 29, 6, 5
    q, k, v = problem(b=b, n=n, m=m, d=d, dv=dv)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)  # dense, (n, d) strides swapped
    kt = torch.zeros(b, 2 * m, d, dtype=k.dtype, device=DEVICE)
    kt[:, ::2] = k
    kt = kt[:, ::2]  # every other row: stride 2 * d along m, not dense
    vt = v.permute(1, 0, 2).contiguous().permute(1, 0, 2)  # batch not outermost
    assert not qt.is_contiguous() and not kt.is_contiguous() and not vt.is_contiguous()
    # grad_out broadcast along n (stride 0), as autograd can hand over
    g = torch.randn(b, 1, dv, dtype=q.dtype, device=DEVICE).expand(b, n, dv)
    got = check(qt, kt, vt, scale=0.4, grad_out=g)
    # gradients are contiguous (what the op's fake kernel says, and the C++ kernels return)
    for grad in got[2:]:
        assert grad.is_contiguous()
    # and equal the contiguous run
    ref = triton_all(q, k, v, 0.4, g.contiguous())
    for name, a, e in zip(NAMES, got, ref):
        torch.testing.assert_close(a, e, atol=1e-12, rtol=1e-12, msg=lambda msg: f"{name}: {msg}")


def test_int64_indexing_path(monkeypatch):
    # The int64 row offsets are only switched on for > 2^31-element tensors; force them.
    monkeypatch.setattr(tna, "strided_needs_int64", lambda *tensors: True)
    check(*problem(b=2, n=20, m=18, d=5, dv=3), scale=0.3)


# --------------------------------------------------------------------------- empty sizes


def test_empty_batch():
    q, k, v = problem(b=0, n=5, m=4, d=3, dv=2)
    out, lse = tna.nonlocal_attention_forward(q, k, v, 1.0)
    assert out.shape == (0, 5, 2) and lse.shape == (0, 5)
    grads = tna.nonlocal_attention_backward(torch.empty_like(out), q, k, v, out, lse, 1.0)
    assert [t.shape for t in grads] == [q.shape, k.shape, v.shape]


def test_no_queries():
    q, k, v = problem(b=2, n=0, m=4, d=3, dv=2)
    out, lse = tna.nonlocal_attention_forward(q, k, v, 1.0)
    assert out.shape == (2, 0, 2) and lse.shape == (2, 0)
    gq, gk, gv = tna.nonlocal_attention_backward(torch.empty_like(out), q, k, v, out, lse, 1.0)
    assert gq.shape == q.shape
    assert torch.equal(gk, torch.zeros_like(k)) and torch.equal(gv, torch.zeros_like(v))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_no_keys(dtype):
    # Rows without keys: an empty sum, out = 0, lse = -inf, no NaN anywhere.
    q, k, v = problem(b=2, n=19, m=0, d=3, dv=5, dtype=dtype)
    out, lse = forward_or_skip(q, k, v, 1.0)
    assert out.shape == (2, 19, 5) and torch.equal(out, torch.zeros_like(out))
    assert lse.shape == (2, 19) and bool((lse == -math.inf).all())
    g = torch.randn_like(out)
    gq, gk, gv = tna.nonlocal_attention_backward(g, q, k, v, out, lse, 1.0)
    assert torch.equal(gq, torch.zeros_like(q))
    assert gk.shape == (2, 0, 3) and gv.shape == (2, 0, 5)


def test_the_launcher_asserts_what_its_kernels_need():
    # The public op checks and explains (tests/test_nonlocal_attention.py); the launcher only asserts.
    q, k, v = problem(b=1, n=4, m=3, d=2, dv=2)
    for bad in ((q, k.float(), v), (q, k[..., :1], v), (q, k, v[:, :2])):
        with pytest.raises(RuntimeError, match="nonlocal_attention"):
            tna.nonlocal_attention_forward(*bad, 1.0)


# --------------------------------------------------------------------------- CUDA only


def _max_err(a, e):
    return (a.double() - e).abs().max().item()


def test_the_backward_is_dq_with_d_then_dkdv(monkeypatch):
    # dQ (which also writes D = rowsum(dO * O)) first, then dK / dV, which reads D: no launch for D alone.
    names = launched_kernels(monkeypatch, tna)
    q, k, v = problem(b=2, n=37, m=21, d=5, dv=7)
    grad_out = torch.randn(2, 37, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    got = triton_all(q, k, v, 0.7, grad_out)
    for name, a, e in zip(NAMES, got, expected(q, k, v, 0.7, grad_out)):
        torch.testing.assert_close(a, e, rtol=TOL[torch.float64], atol=TOL[torch.float64], msg=name)
    assert names == ["_nla_fwd_kernel", "_nla_bwd_dq_kernel", "_nla_bwd_dkdv_kernel"]


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("shape", [dict(b=2, n=300, m=517, d=32, dv=32), dict(b=1, n=129, m=77, d=5, dv=7)],
                         ids=["megan", "odd"])
def test_low_precision_within_twice_formula_error(dtype, shape):
    q64, k64, v64 = problem(**shape)
    scale = 1 / math.sqrt(shape["d"])
    g64 = torch.randn(shape["b"], shape["n"], shape["dv"], dtype=torch.float64, device=DEVICE)
    q, k, v, g = (t.to(dtype) for t in (q64, k64, v64, g64))
    # ground truth from the low-precision inputs, so that only the computation's error counts
    exp = expected(q, k, v, scale, g)
    got = triton_all(q, k, v, scale, g)
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out_lp, lse_lp = formula(*leaves, scale)
    ref = (out_lp.detach(), lse_lp.detach(), *torch.autograd.grad(out_lp, leaves, g))
    for name, a, r, e in zip(NAMES, got, ref, exp):
        assert a.dtype == (torch.float32 if name == "lse" else dtype), name
        assert _max_err(a, e) <= 2 * _max_err(r, e) + 1e-5, (name, _max_err(a, e), _max_err(r, e))


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["f16", "f32"])
def test_large_n_smoke(dtype):
    b, n, m, d = 1, 8192, 8192, 32
    q, k, v = (t.to(dtype) for t in problem(b=b, n=n, m=m, d=d, dv=d, dtype=torch.float32))
    g = torch.randn(b, n, d, dtype=dtype, device=DEVICE)
    out, lse, gq, gk, gv = triton_all(q, k, v, d**-0.5, g)
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=d**-0.5)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert all(torch.isfinite(t).all() for t in (gq, gk, gv))
    tol = 2e-2 if dtype == torch.float16 else 1e-4
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


@cuda_only
def test_float64_on_gpu_works_or_raises_type_error():
    q, k, v = problem(b=1, n=40, m=33, d=5, dv=7)
    try:
        tna.nonlocal_attention_forward(q, k, v, 1.0)
    except TypeError as exc:
        assert "float64" in str(exc)
        return
    check(q, k, v)


@cuda_only
def test_opcheck_cuda_kernels():
    # The op's CUDA kernels are the Triton ones: opcheck them as tests/test_nonlocal_attention.py does the C++ ones.
    q, k, v = (t.float().requires_grad_(True) for t in problem(b=2, n=6, m=5, d=16, dv=16))
    torch.library.opcheck(torch.ops.megan_fast.nonlocal_attention.default, (q, k, v, 0.7))
    out, lse = torch.ops.megan_fast.nonlocal_attention(q.detach(), k.detach(), v.detach(), 0.7)
    torch.library.opcheck(torch.ops.megan_fast.nonlocal_attention_backward.default,
                          (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse, 0.7))
