"""Modulated deformable convolution (DCNv2): public function, argument checks,
fake kernels, autograd and backend wiring.

Layers (as in flash-attention's interface file):
    kernels      csrc/cpu/deform_conv.cpp (C++, CPU), megan_fast/triton/deform_conv.py (Triton, CUDA)
    op           torch.ops.megan_fast.modulated_deform_conv2d[_backward]: one op, one kernel per
                 dispatch key, fake, autograd and autocast kernels (see _library.py)
    autograd     one formula; the backward calls the registered backward op only
    checks       here only (:func:`_check`); the launchers and kernels assert
    public       :func:`modulated_deform_conv2d`, a drop-in for torchvision.ops.deform_conv2d
"""

from __future__ import annotations

import torch
from torch import Tensor

from megan_fast.ops import _backend, _library
from megan_fast.reference.deform_conv import modulated_deform_conv2d_reference

__all__ = ["modulated_deform_conv2d"]

OP = "modulated_deform_conv2d"
_FWD_SCHEMA = (
    "(Tensor input, Tensor offset, Tensor weight, Tensor? bias, Tensor? mask, "
    "int[2] stride, int[2] padding, int[2] dilation) -> Tensor"
)
_BWD_SCHEMA = (
    "(Tensor grad_output, Tensor input, Tensor offset, Tensor weight, Tensor? mask, "
    "int[2] stride, int[2] padding, int[2] dilation) -> (Tensor, Tensor, Tensor, Tensor)"
)

_CPU_DTYPES = (torch.float32, torch.float64)
_GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# --------------------------------------------------------------------------- checks


def _pair(value, name: str) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return (int(value[0]), int(value[1]))
    raise TypeError(f"modulated_deform_conv2d: {name} must be an int or a pair of ints, got {value!r}")


def _out_size(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - (d * (k - 1) + 1)) // s + 1


