"""modulated_deform_conv2d against torchvision on forward and every gradient: one harness, every backend.

``native`` and ``reference`` run on CPU tensors; ``triton`` on the GPU when
there is one, else on CPU tensors under the Triton interpreter
(TRITON_INTERPRET=1, set by tests/conftest.py), which is slow and serial:
the problems are tiny, chosen to hit the kernels' tails and layouts (channel
counts below 16 and not multiples of the blocks, several output-channel
tiles, chunks of 1, 2, 4, 8 and 16 channels per sample point, tiles spanning
two offset groups and several taps, groups wider than one register tile).
"""

from __future__ import annotations

import pytest
import torch

import megan_fast
from _dcn_util import TENSOR_ARGS, forward_and_grads, make_problem, torchvision_fn
from _triton_util import TRITON_DEVICE, launched_kernels, require_triton, triton_param
from megan_fast.ops import _backend, modulated_deform_conv2d, use_backend

BACKENDS = ["native", "reference", triton_param()]


def device_of(backend: str) -> str:
    return TRITON_DEVICE if backend == "triton" else "cpu"


def run_backend(backend):
    def fn(**kw):
        with use_backend(backend):
            return modulated_deform_conv2d(**kw)

    return fn


def _tol(dtype):
    return dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)


def assert_matches_torchvision(backend, problem, finite_only=False, **tol):
    """Output and all gradients of ``backend`` against torchvision's; finite_only: where torchvision is finite."""
    tol = tol or _tol(problem["input"].dtype)
    out_tv, g, grads_tv = forward_and_grads(torchvision_fn, problem)
    try:
        out, _, grads = forward_and_grads(run_backend(backend), problem, grad_output=g)
    except TypeError as exc:  # float64 on a GPU: the Triton kernels say so (the CPU kernels cover it)
        if backend == "triton" and "float64" in str(exc) and TRITON_DEVICE == "cuda":
            pytest.skip(str(exc))
        raise
    assert grads.keys() == grads_tv.keys()
    for name, actual, expected in [("output", out, out_tv)] + [(f"grad {k}", grads[k], grads_tv[k]) for k in grads]:
        assert actual.shape == expected.shape and actual.dtype == expected.dtype, name
        assert torch.isfinite(actual).all(), f"{name}: non-finite values"
        if finite_only:
            keep = torch.isfinite(expected)
            actual, expected = actual[keep], expected[keep]
        torch.testing.assert_close(actual, expected, **tol, msg=lambda m, n=name: f"{n}: {m}")


def problem(backend, **kw):
    return make_problem(**kw, device=device_of(backend))


# --------------------------------------------------------------------------- against torchvision

