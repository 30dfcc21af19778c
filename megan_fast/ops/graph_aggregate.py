"""LMGA graph aggregation: public function, checks, fake kernels, autograd and backend wiring.

Kernels: csrc/cpu/graph_aggregate.cpp (C++), megan_fast/triton/graph_aggregate.py.
Both work per pixel in registers: the (b, p, p, c, h, w) differences and the
(b, p, p, hd, h, w) hidden layer of the plain formula are never stored, and
the MLP runs once per unordered pair (its input |E_p - E_q| is symmetric).
The backward recomputes the scores and the adjacency.
"""

from __future__ import annotations

import torch
from torch import Tensor

from megan_fast.ops import _backend, _library
from megan_fast.reference.graph_aggregate import graph_aggregate_reference

__all__ = ["graph_aggregate"]

OP = "graph_aggregate"
_FWD_SCHEMA = (
    "(Tensor nodes, Tensor w1, Tensor b1, Tensor w2, float negative_slope, bool return_adjacency) -> (Tensor, Tensor)"
)
_BWD_SCHEMA = (
    "(Tensor grad_out, Tensor nodes, Tensor w1, Tensor b1, Tensor w2, float negative_slope) "
    "-> (Tensor, Tensor, Tensor, Tensor)"
)
_CPU_DTYPES = (torch.float32, torch.float64)
_GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check(nodes, w1, b1, w2, negative_slope) -> None:
    fn = "graph_aggregate"
    for name, t in (("nodes", nodes), ("w1", w1), ("b1", b1), ("w2", w2)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{fn}: {name} must be a Tensor, got {type(t).__name__}")
    if nodes.dim() != 5:
        raise ValueError(f"{fn}: nodes must be 5-D (b, p, c, h, w), got shape {tuple(nodes.shape)}")
    b, p, c, h, w = nodes.shape
    if p < 2:
        raise ValueError(f"{fn}: nodes must have p >= 2 nodes (dim 1) to form a graph, got p = {p}")
    _library.check_dtype(fn, "nodes", nodes, _CPU_DTYPES, _GPU_DTYPES)
    if w1.dim() != 2 or w1.shape[1] != c or w1.shape[0] == 0:
        raise ValueError(f"{fn}: w1 must have shape (hd, {c}) with hd >= 1 (c from nodes), got {tuple(w1.shape)}")
    hd = w1.shape[0]
    if tuple(b1.shape) != (hd,):
        raise ValueError(f"{fn}: b1 must have shape ({hd},) (hd from w1), got {tuple(b1.shape)}")
    if tuple(w2.shape) != (hd,):
        raise ValueError(f"{fn}: w2 must have shape ({hd},) (hd from w1), got {tuple(w2.shape)}")
    for name, t in (("w1", w1), ("b1", b1), ("w2", w2)):
        if t.device != nodes.device:
            raise ValueError(f"{fn}: {name} is on {t.device} but nodes is on {nodes.device}; expected the same device")
        if t.dtype != nodes.dtype:
            raise TypeError(f"{fn}: {name} has dtype {t.dtype} but nodes has {nodes.dtype}; expected the same dtype")
    if not isinstance(negative_slope, (int, float)) or isinstance(negative_slope, bool):
        raise TypeError(f"{fn}: negative_slope must be a Python float, got {type(negative_slope).__name__}")


# --------------------------------------------------------------------------- ops


def _fake_forward(nodes, w1, b1, w2, negative_slope, return_adjacency):
    b, p, c, h, w = nodes.shape
    adjacency = nodes.new_empty(b, p, p, h, w) if return_adjacency else nodes.new_empty(0)
    return torch.empty_like(nodes, memory_format=torch.contiguous_format), adjacency


def _fake_backward(grad_out, nodes, w1, b1, w2, negative_slope):
    return (
        torch.empty_like(nodes, memory_format=torch.contiguous_format),
        torch.empty_like(w1, memory_format=torch.contiguous_format),
        torch.empty_like(b1, memory_format=torch.contiguous_format),
        torch.empty_like(w2, memory_format=torch.contiguous_format),
    )


def _make_autograd(backward_op):
    def setup_context(ctx, inputs, output):
        nodes, w1, b1, w2, negative_slope, _ = inputs
        ctx.save_for_backward(nodes, w1, b1, w2)
        ctx.negative_slope = negative_slope
        ctx.mark_non_differentiable(output[1])

    def backward(ctx, grad_out, grad_adjacency):
        nodes, w1, b1, w2 = ctx.saved_tensors
        grads = backward_op(grad_out, nodes, w1, b1, w2, ctx.negative_slope)
        return (*grads, None, None)

    return setup_context, backward


FUSED = _library.register_fused_op(
    OP, _FWD_SCHEMA, _BWD_SCHEMA, _fake_forward, _fake_backward, _make_autograd,
    triton=("graph_aggregate", "graph_aggregate_forward", "graph_aggregate_backward"),
)


# --------------------------------------------------------------------------- backends


def _native(nodes, w1, b1, w2, negative_slope, return_adjacency):
    """The op: C++ on CPU tensors, Triton on CUDA tensors."""
    out, adjacency = FUSED.op(nodes, w1, b1, w2, negative_slope, return_adjacency)
    return (out, adjacency) if return_adjacency else out


def _triton_cpu(nodes, w1, b1, w2, negative_slope, return_adjacency):
    out, adjacency = FUSED.cpu_triton(nodes, w1, b1, w2, negative_slope, return_adjacency)
    return (out, adjacency) if return_adjacency else out


_backend.register_op(
    OP,
    # There is no stock library op for this: "stock" is the plain formula, as "reference" is.
    {"native": _native, "triton": {"cpu": _triton_cpu, "cuda": _native}, "reference": graph_aggregate_reference,
     "stock": graph_aggregate_reference},
    FUSED.availability(),
    # Measured: docs/PERFORMANCE.md.
    {"cpu": FUSED.auto_cpu(), "cuda": FUSED.cuda_auto("triton")},
)


# --------------------------------------------------------------------------- public


def graph_aggregate(
    nodes: Tensor,
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    negative_slope: float = 0.2,
    return_adjacency: bool = False,
):
    r"""Per-pixel message passing between p node feature maps through a learned adjacency.

    At every pixel, for every ordered pair p != q::

        s[p, q] = w2 . leaky_relu(w1 @ |E_p - E_q| + b1, negative_slope)
        A[p, :] = softmax over q != p of s[p, q]          (no self loops)
        out[p]  = sum_{q != p} A[p, q] * E_q

    (No output bias on the MLP: the softmax over q would cancel it.)

    Args:
        nodes: (b, p, c, h, w) node features E, p >= 2.
        w1: (hd, c) hidden-layer weight.
        b1: (hd,) hidden-layer bias.
        w2: (hd,) score weight.
        negative_slope: leaky ReLU slope.
        return_adjacency: also return A.

    Returns:
        out (b, p, c, h, w); with ``return_adjacency``, ``(out, A)`` where A is
        (b, p, p, h, w) with a zero diagonal (A carries no gradient).

    Gradients flow to nodes, w1, b1 and w2.  dtypes: float32/float64 on CPU;
    float32/float16/bfloat16 on GPU (float32 accumulation).
    """
    if isinstance(nodes, Tensor):
        nodes, w1, b1, w2 = _library.autocast_cast(nodes, w1, b1, w2)
    _check(nodes, w1, b1, w2, negative_slope)
    return _backend.impl(OP, nodes.device.type)(nodes, w1, b1, w2, float(negative_slope), bool(return_adjacency))
