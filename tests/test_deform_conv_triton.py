"""Triton DCNv2 kernels (megan_fast/triton/deform_conv.py) against torchvision.ops.deform_conv2d.

Without a GPU the kernels run on CPU tensors under the Triton interpreter
(TRITON_INTERPRET=1, set before triton is imported: tests/conftest.py does it
when no GPU is present).  The interpreter is slow and serial, so the problems
are tiny; they are chosen to hit the kernels' tails and layouts: c_in / c_out
below 16 and not multiples of the blocks, several output-channel tiles, chunks
of 1, 2, 4, 8 and 16 channels per sample point, tiles spanning two offset
groups and several taps.
"""

from __future__ import annotations

import pytest
import torch

torchvision = pytest.importorskip("torchvision")

from _triton_util import DEVICE, cuda_only, launched_kernels  # noqa: E402  (skips without Triton / interpreter)
from _triton_util import kernel_generation  # noqa: E402,F401  (fixture: current and previous kernels)
from megan_fast.triton import deform_conv as tdc  # noqa: E402

pytestmark = pytest.mark.usefixtures("kernel_generation")


# --------------------------------------------------------------------------- helpers


def _out_size(n, k, s, p, d):
    return (n + 2 * p - (d * (k - 1) + 1)) // s + 1


def make_problem(
    b=2, c_in=4, c_out=6, h=5, w=6, k=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1),
    groups=1, og=1, with_mask=True, with_bias=True, offset_scale=1.5, dtype=torch.float64,
    device=DEVICE, seed=0,
):
    gen = torch.Generator().manual_seed(seed)
    kh, kw = k
    ho = _out_size(h, kh, stride[0], padding[0], dilation[0])
    wo = _out_size(w, kw, stride[1], padding[1], dilation[1])

    def rnd(*shape, kind="n"):
        t = torch.randn(*shape, generator=gen, dtype=torch.float64) if kind == "n" else \
            torch.rand(*shape, generator=gen, dtype=torch.float64)
        return t.to(dtype=dtype, device=device)

    return dict(
        input=rnd(b, c_in, h, w),
        offset=rnd(b, 2 * og * kh * kw, ho, wo) * offset_scale,
        weight=rnd(c_out, c_in // groups, kh, kw) / (c_in * kh * kw / groups) ** 0.5,
        bias=rnd(c_out) if with_bias else None,
        mask=rnd(b, og * kh * kw, ho, wo, kind="u") if with_mask else None,
        stride=stride, padding=padding, dilation=dilation,
    )


def torchvision_result(pr, grad_output=None, seed=1):
    """torchvision's output and (input, offset, weight, mask) gradients for a random grad_output."""
    device = pr["input"].device
    if device.type == "cuda" and not bool((pr["offset"].abs() < 1e4).all()):
        # torchvision's CUDA kernels read out of bounds for huge / infinite offsets (an illegal
        # memory access that poisons the CUDA context): take its CPU result for those.
        cpu = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in pr.items()}
        go = None if grad_output is None else grad_output.cpu()
        out, go, grads = torchvision_result(cpu, go, seed)
        return out.to(device), go.to(device), {k: v.to(device) for k, v in grads.items()}
    leaves = {k: pr[k].detach().clone().requires_grad_(True) for k in ("input", "offset", "weight", "mask")
              if pr[k] is not None}
    out = torchvision.ops.deform_conv2d(
        leaves["input"], leaves["offset"], leaves["weight"], pr["bias"], pr["stride"], pr["padding"],
        pr["dilation"], leaves.get("mask"),
    )
    if grad_output is None:
        g = torch.Generator().manual_seed(seed)
        grad_output = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype).to(out.device)
    grads = torch.autograd.grad(out, list(leaves.values()), grad_output)
    return out.detach(), grad_output, dict(zip(leaves, grads))


def triton_result(pr, grad_output):
    args = (pr["input"], pr["offset"], pr["weight"])
    conv = (pr["stride"], pr["padding"], pr["dilation"])
    out = tdc.deform_conv2d_forward(*args, pr["bias"], pr["mask"], *conv)
    gi, go, gw, gm = tdc.deform_conv2d_backward(grad_output, *args, pr["mask"], *conv)
    grads = dict(input=gi, offset=go, weight=gw)
    if pr["mask"] is not None:
        grads["mask"] = gm
    else:
        assert gm.numel() == 0
    return out, grads


