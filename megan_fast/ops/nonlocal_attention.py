"""Dot-product non-local attention with O(n + m) memory: public function,
checks, fake kernels, autograd and backend wiring.

Kernels: csrc/cpu/nonlocal_attention.cpp (C++), megan_fast/triton/nonlocal_attention.py.
Both compute the forward with an online softmax that never stores the n x m
matrix and save the row log-sum-exp; the backward recomputes the matrix block
by block from it:
    P = exp(scale q k^T - lse),  D = rowsum(dO * O)
    dV = P^T dO,  dS = P * (dO V^T - D),  dQ = scale dS K,  dK = scale dS^T Q
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from megan_fast.ops import _backend, _library
from megan_fast.reference.nonlocal_attention import nonlocal_attention_reference

__all__ = ["nonlocal_attention"]

OP = "nonlocal_attention"
_FWD_SCHEMA = "(Tensor q, Tensor k, Tensor v, float scale) -> (Tensor, Tensor)"
_BWD_SCHEMA = (
    "(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, float scale) -> (Tensor, Tensor, Tensor)"
)
_CPU_DTYPES = (torch.float32, torch.float64)
_GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check(q, k, v, scale) -> None:
    fn = "nonlocal_attention"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{fn}: {name} must be a Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"{fn}: {name} must be 3-D ({'b, n, d' if name == 'q' else 'b, m, d' if name == 'k' else 'b, m, dv'}), got shape {tuple(t.shape)}")
    _library.check_dtype(fn, "q", q, _CPU_DTYPES, _GPU_DTYPES)
    for name, t in (("k", k), ("v", v)):
        if t.device != q.device:
            raise ValueError(f"{fn}: {name} is on {t.device} but q is on {q.device}; expected the same device")
        if t.dtype != q.dtype:
            raise TypeError(f"{fn}: {name} has dtype {t.dtype} but q has {q.dtype}; expected the same dtype")
    b, n, d = q.shape
    if k.shape[0] != b or k.shape[2] != d:
        raise ValueError(f"{fn}: k must have shape ({b}, m, {d}) to match q {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape[0] != b or v.shape[1] != k.shape[1]:
        raise ValueError(
            f"{fn}: v must have shape ({b}, {k.shape[1]}, dv) to match k {tuple(k.shape)}, got {tuple(v.shape)}"
        )
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise TypeError(f"{fn}: scale must be a Python float, got {type(scale).__name__}")


# --------------------------------------------------------------------------- ops


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fake_forward(q, k, v, scale):
    b, n, _ = q.shape
    return q.new_empty(b, n, v.shape[2]), q.new_empty(b, n, dtype=_lse_dtype(q.dtype))


def _fake_backward(grad_out, q, k, v, out, lse, scale):
    # Contiguous, as both kernels return them (also for transposed q, k, v: torch.compile checks these strides).
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


def _make_autograd(backward_op):
    def setup_context(ctx, inputs, output):
        q, k, v, scale = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
        ctx.mark_non_differentiable(lse)

    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        grad_q, grad_k, grad_v = backward_op(grad_out, q, k, v, out, lse, ctx.scale)
        return grad_q, grad_k, grad_v, None

    return setup_context, backward


FUSED = _library.register_fused_op(
    OP, _FWD_SCHEMA, _BWD_SCHEMA, _fake_forward, _fake_backward, _make_autograd,
    triton=("nonlocal_attention", "nonlocal_attention_forward", "nonlocal_attention_backward"),
)


# --------------------------------------------------------------------------- backends


def _native(q, k, v, scale):
    """The op: C++ on CPU tensors, Triton on CUDA tensors."""
    return FUSED.op(q, k, v, scale)[0]


def _triton_cpu(q, k, v, scale):
    return FUSED.cpu_triton(q, k, v, scale)[0]


def _stock(q, k, v, scale):
    # (b, 1, n, d): one head.  SDPA's flash / memory-efficient kernels need a unit
    # stride in the last dim (otherwise it falls back to the n x m math path):
    # transposed views such as a non-local block's are copied first.
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    return F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), scale=scale).squeeze(1)


# Forward-only problems at least this large (n * m) run the Triton kernel under
# ``auto`` on CUDA; smaller ones and anything needing gradients run SDPA.
CUDA_TRITON_MIN_NM = 1 << 22


def _cuda_pick(q, k, v, scale) -> str:
    # Measured on an H100 (docs/PERFORMANCE.md): the Triton forward is 1.09-1.10x SDPA's flash
    # kernel from n = m = 7,168 up (fp16/bf16) but 3.5x slower at 1,024, and SDPA's backward
    # is faster at every size measured.
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if not needs_grad and q.shape[1] * k.shape[1] >= CUDA_TRITON_MIN_NM and q.dtype != torch.float32:
        return "triton"
    return "stock"


_backend.register_op(
    OP,
    {"native": _native, "triton": {"cpu": _triton_cpu, "cuda": _native}, "reference": nonlocal_attention_reference,
     "stock": _stock},
    FUSED.availability(),
    {"cpu": FUSED.auto_cpu(),
     "cuda": FUSED.cuda_auto(_backend.PerCall(("triton", "stock"), _cuda_pick,
                                              "triton for forward-only fp16/bf16 with n*m >= 2**22; else SDPA (stock)"))},
)


# --------------------------------------------------------------------------- public


def nonlocal_attention(q: Tensor, k: Tensor, v: Tensor, scale: float = 1.0) -> Tensor:
    r"""Dot-product attention from every query to every key, without the n x m matrix.

    ``out = softmax(scale * q @ k^T, dim=-1) @ v``, computed with an online
    softmax (memory O((n + m) * d)); the backward recomputes the attention
    matrix block by block from the saved row log-sum-exp.

    Args:
        q: (b, n, d) queries.
        k: (b, m, d) keys.
        v: (b, m, dv) values.
        scale: logit scale (MEGAN's non-local blocks use 1.0).

    Returns:
        (b, n, dv), q's dtype and device.  Rows with no keys (m = 0) are zero.

    dtypes: float32/float64 on CPU; float32/float16/bfloat16 on GPU (float32
    accumulation).  Gradients flow to q, k and v.
    """
    if isinstance(q, Tensor):
        q, k, v = _library.autocast_cast(q, k, v)
    _check(q, k, v, scale)
    return _backend.impl(OP, q.device.type)(q, k, v, float(scale))