CASES = {
    "basic": dict(),
    "no-mask": dict(with_mask=False),
    "no-bias": dict(with_bias=False),
    "groups2": dict(c_in=4, c_out=6, groups=2, og=1),  # chunk 2
    "og4": dict(c_in=8, og=4),
    "groups2-og4": dict(c_in=8, c_out=4, groups=2, og=4),
    "og2-c8": dict(c_in=8, c_out=5, og=2, h=5, w=6),  # chunk 4, a tile spans both offset groups
    "odd-offset-groups": dict(c_in=6, c_out=4, groups=2, og=2, h=5, w=6),  # 3 channels per offset group: chunk 1
    "stride2": dict(stride=(2, 2)),
    "stride-2x1": dict(stride=(2, 1), h=8),
    "odd-channels-stride2-pad0": dict(c_in=3, c_out=5, h=7, w=6, stride=(2, 2), padding=(0, 0), og=1),
    "dilation2": dict(dilation=(2, 2), padding=(2, 2)),
    "pad2": dict(padding=(2, 1)),
    "k1x1": dict(k=(1, 1), padding=(0, 0), c_out=7),
    "k3x2": dict(k=(3, 2), padding=(1, 0)),
    "k2x3-stride": dict(k=(2, 3), padding=(1, 0), stride=(2, 1), c_out=5, h=5, w=6),
    "k5x5": dict(k=(5, 5), padding=(2, 2), h=6, w=5),
    "batch1-c16": dict(b=1, c_in=16, c_out=20, h=4, w=4, og=2),  # chunk 8, two output-channel tiles
    "full-chunk": dict(b=1, c_in=16, c_out=3, h=3, w=5, og=1, offset_scale=3.0),  # chunk 16
    "cpo32": dict(b=1, c_in=32, c_out=4, h=3, w=4, og=1),  # a chunk is half an offset group: atomics
    "batch3": dict(b=3, og=1, h=4, w=5),
    "tiny-image": dict(h=1, w=2, padding=(1, 1)),
    "large-offsets": dict(offset_scale=6.0),
}
FP32_CASES = ["basic", "groups2", "odd-channels-stride2-pad0", "no-mask", "k2x3-stride"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
def test_matches_torchvision_float64(backend, name):
    assert_matches_torchvision(backend, problem(backend, **CASES[name]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", FP32_CASES)
def test_matches_torchvision_float32(backend, name):
    assert_matches_torchvision(backend, problem(backend, **CASES[name], dtype=torch.float32))


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_matches_torchvision_float32_megan_shape(backend):
    # MEGAN's layout (64 channels, 8 offset groups), small spatial size.
    p = make_problem(b=2, c_in=64, c_out=64, h=10, w=13, og=8, dtype=torch.float32)
    assert_matches_torchvision(backend, p, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("b", [1, 2, 5])
def test_thread_partitioning(backend, threads, b):
    """Both parallel strategies (over samples; over pixel chunks of one sample) give the same answer."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert_matches_torchvision(backend, make_problem(b=b, c_in=16, c_out=8, h=23, w=41, og=4))
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", [0.0, 1.0, -1.0])
def test_integer_offsets_border_convention(backend, value):
    """At integer sample points (every point at DCNPack's initialisation) the offset
    gradient is torchvision's one-sided difference, non-zero on the padding border."""
    p = problem(backend, padding=(1, 1), h=5, w=6)
    p["offset"] = torch.full_like(p["offset"], value)
    _, _, grads_tv = forward_and_grads(torchvision_fn, p)
    assert grads_tv["offset"].abs().sum() > 0  # the border rows/cols sample y = -1 or x = -1
    assert_matches_torchvision(backend, p)


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_integer_offsets(backend):
    p = problem(backend, c_in=4, c_out=5, og=2, h=5, w=6)
    gen = torch.Generator().manual_seed(5)
    p["offset"] = torch.randint(-3, 4, p["offset"].shape, generator=gen).to(p["offset"])
    assert_matches_torchvision(backend, p)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("edge", [-1.0, -0.5, 0.0, 4.0, 4.5, 5.0])
def test_points_on_and_near_the_image_edge(backend, edge):
    """Points at exactly -1, h-1, h and between: all four gradient rules at their boundaries."""
    p = problem(backend, b=1, c_in=2, c_out=2, h=5, w=5, k=(1, 1), padding=(0, 0), og=1)
    off = torch.zeros_like(p["offset"])
    ys = torch.arange(5, dtype=off.dtype, device=off.device).view(5, 1)
    xs = torch.arange(5, dtype=off.dtype, device=off.device).view(1, 5)
    off[0, 0] = edge - ys  # every point lands on row `edge` (dy) and column `edge` (dx)
    off[0, 1] = edge - xs
    p["offset"] = off
    assert_matches_torchvision(backend, p, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_points_exactly_on_and_around_the_borders(backend, dtype):
    h, w = 4, 5
    p = problem(backend, b=2, c_in=4, c_out=3, h=h, w=w, og=2, dtype=dtype)
    e = 2.0 ** -8
    ys = torch.tensor([-2.0, -1 - e, -1.0, -1 + e, -0.5, 0.0, 1.0, h - 1.0, h - 1 + e, h - e, h, h + e, 2.5])
    xs = torch.tensor([-2.0, -1 - e, -1.0, -1 + e, -0.5, 0.0, 2.0, w - 1.0, w - 1 + e, w - e, w, w + e, 1.5])
    b, c2, ho, wo = p["offset"].shape
    gen = torch.Generator().manual_seed(3)
    ty = ys[torch.randint(len(ys), (b, c2 // 2, ho, wo), generator=gen)]
    tx = xs[torch.randint(len(xs), (b, c2 // 2, ho, wo), generator=gen)]
    tap = torch.arange(c2 // 2) % 9
    base_y = torch.arange(ho).view(1, 1, ho, 1) - 1 + (tap // 3).view(1, -1, 1, 1)  # stride 1, padding 1
    base_x = torch.arange(wo).view(1, 1, 1, wo) - 1 + (tap % 3).view(1, -1, 1, 1)
    new = torch.empty(b, c2, ho, wo, dtype=torch.float64)
    new[:, 0::2] = ty - base_y
    new[:, 1::2] = tx - base_x
    p["offset"] = new.to(p["offset"])
    assert_matches_torchvision(backend, p)


@pytest.mark.parametrize("backend", BACKENDS)
def test_offsets_far_outside(backend):
    p = problem(backend)
    p["offset"] = p["offset"].sign() * 50.0 + p["offset"]
    assert_matches_torchvision(backend, p)
    p["offset"] = torch.full_like(p["offset"], 1e7)
    out, _, grads = forward_and_grads(run_backend(backend), p)
    # Nothing sampled: output is the bias only, no gradient reaches input or offset.
    torch.testing.assert_close(out, p["bias"].view(1, -1, 1, 1).expand_as(out))
    assert grads["input"].abs().max() == 0 and grads["offset"].abs().max() == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_and_infinite_offsets(backend):
    # +-50, +-1e6 and +-inf: the points read nothing and get no gradient.  torchvision gives NaN
    # offset gradients for infinite offsets, so only its finite entries are compared.
    p = problem(backend, c_in=4, c_out=5, og=2, h=5, w=6)
    gen = torch.Generator().manual_seed(7)
    off = p["offset"].cpu()
    far = torch.tensor([50.0, -50.0, 1e6, -1e6, float("inf"), float("-inf")], dtype=off.dtype)
    choice = far[torch.randint(len(far), off.shape, generator=gen)]
    p["offset"] = torch.where(torch.rand(off.shape, generator=gen) < 0.4, choice, off).to(p["input"].device)
    assert_matches_torchvision(backend, p, finite_only=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_nan_offsets_behave_as_points_far_outside(backend, dtype):
    # NaN points must not read or write out of bounds.  (torchvision itself reads out of bounds for NaN
    # offsets, so its answer is taken for 1e6 instead.)
    p = problem(backend, c_in=4, c_out=5, og=2, h=5, w=6, dtype=dtype)
    nan_at = (torch.rand(p["offset"].shape, generator=torch.Generator().manual_seed(11)) < 0.3).to(p["offset"].device)
    far = dict(p, offset=torch.where(nan_at, torch.full_like(p["offset"], 1e6), p["offset"]))
    out_tv, g, grads_tv = forward_and_grads(torchvision_fn, far)
    nan = dict(p, offset=torch.where(nan_at, torch.full_like(p["offset"], float("nan")), p["offset"]))
    out, _, grads = forward_and_grads(run_backend(backend), nan, grad_output=g)
    torch.testing.assert_close(out, out_tv, **_tol(dtype))
    for k in grads_tv:
        assert torch.isfinite(grads[k]).all(), k
        torch.testing.assert_close(grads[k], grads_tv[k], **_tol(dtype))


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    p = problem(backend, b=2, c_in=8, c_out=6, og=2, h=6, w=7)
    # Same values, strange strides: transposed storage, channels_last and sliced views.
    p["input"] = p["input"].transpose(2, 3).contiguous().transpose(2, 3)
    p["offset"] = torch.cat([p["offset"], p["offset"]], dim=1)[:, ::2].contiguous().repeat_interleave(1, 1)
    p["offset"] = p["offset"].contiguous(memory_format=torch.channels_last)
    p["weight"] = torch.cat([p["weight"], p["weight"]], dim=0)[::2]
    p["mask"] = p["mask"].permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3)
    assert not p["input"].is_contiguous() and not p["weight"].is_contiguous() and not p["mask"].is_contiguous()
    assert_matches_torchvision(backend, p)


@pytest.mark.parametrize("backend", BACKENDS)
def test_channels_last_input(backend):
    p = problem(backend, c_in=4, c_out=5)
    p["input"] = p["input"].to(memory_format=torch.channels_last)
    assert_matches_torchvision(backend, p)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_mask", [True, False])
def test_empty_batch(backend, with_mask):
    p = problem(backend, b=0, with_mask=with_mask, dtype=torch.float32)
    out, _, grads = forward_and_grads(run_backend(backend), p)
    assert out.shape == (0, 6, 7, 9) and out.dtype == torch.float32
    assert grads["input"].shape == p["input"].shape and grads["offset"].shape == p["offset"].shape
    assert grads["weight"].abs().max() == 0 and grads["bias"].abs().max() == 0
    if with_mask:
        assert grads["mask"].shape == p["mask"].shape


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_one_non_finite_point_leaves_the_others_alone(backend, bad):
    p = problem(backend, b=1, c_in=2, c_out=2, og=1, k=(1, 1), padding=(0, 0), h=4, w=4)
    p["offset"][0, :, 1, 2] = bad  # one output pixel's sample point is non-finite
    out, _, _ = forward_and_grads(run_backend(backend), p)
    good = torch.ones(4, 4, dtype=torch.bool)
    good[1, 2] = False
    clean = dict(p, offset=p["offset"].clone())
    clean["offset"][0, :, 1, 2] = 0.0
    out_tv, _, _ = forward_and_grads(torchvision_fn, clean)
    torch.testing.assert_close(out[..., good], out_tv[..., good])


# --------------------------------------------------------------------------- gradcheck, opcheck, compile


@pytest.mark.parametrize("with_mask", [True, False])
def test_gradcheck_native(with_mask):
    # (The Triton kernels' float64 gradients are checked against torchvision's above: gradcheck's many
    # forward passes would take minutes under the interpreter.)
    p = make_problem(b=2, c_in=4, c_out=2, h=4, w=5, og=2, with_mask=with_mask, offset_scale=0.7)
    names = [k for k in TENSOR_ARGS if p[k] is not None]

    def fn(*tensors):
        with use_backend("native"):
            return modulated_deform_conv2d(**dict(p, **dict(zip(names, tensors))))

    inputs = tuple(p[k].clone().requires_grad_(True) for k in names)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6)


def _op_args(p):
    return (p["input"], p["offset"], p["weight"], p["bias"], p["mask"], list(p["stride"]), list(p["padding"]),
            list(p["dilation"]))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the op's CUDA kernels (Triton) need a CUDA GPU"))])
@pytest.mark.parametrize("with_mask", [True, False])
def test_opcheck(device, with_mask):
    dtype = torch.float64 if device == "cpu" else torch.float32
    p = make_problem(b=2, c_in=4, c_out=2, h=4, w=5, og=2, with_mask=with_mask, dtype=dtype, device=device)
    for k in TENSOR_ARGS:
        if p[k] is not None:
            p[k].requires_grad_(True)
    torch.library.opcheck(torch.ops.megan_fast.modulated_deform_conv2d.default, _op_args(p))
    g = torch.randn(2, 2, 4, 5, dtype=dtype, device=device)
    bwd_args = (g, p["input"].detach(), p["offset"].detach(), p["weight"].detach(),
                None if p["mask"] is None else p["mask"].detach(), [1, 1], [1, 1], [1, 1])
    torch.library.opcheck(torch.ops.megan_fast.modulated_deform_conv2d_backward.default, bwd_args)


def test_op_called_directly_matches_public_function():
    p = make_problem()
    direct = torch.ops.megan_fast.modulated_deform_conv2d(*_op_args(p))
    torch.testing.assert_close(direct, torchvision_fn(**p), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_torch_compile_fullgraph_with_the_backend_chosen_inside(backend):
    # use_backend is traced (a context variable): the choice may sit inside the compiled function.
    p = make_problem(dtype=torch.float32)

    def f(*a):
        with use_backend(backend):
            return modulated_deform_conv2d(a[0], a[1], a[2], a[3], 1, 1, 1, a[4]).relu().sum()

    args = [p[k].clone().requires_grad_(True) for k in TENSOR_ARGS]
    y = torch.compile(f, fullgraph=True, backend="aot_eager")(*args)
    grads = torch.autograd.grad(y, args)
    args2 = [p[k].clone().requires_grad_(True) for k in TENSOR_ARGS]
    y2 = f(*args2)
    grads2 = torch.autograd.grad(y2, args2)
    torch.testing.assert_close(y, y2, atol=1e-4, rtol=1e-5)
    for a, b in zip(grads, grads2):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)


# --------------------------------------------------------------------------- the Triton launchers


@pytest.mark.parametrize("case, direct", [("basic", True), ("groups2", False), ("cpo32", False)])
def test_triton_backward_is_one_sampling_pass(monkeypatch, case, direct):
    # Offset / mask gradients are stored when a chunk is a whole offset group, accumulated otherwise.
    require_triton()
    from megan_fast.triton import deform_conv as tdc

    names = launched_kernels(monkeypatch, tdc)
    p = problem("triton", **CASES[case])
    geo = tdc._geometry(p["input"], p["offset"], p["weight"], p["stride"], p["padding"], p["dilation"])
    assert (geo["chunk_base"] == geo["Cpo"] <= 16) == direct
    assert_matches_torchvision("triton", p)
    assert names == ["_dcn_fwd_kernel", "_dcn_bwd_one_pass_kernel"]


def test_triton_groups_wider_than_one_register_tile_take_two_passes(monkeypatch):
    # 136 output channels in one group (> 128): the wide-groups path, forward and every gradient.
    require_triton()
    from megan_fast.triton import deform_conv as tdc

    names = launched_kernels(monkeypatch, tdc)
    p = problem("triton", b=1, c_in=2, c_out=136, h=2, w=3, og=1)
    assert_matches_torchvision("triton", p)
    assert names == ["_dcn_fwd_kernel", "_dcn_bwd_wide_inputs_kernel", "_dcn_bwd_wide_weight_kernel"]


def test_triton_int64_addressing(monkeypatch):
    # Inputs over 2**30 elements switch the kernels to 64-bit batch addressing; force it here.
    require_triton()
    from megan_fast.triton import deform_conv as tdc

    monkeypatch.setattr(tdc, "numel_needs_int64", lambda *tensors: True)
    assert_matches_torchvision("triton", problem("triton", c_in=4, c_out=5, og=2, h=5, w=6))


# --------------------------------------------------------------------------- CUDA only (fp16 / bf16)

cuda_only = pytest.mark.skipif(TRITON_DEVICE != "cuda", reason="needs a CUDA GPU (fp16/bf16 and GPU-sized problems)")


def _max_err(a, b):
    return (a.float() - b.float()).abs().max().item()


def _triton_and_reference(case, dtype):
    """(ours in dtype, torchvision in dtype or None for bf16, torchvision in float32) on the same data."""
    low = make_problem(**case, dtype=dtype, offset_scale=3.0, device="cuda")
    high = {k: (v.float() if isinstance(v, torch.Tensor) else v) for k, v in low.items()}
    ref = forward_and_grads(torchvision_fn, high)
    go = ref[1].to(dtype)
    ours = forward_and_grads(run_backend("triton"), low, grad_output=go)
    tv = forward_and_grads(torchvision_fn, low, grad_output=go) if dtype != torch.bfloat16 else None
    return ours, tv, ref


@cuda_only
def test_fp32_cuda_gpu_sized():
    p = make_problem(b=2, c_in=64, c_out=64, h=24, w=20, og=8, dtype=torch.float32, offset_scale=3.0, device="cuda")
    out_tv, g, grads_tv = forward_and_grads(torchvision_fn, p)
    out, _, grads = forward_and_grads(run_backend("triton"), p, grad_output=g)
    for name, a, e in [("output", out, out_tv)] + [(k, grads[k], grads_tv[k]) for k in grads_tv]:
        assert _max_err(a, e) <= 1e-4 * (e.abs().max().item() + 1e-6) + 1e-5, name


@cuda_only
@pytest.mark.parametrize("case", [
    dict(b=2, c_in=64, c_out=64, h=24, w=20, og=8),
    dict(b=1, c_in=32, c_out=48, h=16, w=16, og=1, groups=2, stride=(2, 2)),
    dict(b=2, c_in=6, c_out=4, h=9, w=11, og=2, groups=2, with_mask=False),
])
def test_fp16_cuda_within_2x_torchvisions_error(case):
    (out, _, grads), (tv_out, _, tv_grads), (ref_out, _, ref_grads) = _triton_and_reference(case, torch.float16)
    for name, a, t, e in [("output", out, tv_out, ref_out)] + [(k, grads[k], tv_grads[k], ref_grads[k])
                                                              for k in ref_grads]:
        assert a.dtype == torch.float16, name
        assert _max_err(a, e) <= 2 * _max_err(t, e) + 1e-3 * (e.abs().max().item() + 1e-6), name


@cuda_only
@pytest.mark.parametrize("case", [dict(b=2, c_in=64, c_out=64, h=24, w=20, og=8),
                                  dict(b=2, c_in=6, c_out=4, h=9, w=11, og=2, groups=2, with_mask=False)])
def test_bf16_cuda_close_to_fp32(case):
    # torchvision has no bf16 kernels: compare with its fp32 result on the same (bf16-rounded) data.
    (out, _, grads), _, (ref_out, _, ref_grads) = _triton_and_reference(case, torch.bfloat16)
    for name, a, e in [("output", out, ref_out)] + [(k, grads[k], ref_grads[k]) for k in ref_grads]:
        assert a.dtype == torch.bfloat16, name
        # bf16 has 8 mantissa bits (eps 2^-8 ~ 4e-3): allow a few roundings of the largest value.
        assert _max_err(a, e) <= 3e-2 * (e.abs().max().item() + 1e-6), name


# --------------------------------------------------------------------------- errors and backends


def _err(match, **changes):
    p = make_problem(dtype=torch.float32)
    p.update(changes)
    with pytest.raises((ValueError, TypeError), match=match):
        modulated_deform_conv2d(**p)


def test_error_messages_name_the_argument():
    p = make_problem(dtype=torch.float32)
    _err(r"input must be 4-D", input=p["input"][0])
    _err(r"offset must be 4-D", offset=p["offset"][0])
    _err(r"weight must be 4-D", weight=p["weight"][0])
    _err(r"input has 4 channels, not a multiple of weight.shape\[1\] = 3", weight=torch.randn(6, 3, 3, 3))
    _err(r"weight.shape\[0\] = 5 must be divisible by groups = 2", weight=torch.randn(5, 2, 3, 3))
    _err(r"offset must have 2\*offset_groups\*kh\*kw channels", offset=torch.randn(2, 17, 7, 9))
    _err(r"offset groups 3", offset=torch.randn(2, 54, 7, 9), mask=None)
    _err(r"offset must have shape \(2, 36, 7, 9\)", offset=torch.randn(2, 36, 6, 9))
    _err(r"offset must have shape \(2, 36, 7, 9\)", offset=torch.randn(3, 36, 7, 9))
    _err(r"mask must have shape \(2, 18, 7, 9\)", mask=torch.rand(2, 9, 7, 9))
    _err(r"bias must have shape \(6,\)", bias=torch.randn(5))
    _err(r"offset has dtype torch.float64 but input has torch.float32", offset=p["offset"].double())
    _err(r"input dtype torch.float16 is not supported on cpu", input=p["input"].half(),
         offset=p["offset"].half(), weight=p["weight"].half(), bias=p["bias"].half(), mask=p["mask"].half())
    _err(r"input must be a floating-point tensor", input=p["input"].long())
    _err(r"expected stride >= 1", stride=0)
    _err(r"stride must be an int or a pair of ints", stride=(1, 2, 3))
    _err(r"too small for a 3x3 kernel", input=torch.randn(2, 4, 1, 1), padding=0,
         offset=torch.randn(2, 36, 1, 1), mask=None)
    _err(r"mask must be a Tensor or None", mask=[1.0])
    _err(r"offset is on meta but input is on cpu", offset=p["offset"].to("meta"))


def test_backend_selection_and_restore():
    before = _backend.get_backend()
    assert before in _backend.BACKENDS
    with use_backend("reference"):
        assert _backend.get_backend() == "reference"
        assert _backend.impl("modulated_deform_conv2d", "cpu") is \
            megan_fast.reference.modulated_deform_conv2d_reference
    assert _backend.get_backend() == before
    with pytest.raises(ValueError, match="unknown backend 'fastest'"):
        with use_backend("fastest"):
            pass
    assert _backend.get_backend() == before


def test_use_backend_is_the_calling_threads_own():
    import threading

    seen, ready, done = {}, threading.Barrier(2), threading.Event()

    def other():
        ready.wait()  # the main thread is inside its use_backend block now
        seen["other"] = _backend.get_backend()
        done.set()

    t = threading.Thread(target=other)
    t.start()
    with use_backend("reference"):
        ready.wait()
        done.wait(10)
        seen["main"] = _backend.get_backend()
    t.join()
    assert seen == {"main": "reference", "other": _backend.get_backend()}


def test_backend_from_environment():
    import os
    import subprocess
    import sys

    code = "from megan_fast.ops import get_backend; print(get_backend())"
    env = dict(os.environ, MEGAN_FAST_BACKEND="reference")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "reference"
    env["MEGAN_FAST_BACKEND"] = "bogus"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "MEGAN_FAST_BACKEND: unknown backend 'bogus'" in bad.stderr


def test_stock_backend_is_torchvision_and_runs_bfloat16_in_float32():
    p = make_problem()
    with use_backend("stock"):
        out = modulated_deform_conv2d(**p)
    torch.testing.assert_close(out, torchvision_fn(**p), atol=0, rtol=0)
    # (bfloat16 is a GPU dtype of the public op; the peer's function itself is what auto runs there)
    from megan_fast.ops import deform_conv as mod

    low = {k: (v.bfloat16() if isinstance(v, torch.Tensor) else v) for k, v in p.items()}
    out = mod._stock(**low)
    high = {k: (v.float() if isinstance(v, torch.Tensor) else v) for k, v in low.items()}
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, torchvision_fn(**high).bfloat16(), atol=0, rtol=0)


def test_cuda_auto_runs_the_peer_until_the_kernels_ran_on_a_gpu(monkeypatch):
    import importlib

    mod = importlib.import_module("megan_fast.ops.deform_conv")
    # The measured rule (H100): torchvision for float32/float16, ours for bfloat16 ...
    for dtype, want in [(torch.bfloat16, "triton"), (torch.float16, "stock"), (torch.float32, "stock")]:
        x = torch.empty(1, 2, 3, 3, dtype=dtype, device="meta")
        assert mod._cuda_pick(x, None, None, None, 1, 1, 1, None) == want
    # ... is what auto runs once both passes are GPU-verified; until then the peer.
    assert not _backend.gpu_verified("modulated_deform_conv2d")
    assert mod.FUSED.cuda_auto("triton") == "stock"
    monkeypatch.setitem(_backend.GPU_VERIFIED, "modulated_deform_conv2d", {"forward": True, "backward": True})
    monkeypatch.setattr(_backend, "triton_status", lambda device_type: None)
    assert mod.FUSED.cuda_auto("triton") == ("triton" if mod.FUSED.triton_error is None else "stock")