def _tol(dtype):
    return dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)


def check_against_torchvision(pr, finite_only=False):
    """Compares the forward and all four gradients; finite_only: only where torchvision is finite."""
    ref_out, grad_output, ref_grads = torchvision_result(pr)
    out, grads = triton_result(pr, grad_output)
    tol = _tol(pr["input"].dtype)
    pairs = [("output", out, ref_out)] + [(f"grad_{k}", grads[k], ref_grads[k]) for k in ref_grads]
    for name, actual, expected in pairs:
        assert actual.shape == expected.shape, name
        assert actual.dtype == expected.dtype, name
        assert torch.isfinite(actual).all(), f"{name}: non-finite values"
        if finite_only:
            keep = torch.isfinite(expected)
            actual, expected = actual[keep], expected[keep]
        torch.testing.assert_close(actual, expected, **tol, msg=lambda m, n=name: f"{n}: {m}")
    return out, grads


def _call(fn):
    """Runs fn; on CUDA a TypeError for float64 (no fp64 tl.dot on this GPU / Triton) skips."""
    try:
        return fn()
    except TypeError as exc:
        if DEVICE == "cuda" and "float64" in str(exc):
            pytest.skip(str(exc))
        raise


# --------------------------------------------------------------------------- cases

CASES = {
    # CHUNK = channels sharing one sample point inside a 16-wide reduction tile (interpreter blocks)
    "base": dict(),  # chunk 4, one tile spans 4 taps
    "groups2_og2": dict(groups=2, og=2),  # chunk 2
    "og2": dict(c_in=8, c_out=5, og=2),  # chunk 4, a tile spans both offset groups
    "groups2_og1": dict(c_in=8, c_out=6, groups=2, og=1),
    "groups2_og4": dict(c_in=8, c_out=4, groups=2, og=4, with_bias=False),
    "odd_channels_stride2_pad0": dict(c_in=3, c_out=5, h=7, w=6, stride=(2, 2), padding=(0, 0)),  # chunk 1
    "odd_offset_groups": dict(c_in=6, c_out=4, groups=2, og=2),  # Cpo = 3, chunk 1
    "dilation2": dict(c_in=4, c_out=3, h=6, w=7, dilation=(2, 2)),
    "kernel1x1": dict(k=(1, 1), padding=(0, 0), c_out=7),
    "kernel2x3": dict(k=(2, 3), padding=(1, 0), stride=(2, 1), c_out=5, og=2),
    "no_mask": dict(with_mask=False, og=2),
    "wide": dict(b=1, c_in=16, c_out=20, h=4, w=4, og=2),  # chunk 8, two c_out tiles
    "full_chunk": dict(b=1, c_in=16, c_out=3, h=3, w=5, og=1, offset_scale=3.0),  # chunk 16
    # 32 channels per offset group: a chunk (16) is half a group, so the one-pass backward accumulates
    "cpo32": dict(b=1, c_in=32, c_out=4, h=3, w=4, og=1),
}

FP32_CASES = ["base", "groups2_og2", "odd_channels_stride2_pad0", "no_mask", "kernel2x3"]


@pytest.mark.parametrize("case", list(CASES))
def test_fp64_matches_torchvision(case):
    pr = make_problem(**CASES[case], dtype=torch.float64)
    _call(lambda: check_against_torchvision(pr))


@pytest.mark.parametrize("case", FP32_CASES)
def test_fp32_matches_torchvision(case):
    pr = make_problem(**CASES[case], dtype=torch.float32)
    check_against_torchvision(pr)


def test_non_contiguous_inputs():
    pr = make_problem(c_in=4, c_out=6, groups=2, og=2, dtype=torch.float64)
    # same values, non-contiguous storage: transposed, sliced and permuted views
    pr["input"] = pr["input"].transpose(2, 3).contiguous().transpose(2, 3)
    assert not pr["input"].is_contiguous()
    big = torch.zeros(pr["offset"].shape[0], pr["offset"].shape[1] * 2, *pr["offset"].shape[2:],
                      dtype=pr["offset"].dtype, device=DEVICE)
    big[:, ::2] = pr["offset"]
    pr["offset"] = big[:, ::2]
    assert not pr["offset"].is_contiguous()
    pr["weight"] = pr["weight"].permute(3, 2, 1, 0).contiguous().permute(3, 2, 1, 0)
    assert not pr["weight"].is_contiguous()
    pr["mask"] = pr["mask"].transpose(0, 1).contiguous().transpose(0, 1)
    assert not pr["mask"].is_contiguous()
    ref_out, grad_output, ref_grads = torchvision_result(pr)
    grad_output = grad_output.transpose(2, 3).contiguous().transpose(2, 3)
    out, grads = _call(lambda: triton_result(pr, grad_output))
    torch.testing.assert_close(out, ref_out, **_tol(torch.float64))
    for k in ref_grads:
        torch.testing.assert_close(grads[k], ref_grads[k], **_tol(torch.float64))


