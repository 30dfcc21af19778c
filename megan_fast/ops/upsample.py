"""x2 bilinear upsampling times a scale: public function, checks, fake kernels, autograd and backend wiring.

PCD alignment upsamples every coarser pyramid level x2 (the offsets then
doubled).  As one op the doubling is folded in (one kernel, not two), and the
backward gathers (csrc/cpu/upsample.cpp, megan_fast/triton/upsample.py): no
atomics, unlike the scatter of the stock CUDA backward.
"""

from __future__ import annotations

import torch
from torch import Tensor

from megan_fast.ops import _backend, _library
from megan_fast.reference.upsample import upsample_bilinear2x_reference

__all__ = ["upsample_bilinear2x"]

OP = "upsample_bilinear2x"
_FWD_SCHEMA = "(Tensor input, float scale) -> Tensor"
_BWD_SCHEMA = "(Tensor grad_output, float scale) -> Tensor"
_CPU_DTYPES = (torch.float32, torch.float64)
_GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check(input, scale) -> None:
    fn = "upsample_bilinear2x"
    if not isinstance(input, Tensor):
        raise TypeError(f"{fn}: input must be a Tensor, got {type(input).__name__}")
    if input.dim() != 4:
        raise ValueError(f"{fn}: input must be 4-D (n, c, h, w), got shape {tuple(input.shape)}")
    if input.shape[2] == 0 or input.shape[3] == 0:
        raise ValueError(f"{fn}: input must have h, w >= 1, got shape {tuple(input.shape)}")
    _library.check_dtype(fn, "input", input, _CPU_DTYPES, _GPU_DTYPES)
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise TypeError(f"{fn}: scale must be a Python float, got {type(scale).__name__}")


def _fake_forward(input, scale):
    n, c, h, w = input.shape
    return input.new_empty(n, c, 2 * h, 2 * w)


def _fake_backward(grad_output, scale):
    n, c, h2, w2 = grad_output.shape
    return grad_output.new_empty(n, c, h2 // 2, w2 // 2)


def _make_autograd(backward_op):
    def setup_context(ctx, inputs, output):
        ctx.scale = inputs[1]

    def backward(ctx, grad_output):
        return backward_op(grad_output, ctx.scale), None

    return setup_context, backward


FUSED = _library.register_fused_op(
    OP, _FWD_SCHEMA, _BWD_SCHEMA, _fake_forward, _fake_backward, _make_autograd,
    triton=("upsample", "upsample_bilinear2x_forward", "upsample_bilinear2x_backward"),
)

# The backward is linear in grad_output, its own gradient the forward: second-order gradients work.
torch.library.register_autograd(
    f"megan_fast::{OP}_backward", lambda ctx, gg: (FUSED.op(gg, ctx.scale), None),
    setup_context=lambda ctx, inputs, output: setattr(ctx, "scale", inputs[1]), lib=_library.LIB,
)

_backend.register_op(
    OP,
    {"native": FUSED.op, "triton": {"cpu": FUSED.cpu_triton, "cuda": FUSED.op},
     "reference": upsample_bilinear2x_reference, "stock": upsample_bilinear2x_reference},
    FUSED.availability(),
    # Measured on CPU: docs/PERFORMANCE.md; CUDA: the Triton kernels (no atomics in the backward).
    {"cpu": FUSED.auto_cpu(), "cuda": FUSED.cuda_auto("triton")},
)


def upsample_bilinear2x(input: Tensor, scale: float = 1.0) -> Tensor:
    r"""``scale * F.interpolate(input, scale_factor=2, mode="bilinear", align_corners=False)`` as one op.

    Args:
        input: (n, c, h, w), h, w >= 1.
        scale: factor applied to the result (PCD doubles upsampled offsets: 2).

    Returns:
        (n, c, 2h, 2w) in input's dtype; contiguous from the fused kernels (the stock op keeps channels-last).

    The gradient flows to input (also second-order); the backward gathers the
    at most 4 x 4 output gradients of each input pixel (no atomics,
    deterministic).  dtypes:
    float32/float64 on CPU; float32/float16/bfloat16 on GPU (float32 arithmetic).
    """
    if isinstance(input, Tensor):
        (input,) = _library.autocast_cast(input)
    _check(input, scale)
    return _backend.impl(OP, input.device.type)(input, float(scale))
