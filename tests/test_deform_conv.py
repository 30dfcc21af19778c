"""modulated_deform_conv2d against torchvision on forward and every gradient, per backend."""

from __future__ import annotations


import pytest
import torch

import megan_fast
from megan_fast.ops import modulated_deform_conv2d, use_backend
from megan_fast.ops import _backend

from _dcn_util import TENSOR_ARGS, forward_and_grads, make_problem, torchvision_fn

CPU_BACKENDS = ["native", "reference"]


def run_backend(backend):
    def fn(**kw):
        with use_backend(backend):
            return modulated_deform_conv2d(**kw)

    return fn


def assert_matches_torchvision(backend, problem, atol, rtol=0.0):
    out_tv, g, grads_tv = forward_and_grads(torchvision_fn, problem)
    out, _, grads = forward_and_grads(run_backend(backend), problem, grad_output=g)
    torch.testing.assert_close(out, out_tv, atol=atol, rtol=rtol, msg=lambda m: f"forward: {m}")
    assert grads.keys() == grads_tv.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], grads_tv[name], atol=atol, rtol=rtol, msg=lambda m: f"grad {name}: {m}")


CONFIGS = {
    "basic": dict(),
    "no-mask": dict(with_mask=False),
    "no-bias": dict(with_bias=False),
    "groups2": dict(c_in=4, c_out=6, groups=2, og=1),
    "og4": dict(c_in=8, og=4),
    "groups2-og4": dict(c_in=8, c_out=4, groups=2, og=4),
    "stride2": dict(stride=(2, 2)),
    "stride-2x1": dict(stride=(2, 1), h=8),
    "dilation2": dict(dilation=(2, 2), padding=(2, 2)),
    "pad0": dict(padding=(0, 0)),
    "pad2": dict(padding=(2, 1)),
    "k1x1": dict(k=(1, 1), padding=(0, 0)),
    "k3x2": dict(k=(3, 2), padding=(1, 0)),
    "k5x5": dict(k=(5, 5), padding=(2, 2), h=6, w=5),
    "batch1": dict(b=1),
    "batch3": dict(b=3, og=1),
    "tiny-image": dict(h=1, w=2, padding=(1, 1)),
    "large-offsets": dict(offset_scale=6.0),
}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_torchvision_float64(backend, name):
    assert_matches_torchvision(backend, make_problem(**CONFIGS[name]), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_matches_torchvision_float32_megan_shape(backend):
    # MEGAN's layout (64 channels, 8 offset groups), small spatial size.
    p = make_problem(b=2, c_in=64, c_out=64, h=10, w=13, og=8, dtype=torch.float32)
    assert_matches_torchvision(backend, p, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("b", [1, 2, 5])
def test_thread_partitioning(backend, threads, b):
    """Both parallel strategies (over samples; over pixel chunks of one sample) give the same answer."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        p = make_problem(b=b, c_in=16, c_out=8, h=23, w=41, og=4)
        assert_matches_torchvision(backend, p, atol=1e-10, rtol=1e-10)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("value", [0.0, 1.0, -1.0])
def test_integer_offsets_border_convention(backend, value):
    """At integer sample points (every point at DCNPack's initialisation) the offset
    gradient is torchvision's one-sided difference, non-zero on the padding border."""
    p = make_problem(padding=(1, 1), h=5, w=6)
    p["offset"] = torch.full_like(p["offset"], value)
    _, g, grads_tv = forward_and_grads(torchvision_fn, p)
    # The convention matters: the border rows/cols sample y = -1 or x = -1.
    assert grads_tv["offset"].abs().sum() > 0
    assert_matches_torchvision(backend, p, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("edge", [-1.0, -0.5, 0.0, 4.0, 4.5, 5.0])
def test_points_on_and_near_the_image_edge(backend, edge):
    """Points at exactly -1, h-1, h and between: all four gradient rules at their boundaries."""
    p = make_problem(b=1, c_in=2, c_out=2, h=5, w=5, k=(1, 1), padding=(0, 0), og=1)
    off = torch.zeros_like(p["offset"])
    # Move every point so that it lands on row `edge` (dy) and column `edge` (dx).
    ys = torch.arange(5, dtype=off.dtype).view(5, 1)
    xs = torch.arange(5, dtype=off.dtype).view(1, 5)
    off[0, 0] = edge - ys
    off[0, 1] = edge - xs
    p["offset"] = off
    assert_matches_torchvision(backend, p, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_offsets_far_outside(backend):
    p = make_problem()
    p["offset"] = p["offset"].sign() * 50.0 + p["offset"]
    assert_matches_torchvision(backend, p, atol=1e-10, rtol=1e-10)
    p["offset"] = torch.full_like(p["offset"], 1e7)
    out, _, grads = forward_and_grads(run_backend(backend), p)
    # Nothing sampled: output is the bias only, no gradient reaches input or offset.
    torch.testing.assert_close(out, p["bias"].view(1, -1, 1, 1).expand_as(out))
    assert grads["input"].abs().max() == 0 and grads["offset"].abs().max() == 0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_offsets_do_not_crash(backend, bad):
    p = make_problem(b=1, c_in=2, c_out=2, og=1, k=(1, 1), padding=(0, 0), h=4, w=4)
    p["offset"][0, :, 1, 2] = bad  # one output pixel's sample point is non-finite
    out, _, grads = forward_and_grads(run_backend(backend), p)
    good = torch.ones(4, 4, dtype=torch.bool)
    good[1, 2] = False
    # Every other pixel is unaffected and equals torchvision's result.
    clean = dict(p, offset=p["offset"].clone())
    clean["offset"][0, :, 1, 2] = 0.0
    out_tv, _, _ = forward_and_grads(torchvision_fn, clean)
    torch.testing.assert_close(out[..., good], out_tv[..., good])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_contiguous_inputs(backend):
    p = make_problem(b=2, c_in=8, c_out=6, og=2, h=6, w=7)
    # Same values, strange strides: transposed storage, channels_last and a sliced view.
    p["input"] = p["input"].transpose(2, 3).contiguous().transpose(2, 3)
    p["offset"] = p["offset"].contiguous(memory_format=torch.channels_last)
    p["weight"] = torch.cat([p["weight"], p["weight"]], dim=0)[::2]
    p["mask"] = p["mask"].permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3)
    assert not p["input"].is_contiguous() and not p["weight"].is_contiguous()
    assert_matches_torchvision(backend, p, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("with_mask", [True, False])
def test_empty_batch(backend, with_mask):
    p = make_problem(b=0, with_mask=with_mask)
    out, _, grads = forward_and_grads(run_backend(backend), p)
    assert out.shape == (0, 6, 7, 9)
    assert grads["input"].shape == p["input"].shape
    assert grads["weight"].abs().max() == 0
    assert grads["bias"].abs().max() == 0


@pytest.mark.parametrize("with_mask", [True, False])
def test_gradcheck_native(with_mask):
    p = make_problem(b=2, c_in=4, c_out=2, h=4, w=5, og=2, with_mask=with_mask, offset_scale=0.7)
    names = [k for k in TENSOR_ARGS if p[k] is not None]

    def fn(*tensors):
        kw = dict(p, **dict(zip(names, tensors)))
        with use_backend("native"):
            return modulated_deform_conv2d(**kw)

    inputs = tuple(p[k].clone().requires_grad_(True) for k in names)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6)


def _op_args(p):
    return (p["input"], p["offset"], p["weight"], p["bias"], p["mask"], list(p["stride"]), list(p["padding"]),
            list(p["dilation"]))


@pytest.mark.parametrize("with_mask", [True, False])
def test_opcheck_native(with_mask):
    p = make_problem(b=2, c_in=4, c_out=2, h=4, w=5, og=2, with_mask=with_mask, dtype=torch.float64)
    for k in TENSOR_ARGS:
        if p[k] is not None:
            p[k].requires_grad_(True)
    torch.library.opcheck(torch.ops.megan_fast.modulated_deform_conv2d.default, _op_args(p))
    g = torch.randn(2, 2, 4, 5, dtype=torch.float64)
    bwd_args = (g, p["input"].detach(), p["offset"].detach(), p["weight"].detach(),
                None if p["mask"] is None else p["mask"].detach(), [1, 1], [1, 1], [1, 1])
    torch.library.opcheck(torch.ops.megan_fast.modulated_deform_conv2d_backward.default, bwd_args)


def test_op_called_directly_matches_public_function():
    p = make_problem()
    direct = torch.ops.megan_fast.modulated_deform_conv2d(*_op_args(p))
    torch.testing.assert_close(direct, torchvision_fn(**p), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_torch_compile_fullgraph(backend):
    p = make_problem(dtype=torch.float32)

    def f(input, offset, weight, bias, mask):
        with use_backend(backend):
            return modulated_deform_conv2d(input, offset, weight, bias, 1, 1, 1, mask).relu().sum()

    # use_backend inside the compiled region is not traceable; choose it outside.
    with use_backend(backend):
        compiled = torch.compile(
            lambda *a: modulated_deform_conv2d(a[0], a[1], a[2], a[3], 1, 1, 1, a[4]).relu().sum(),
            fullgraph=True, backend="aot_eager",
        )
        args = [p[k].clone().requires_grad_(True) for k in TENSOR_ARGS]
        y = compiled(*args)
        grads = torch.autograd.grad(y, args)
    args2 = [p[k].clone().requires_grad_(True) for k in TENSOR_ARGS]
    y2 = f(*args2)
    grads2 = torch.autograd.grad(y2, args2)
    torch.testing.assert_close(y, y2, atol=1e-4, rtol=1e-5)
    for a, b in zip(grads, grads2):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)


# --------------------------------------------------------------------------- errors


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
    meta = p["offset"].to("meta")
    _err(r"offset is on meta but input is on cpu", offset=meta)


def test_backend_selection_and_restore():
    assert _backend.get_backend() in _backend.BACKENDS
    before = _backend.get_backend()
    with use_backend("reference"):
        assert _backend.get_backend() == "reference"
        assert _backend.impl("modulated_deform_conv2d", "cpu") is \
            megan_fast.reference.modulated_deform_conv2d_reference
    assert _backend.get_backend() == before
    with pytest.raises(ValueError, match="unknown backend 'fastest'"):
        with use_backend("fastest"):
            pass
    assert _backend.get_backend() == before


def test_backend_from_environment(tmp_path):
    import subprocess
    import sys

    code = "from megan_fast.ops import get_backend; print(get_backend())"
    env = dict(__import__("os").environ, MEGAN_FAST_BACKEND="reference")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "reference"
    env["MEGAN_FAST_BACKEND"] = "bogus"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "MEGAN_FAST_BACKEND: unknown backend 'bogus'" in bad.stderr


def test_stock_backend_is_torchvision():
    p = make_problem()
    with use_backend("stock"):
        out = modulated_deform_conv2d(**p)
    torch.testing.assert_close(out, torchvision_fn(**p), atol=0, rtol=0)


def test_triton_backend_on_cpu_requires_interpreter():
    # Under the test set-up the interpreter is on (no GPU): triton must be selectable on CPU tensors.
    reason = _backend.triton_status("cpu")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present; the Triton CPU path is only used without one")
    assert reason is None, reason
    p = make_problem(b=1, c_in=2, c_out=3, h=3, w=4, og=1)
    assert_matches_torchvision("triton", p, atol=1e-9, rtol=1e-9)


def test_cuda_auto_rule():
    # auto on CUDA (measured on an H100): torchvision for float32/float16, ours for bfloat16.
    import importlib

    mod = importlib.import_module("megan_fast.ops.deform_conv")
    for dtype, want in [(torch.bfloat16, "triton"), (torch.float16, "stock"), (torch.float32, "stock")]:
        x = torch.empty(1, 2, 3, 3, dtype=dtype, device="meta")
        assert mod._cuda_pick(x, None, None, None, 1, 1, 1, None) == want