def test_channels_last_input():
    pr = make_problem(c_in=4, c_out=5, dtype=torch.float64)
    pr["input"] = pr["input"].to(memory_format=torch.channels_last)
    _call(lambda: check_against_torchvision(pr))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_zero_offsets_border(dtype):
    # Zero offsets with padding 1: integer sample points, the first / last taps exactly on
    # y = -1, y = h, x = -1, x = w (torchvision's offset gradient is non-zero at -1).
    pr = make_problem(b=1, c_in=3, c_out=4, h=4, w=5, og=1, dtype=dtype)
    pr["offset"] = torch.zeros_like(pr["offset"])
    _call(lambda: check_against_torchvision(pr))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_special_sample_points(dtype):
    # Sample points placed exactly on and just around the borders and on integers.
    h, w = 4, 5
    pr = make_problem(b=2, c_in=4, c_out=3, h=h, w=w, og=2, dtype=dtype)
    e = 2.0 ** -8
    ys = torch.tensor([-2.0, -1 - e, -1.0, -1 + e, -0.5, 0.0, 1.0, h - 1.0, h - 1 + e, h - e, h, h + e, 2.5])
    xs = torch.tensor([-2.0, -1 - e, -1.0, -1 + e, -0.5, 0.0, 2.0, w - 1.0, w - 1 + e, w - e, w, w + e, 1.5])
    off = pr["offset"]
    b, c2, ho, wo = off.shape
    gen = torch.Generator().manual_seed(3)
    ty = ys[torch.randint(len(ys), (b, c2 // 2, ho, wo), generator=gen)]
    tx = xs[torch.randint(len(xs), (b, c2 // 2, ho, wo), generator=gen)]
    kh = kw = 3
    tap = torch.arange(c2 // 2) % (kh * kw)
    oy = torch.arange(ho).view(1, 1, ho, 1)
    ox = torch.arange(wo).view(1, 1, 1, wo)
    base_y = oy - 1 + (tap // kw).view(1, -1, 1, 1)  # stride 1, padding 1, dilation 1
    base_x = ox - 1 + (tap % kw).view(1, -1, 1, 1)
    new = torch.empty(b, c2, ho, wo, dtype=torch.float64)
    new[:, 0::2] = ty - base_y
    new[:, 1::2] = tx - base_x
    pr["offset"] = new.to(dtype=dtype, device=DEVICE)
    _call(lambda: check_against_torchvision(pr))


def test_integer_offsets():
    pr = make_problem(c_in=4, c_out=5, og=2, dtype=torch.float64)
    gen = torch.Generator().manual_seed(5)
    pr["offset"] = torch.randint(-3, 4, pr["offset"].shape, generator=gen).to(torch.float64).to(DEVICE)
    _call(lambda: check_against_torchvision(pr))


def test_far_and_infinite_offsets():
    # +-50, +-1e6 and +-inf: the points read nothing and get no gradient.  torchvision gives NaN
    # offset gradients for infinite offsets, so only its finite entries are compared.
    pr = make_problem(c_in=4, c_out=5, og=2, dtype=torch.float64)
    gen = torch.Generator().manual_seed(7)
    off = pr["offset"].cpu()
    pick = torch.rand(off.shape, generator=gen)
    far = torch.tensor([50.0, -50.0, 1e6, -1e6, float("inf"), float("-inf")], dtype=off.dtype)
    choice = far[torch.randint(len(far), off.shape, generator=gen)]
    pr["offset"] = torch.where(pick < 0.4, choice, off).to(DEVICE)
    _call(lambda: check_against_torchvision(pr, finite_only=True))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_nan_offsets_behave_as_outside(dtype):
    # NaN points must not read or write out of bounds; they behave as points far outside.
    # (torchvision itself reads out of bounds for NaN offsets, so it gets 1e6 instead.)
    pr = make_problem(c_in=4, c_out=5, og=2, dtype=dtype)
    gen = torch.Generator().manual_seed(11)
    nan_at = torch.rand(pr["offset"].shape, generator=gen) < 0.3
    nan_at = nan_at.to(DEVICE)
    far = dict(pr, offset=torch.where(nan_at, torch.full_like(pr["offset"], 1e6), pr["offset"]))
    ref_out, grad_output, ref_grads = torchvision_result(far)
    nan = dict(pr, offset=torch.where(nan_at, torch.full_like(pr["offset"], float("nan")), pr["offset"]))
    out, grads = _call(lambda: triton_result(nan, grad_output))
    torch.testing.assert_close(out, ref_out, **_tol(dtype))
    for k in ref_grads:
        assert torch.isfinite(grads[k]).all(), k
        torch.testing.assert_close(grads[k], ref_grads[k], **_tol(dtype))


@pytest.mark.parametrize("with_mask", [True, False])
def test_batch_zero(with_mask):
    pr = make_problem(b=0, c_in=4, c_out=6, og=2, with_mask=with_mask, dtype=torch.float32)
    out = tdc.deform_conv2d_forward(pr["input"], pr["offset"], pr["weight"], pr["bias"], pr["mask"],
                                    pr["stride"], pr["padding"], pr["dilation"])
    assert out.shape == (0, 6, 5, 6) and out.dtype == torch.float32
    go = torch.randn(out.shape, device=DEVICE)
    gi, goff, gw, gm = tdc.deform_conv2d_backward(go, pr["input"], pr["offset"], pr["weight"], pr["mask"],
                                                  pr["stride"], pr["padding"], pr["dilation"])
    assert gi.shape == pr["input"].shape and goff.shape == pr["offset"].shape
    assert gw.shape == pr["weight"].shape and torch.count_nonzero(gw) == 0
    if with_mask:
        assert gm.shape == pr["mask"].shape
    else:
        assert gm.numel() == 0


def test_output_dtypes_and_contiguity():
    pr = make_problem(dtype=torch.float32, with_mask=False)
    ref_out, grad_output, _ = torchvision_result(pr)
    out, grads = triton_result(pr, grad_output)
    assert out.is_contiguous()
    for k, g in grads.items():
        assert g.dtype == torch.float32 and g.is_contiguous(), k


def test_int64_index_path(monkeypatch):
    # Inputs over 2**30 elements switch the kernels to 64-bit batch addressing; force it here.
    monkeypatch.setattr(tdc, "numel_needs_int64", lambda *tensors: True)
    pr = make_problem(c_in=4, c_out=5, og=2, dtype=torch.float64)
    _call(lambda: check_against_torchvision(pr))


@pytest.mark.parametrize("case, direct", [("base", True), ("groups2_og1", False)])
def test_generation_runs_its_backward_kernels(monkeypatch, kernel_generation, case, direct):
    # current: one sampling pass (offset / mask gradients stored when a chunk is a whole offset
    # group, atomics otherwise); previous: the data kernel then the weight kernel.
    names = launched_kernels(monkeypatch, tdc)
    pr = make_problem(**CASES[case], dtype=torch.float64)
    geo = tdc._geometry(pr["input"], pr["offset"], pr["weight"], pr["stride"], pr["padding"], pr["dilation"])
    assert (geo["chunk_base"] == geo["Cpo"]) == direct
    check_against_torchvision(pr)
    if kernel_generation == "current":
        assert names == ["_dcn_fwd_kernel", "_dcn_bwd_one_pass_kernel"]
    else:
        assert names == ["_dcn_fwd_kernel", "_dcn_bwd_data_kernel", "_dcn_bwd_weight_kernel"]


def test_generation_setting_is_checked(monkeypatch):
    monkeypatch.setenv("MEGAN_FAST_TRITON_KERNELS", "newest")
    pr = make_problem(dtype=torch.float32)
    with pytest.raises(ValueError, match="MEGAN_FAST_TRITON_KERNELS must be one of current, previous"):
        triton_result(pr, torch.zeros(2, 6, 5, 6, device=DEVICE))


# --------------------------------------------------------------------------- CUDA only


def _grad_output(pr, seed=1):
    b, _, ho, wo = pr["offset"].shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, pr["weight"].shape[0], ho, wo, generator=g)
    return x.to(dtype=pr["input"].dtype, device=pr["input"].device)


def _max_err(a, b):
    return (a.float() - b.float()).abs().max().item()


@cuda_only
def test_fp32_cuda_gpu_sized():
    pr = make_problem(b=2, c_in=64, c_out=64, h=24, w=20, og=8, dtype=torch.float32, offset_scale=3.0)
    ref_out, grad_output, ref_grads = torchvision_result(pr)
    out, grads = triton_result(pr, grad_output)
    for name, a, e in [("output", out, ref_out)] + [(k, grads[k], ref_grads[k]) for k in ref_grads]:
        scale = e.abs().max().item() + 1e-6
        assert _max_err(a, e) <= 1e-4 * scale + 1e-5, name


@cuda_only
@pytest.mark.parametrize("case", [
    dict(b=2, c_in=64, c_out=64, h=24, w=20, og=8),
    dict(b=1, c_in=32, c_out=48, h=16, w=16, og=1, groups=2, stride=(2, 2)),
    dict(b=2, c_in=6, c_out=4, h=9, w=11, og=2, groups=2, with_mask=False),
])
def test_fp16_cuda_within_2x_torchvision_error(case):
    pr16 = make_problem(**case, dtype=torch.float16, offset_scale=3.0)
    pr32 = {k: (v.float() if isinstance(v, torch.Tensor) else v) for k, v in pr16.items()}
    go16 = _grad_output(pr16)
    ref_out, _, ref_grads = torchvision_result(pr32, grad_output=go16.float())
    tv_out, _, tv_grads = torchvision_result(pr16, grad_output=go16)
    out, grads = triton_result(pr16, go16)
    assert out.dtype == torch.float16
    for name, a, t, e in [("output", out, tv_out, ref_out)] + [
            (k, grads[k], tv_grads[k], ref_grads[k]) for k in ref_grads]:
        assert a.dtype == torch.float16, name
        floor = 1e-3 * (e.abs().max().item() + 1e-6)
        assert _max_err(a, e) <= 2 * _max_err(t, e) + floor, name


@cuda_only
@pytest.mark.parametrize("case", [
    dict(b=2, c_in=64, c_out=64, h=24, w=20, og=8),
    dict(b=2, c_in=6, c_out=4, h=9, w=11, og=2, groups=2, with_mask=False),
])
def test_bf16_cuda_close_to_fp32(case):
    # torchvision has no bf16 kernels: compare with its fp32 result on the same (bf16-rounded) data.
    pr16 = make_problem(**case, dtype=torch.bfloat16, offset_scale=3.0)
    pr32 = {k: (v.float() if isinstance(v, torch.Tensor) else v) for k, v in pr16.items()}
    go = _grad_output(pr16)
    ref_out, _, ref_grads = torchvision_result(pr32, grad_output=go.float())
    out, grads = triton_result(pr16, go)
    for name, a, e in [("output", out, ref_out)] + [(k, grads[k], ref_grads[k]) for k in ref_grads]:
        assert a.dtype == torch.bfloat16, name
        # bf16 has 8 mantissa bits (eps 2^-8 ~ 4e-3): allow a few roundings of the largest value.
        assert _max_err(a, e) <= 3e-2 * (e.abs().max().item() + 1e-6), name


@cuda_only
@pytest.mark.parametrize("with_mask", [True, False])
def test_opcheck_cuda_kernels(with_mask):
    # The op's CUDA kernels are the Triton ones: opcheck them as tests/test_deform_conv.py does the C++ ones.
    pr = make_problem(b=2, c_in=4, c_out=2, h=4, w=5, og=2, with_mask=with_mask, dtype=torch.float32)
    args = [pr["input"], pr["offset"], pr["weight"], pr["bias"], pr["mask"], list(pr["stride"]),
            list(pr["padding"]), list(pr["dilation"])]
    for t in args[:5]:
        if t is not None:
            t.requires_grad_(True)
    torch.library.opcheck(torch.ops.megan_fast.modulated_deform_conv2d.default, tuple(args))
    g = torch.randn(2, 2, 4, 5, device=DEVICE)
    bwd = (g, *(t.detach() if t is not None else None for t in (args[0], args[1], args[2], args[4])), *args[5:])
    torch.library.opcheck(torch.ops.megan_fast.modulated_deform_conv2d_backward.default, bwd)
