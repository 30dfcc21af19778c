"""FLOP formulas of the fused ops for ``torch.utils.flop_counter.FlopCounterMode``.

Convention as torch's own formulas: a multiply-add is 2 FLOPs; the GEMM-like
work is counted, plus the bilinear sampling / softmax / MLP work that has no
GEMM form, at the count of multiplies and adds it takes.
"""

from __future__ import annotations


import torch
from torch.utils.flop_counter import register_flop_formula


def _dcn_counts(input_shape, offset_shape, weight_shape, with_mask: bool) -> tuple[int, int]:
    b, c_in = input_shape[0], input_shape[1]
    c_out, cg, kh, kw = weight_shape
    pixels = offset_shape[2] * offset_shape[3]
    gemm = 2 * b * pixels * c_out * cg * kh * kw
    # Bilinear sample per (channel, tap, pixel): 4 multiply-adds, plus the mask multiply.
    sampling = b * c_in * kh * kw * pixels * (8 + int(with_mask))
    return gemm, sampling


def dcn_forward_flops(input_shape, offset_shape, weight_shape, bias_shape, mask_shape, *args, out_shape=None, **kw):
    gemm, sampling = _dcn_counts(input_shape, offset_shape, weight_shape, mask_shape is not None)
    return gemm + sampling


def dcn_backward_flops(grad_shape, input_shape, offset_shape, weight_shape, mask_shape, *args, out_shape=None, **kw):
    gemm, sampling = _dcn_counts(input_shape, offset_shape, weight_shape, mask_shape is not None)
    # grad columns and grad weight GEMMs; re-sampling, 4-corner scatter, offset and mask gradients.
    return 2 * gemm + 4 * sampling


def attention_forward_flops(q_shape, k_shape, v_shape, *args, out_shape=None, **kw):
    b, n, d = q_shape
    m, dv = k_shape[1], v_shape[2]
    return 2 * b * n * m * (d + dv) + 4 * b * n * m  # q k^T, P v, softmax (max, sub, exp, sum)


def attention_backward_flops(g_shape, q_shape, k_shape, v_shape, *args, out_shape=None, **kw):
    b, n, d = q_shape
    m, dv = k_shape[1], v_shape[2]
    # Recompute q k^T; dV = P^T dO; dP = dO V^T; dQ = dS K; dK = dS^T Q; plus elementwise.
    return 2 * b * n * m * (3 * d + 2 * dv) + 6 * b * n * m


def _graph_counts(nodes_shape, w1_shape) -> tuple[int, int]:
    b, p, c, h, w = nodes_shape
    hd = w1_shape[0]
    pixels = b * h * w
    pairs = p * (p - 1) // 2
    mlp = pixels * pairs * (2 * c + 2 * hd * c + 4 * hd)  # |diff|, w1 @ d + b1, lrelu, w2 .
    aggregate = pixels * p * ((p - 1) * 2 * c + 4 * (p - 1))  # softmax, weighted sum
    return mlp, aggregate


def graph_forward_flops(nodes_shape, w1_shape, *args, out_shape=None, **kw):
    return sum(_graph_counts(nodes_shape, w1_shape))


def graph_backward_flops(g_shape, nodes_shape, w1_shape, *args, out_shape=None, **kw):
    mlp, aggregate = _graph_counts(nodes_shape, w1_shape)
    return 3 * mlp + 3 * aggregate  # recompute forward, then the two-sided gradients


_FORMULAS = {
    "modulated_deform_conv2d": (dcn_forward_flops, dcn_backward_flops),
    "nonlocal_attention": (attention_forward_flops, attention_backward_flops),
    "graph_aggregate": (graph_forward_flops, graph_backward_flops),
}


def register_all() -> None:
    """Registers the formulas of every op and its backward."""
    from torch.utils.flop_counter import flop_registry

    for name, (fwd, bwd) in _FORMULAS.items():
        for op_name, formula in ((name, fwd), (f"{name}_backward", bwd)):
            packet = getattr(torch.ops.megan_fast, op_name)
            if packet not in flop_registry:
                register_flop_formula(packet)(formula)