def _check(input, offset, weight, bias, mask, stride, padding, dilation) -> None:
    """Raises an error naming the argument and the expected shape, dtype or device."""
    fn = "modulated_deform_conv2d"
    for name, t in (("input", input), ("offset", offset), ("weight", weight)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{fn}: {name} must be a Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{fn}: {name} must be 4-D, got shape {tuple(t.shape)}")
    if not input.is_floating_point():
        raise TypeError(f"{fn}: input must be a floating-point tensor, got {input.dtype}")
    _library.check_dtype(fn, "input", input, _CPU_DTYPES, _GPU_DTYPES)
    tensors = [("offset", offset), ("weight", weight), ("bias", bias), ("mask", mask)]
    for name, t in tensors:
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{fn}: {name} must be a Tensor or None, got {type(t).__name__}")
        if t.device != input.device:
            raise ValueError(f"{fn}: {name} is on {t.device} but input is on {input.device}; expected the same device")
        if t.dtype != input.dtype:
            raise TypeError(f"{fn}: {name} has dtype {t.dtype} but input has {input.dtype}; expected the same dtype")
    if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
        raise ValueError(
            f"{fn}: expected stride >= 1, dilation >= 1 and padding >= 0, got stride={stride}, "
            f"padding={padding}, dilation={dilation}"
        )
    b, c_in, h, w = input.shape
    c_out, cg, kh, kw = weight.shape
    if cg == 0 or kh == 0 or kw == 0 or c_out == 0:
        raise ValueError(f"{fn}: weight must have non-zero sizes (c_out, c_in/groups, kh, kw), got {tuple(weight.shape)}")
    if c_in % cg != 0:
        raise ValueError(
            f"{fn}: input has {c_in} channels, not a multiple of weight.shape[1] = {cg} "
            f"(weight is (c_out, c_in/groups, kh, kw))"
        )
    groups = c_in // cg
    if c_out % groups != 0:
        raise ValueError(f"{fn}: weight.shape[0] = {c_out} must be divisible by groups = {groups}")
    k2 = 2 * kh * kw
    if offset.shape[1] == 0 or offset.shape[1] % k2 != 0:
        raise ValueError(
            f"{fn}: offset must have 2*offset_groups*kh*kw channels (a positive multiple of {k2} for a "
            f"{kh}x{kw} kernel), got {offset.shape[1]}"
        )
    og = offset.shape[1] // k2
    if c_in % og != 0:
        raise ValueError(f"{fn}: input channels {c_in} must be divisible by the offset groups {og} (from offset)")
    h_out = _out_size(h, kh, stride[0], padding[0], dilation[0])
    w_out = _out_size(w, kw, stride[1], padding[1], dilation[1])
    if h_out <= 0 or w_out <= 0:
        raise ValueError(
            f"{fn}: input of size {h}x{w} is too small for a {kh}x{kw} kernel with padding={padding}, "
            f"dilation={dilation} (output would be {h_out}x{w_out})"
        )
    expected = (b, k2 * og, h_out, w_out)
    if tuple(offset.shape) != expected:
        raise ValueError(f"{fn}: offset must have shape {expected} (b, 2*og*kh*kw, h_out, w_out), got {tuple(offset.shape)}")
    if mask is not None:
        if mask.dim() != 4 or tuple(mask.shape) != (b, og * kh * kw, h_out, w_out):
            raise ValueError(
                f"{fn}: mask must have shape {(b, og * kh * kw, h_out, w_out)} (b, og*kh*kw, h_out, w_out), "
                f"got {tuple(mask.shape)}"
            )
    if bias is not None and tuple(bias.shape) != (c_out,):
        raise ValueError(f"{fn}: bias must have shape ({c_out},), got {tuple(bias.shape)}")


# --------------------------------------------------------------------------- ops


def _fake_forward(input, offset, weight, bias, mask, stride, padding, dilation):
    return input.new_empty(input.shape[0], weight.shape[0], offset.shape[2], offset.shape[3])


def _fake_backward(grad_output, input, offset, weight, mask, stride, padding, dilation):
    grad_mask = torch.empty_like(mask) if mask is not None else input.new_empty(0)
    return torch.empty_like(input), torch.empty_like(offset), torch.empty_like(weight), grad_mask


def _make_autograd(backward_op):
    def setup_context(ctx, inputs, output):
        input, offset, weight, bias, mask, stride, padding, dilation = inputs
        ctx.save_for_backward(input, offset, weight, mask)
        ctx.conv_args = (stride, padding, dilation)
        ctx.has_bias = bias is not None

    def backward(ctx, grad_output):
        input, offset, weight, mask = ctx.saved_tensors
        stride, padding, dilation = ctx.conv_args
        grad_input, grad_offset, grad_weight, grad_mask = backward_op(
            grad_output, input, offset, weight, mask, stride, padding, dilation
        )
        grad_bias = grad_output.sum((0, 2, 3)) if ctx.has_bias else None
        return grad_input, grad_offset, grad_weight, grad_bias, grad_mask if mask is not None else None, None, None, None

    return setup_context, backward


FUSED = _library.register_fused_op(
    OP, _FWD_SCHEMA, _BWD_SCHEMA, _fake_forward, _fake_backward, _make_autograd,
    triton=("deform_conv", "deform_conv2d_forward", "deform_conv2d_backward"),
)


# --------------------------------------------------------------------------- backends


def _native(input, offset, weight, bias, stride, padding, dilation, mask):
    """The op: C++ on CPU tensors, Triton on CUDA tensors."""
    return FUSED.op(input, offset, weight, bias, mask, stride, padding, dilation)


def _triton_cpu(input, offset, weight, bias, stride, padding, dilation, mask):
    return FUSED.cpu_triton(input, offset, weight, bias, mask, stride, padding, dilation)


def _stock(input, offset, weight, bias, stride, padding, dilation, mask):
    import torchvision.ops

    if input.dtype == torch.bfloat16:
        # torchvision has no bfloat16 kernels: its own autocast runs them in float32, and so does its peer here.
        args = [t.float() if t is not None else None for t in (input, offset, weight, bias, mask)]
        out = torchvision.ops.deform_conv2d(args[0], args[1], args[2], args[3], stride, padding, dilation, args[4])
        return out.to(torch.bfloat16)
    return torchvision.ops.deform_conv2d(input, offset, weight, bias, stride, padding, dilation, mask)


def _cuda_pick(input, *args) -> str:
    # Measured on an H100 (docs/PERFORMANCE.md): torchvision's CUDA kernels are faster
    # than ours at MEGAN's training shape and in the forward pass; it has no bfloat16
    # kernels (its autocast runs them in float32), so bfloat16 runs ours.
    return "triton" if input.dtype == torch.bfloat16 else "stock"


_backend.register_op(
    OP,
    {
        "native": _native,
        "triton": {"cpu": _triton_cpu, "cuda": _native},
        "reference": modulated_deform_conv2d_reference,
        "stock": _stock,
    },
    FUSED.availability(),
    {"cpu": FUSED.auto_cpu(),
     "cuda": FUSED.cuda_auto(_backend.PerCall(("triton", "stock"), _cuda_pick,
                                              "bfloat16: triton; else torchvision (stock)"))},
)


# --------------------------------------------------------------------------- public


def modulated_deform_conv2d(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    mask: Tensor | None = None,
) -> Tensor:
    r"""Modulated deformable 2-D convolution (DCNv2), a drop-in for ``torchvision.ops.deform_conv2d``.

    Same argument order, offset layout and numerics as torchvision: for output
    pixel (y, x), offset group g and kernel tap k = i*kw + j, the input is
    sampled bilinearly (zero outside the image) at
    ``(y*stride_h - pad_h + i*dil_h + offset[:, 2*(g*kh*kw+k)],  x*stride_w - pad_w + j*dil_w + offset[:, 2*(g*kh*kw+k)+1])``,
    multiplied by ``mask[:, g*kh*kw+k]`` and convolved with ``weight``.

    Args:
        input: (b, c_in, h, w).
        offset: (b, 2*offset_groups*kh*kw, h_out, w_out); offset_groups must divide c_in.
        weight: (c_out, c_in/groups, kh, kw); groups = c_in / weight.shape[1].
        bias: (c_out,) or None.
        stride, padding, dilation: int or (h, w) pair.
        mask: (b, offset_groups*kh*kw, h_out, w_out) or None (all ones).

    Returns:
        (b, c_out, h_out, w_out), same dtype and device as ``input``.

    dtypes: float32/float64 on CPU; float32/float16/bfloat16 on GPU (float32
    accumulation).  Gradients flow to input, offset, weight, bias and mask.
    The backend (see :func:`megan_fast.ops.use_backend`) picks the kernel.
    """
    stride = _pair(stride, "stride")
    padding = _pair(padding, "padding")
    dilation = _pair(dilation, "dilation")
    if isinstance(input, Tensor):
        input, offset, weight, bias, mask = _library.autocast_cast(input, offset, weight, bias, mask)
    _check(input, offset, weight, bias, mask, stride, padding, dilation)
    fn = _backend.impl(OP, input.device.type)
    return fn(input, offset, weight, bias, stride, padding, dilation, mask)
