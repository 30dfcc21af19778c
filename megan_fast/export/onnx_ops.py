"""The four fused ops as standard ONNX operators (onnxscript translations for ``torch.onnx.export(dynamo=True)``).

Each function receives the op's arguments as the exporter's symbolic
tensors (static shapes where the model fixes them: weights, channels) and
Python values, and builds its result from operators of the default ONNX
domain only, so that any ONNX runtime runs the file as it is
(docs/DESIGN.md section 7):

- ``modulated_deform_conv2d`` -> ``DeformConv`` (opset 19): torchvision's
  offset layout, mask, bias and offset groups, as ours.
- ``upsample_bilinear2x`` -> ``Resize`` (linear, half-pixel, x2) times the scale.
- ``nonlocal_attention`` -> ``MatMul``, ``Softmax``, ``MatMul``: the n x m
  matrix exists in the runtime (O(n m) memory; the tiles of ``--tile`` bound n).
- ``graph_aggregate`` -> the message passing written out with broadcasting:
  the (p, p, channels) differences of every pixel exist in the runtime.

The second outputs of the attention (log-sum-exp) and of the graph
aggregation (the adjacency, empty unless asked for) are what the ops return
too; the network does not use them, and the exporter's optimiser drops
them.
"""

from __future__ import annotations

import math

import torch
from onnxscript import opset19 as op

OPSET = 19  # DeformConv's first opset


def deform_conv2d(input, offset, weight, bias=None, mask=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1)):
    """``DeformConv``: input (b, c, h, w), offset (b, 2 * og * kh * kw, ho, wo), weight (co, c / g, kh, kw)."""
    kh, kw = int(weight.shape[2]), int(weight.shape[3])
    groups = int(input.shape[1]) // int(weight.shape[1])
    offset_groups = int(offset.shape[1]) // (2 * kh * kw)
    return op.DeformConv(input, weight, offset, bias, mask, dilations=list(dilation), group=groups,
                         kernel_shape=[kh, kw], offset_group=offset_groups,
                         pads=[padding[0], padding[1], padding[0], padding[1]], strides=list(stride))


def upsample_bilinear2x(input, scale=1.0):
    """``Resize`` x2 (bilinear, half-pixel centres: ``F.interpolate(..., align_corners=False)``) times ``scale``."""
    scales = op.Constant(value_floats=[1.0, 1.0, 2.0, 2.0])
    up = op.Resize(input, None, scales, mode="linear", coordinate_transformation_mode="half_pixel")
    return up if scale == 1.0 else op.Mul(up, op.CastLike(op.Constant(value_float=float(scale)), up))


def nonlocal_attention(q, k, v, scale=1.0):
    """(softmax(scale q k^T) v, logsumexp(scale q k^T)) for q (b, n, d), k (b, m, d), v (b, m, dv)."""
    logits = op.MatMul(q, op.Transpose(k, perm=[0, 2, 1]))
    if scale != 1.0:
        logits = op.Mul(logits, op.CastLike(op.Constant(value_float=float(scale)), logits))
    out = op.MatMul(op.Softmax(logits, axis=-1), v)
    lse = op.ReduceLogSumExp(logits, op.Constant(value_ints=[-1]), keepdims=0)
    return out, lse


def graph_aggregate(nodes, w1, b1, w2, negative_slope=0.2, return_adjacency=False):
    """LMGA's message passing for nodes (b, p, c, h, w): s_pq = w2 . leaky_relu(w1 |E_p - E_q| + b1) over
    the ordered pairs p != q, A = softmax over q, out_p = sum_q A_pq E_q; also A (b, p, p, h, w) when
    ``return_adjacency`` (else an empty tensor, as the op returns)."""
    p = int(nodes.shape[1])
    # |E_p - E_q| for every pair, channels last: (b, p, p, h, w, c)
    diff = op.Abs(op.Sub(op.Unsqueeze(nodes, op.Constant(value_ints=[2])),
                         op.Unsqueeze(nodes, op.Constant(value_ints=[1]))))
    diff = op.Transpose(diff, perm=[0, 1, 2, 4, 5, 3])
    hidden = op.Add(op.MatMul(diff, op.Transpose(w1, perm=[1, 0])), b1)
    scores = op.MatMul(op.LeakyRelu(hidden, alpha=float(negative_slope)), w2)  # (b, p, p, h, w)
    # Only q != p: -inf on the diagonal, whose softmax weight is then exactly 0.
    diagonal = torch.where(torch.eye(p, dtype=torch.bool), -math.inf, 0.0).reshape(p, p, 1, 1)
    mask = op.CastLike(op.Constant(value_floats=diagonal.flatten().tolist()), scores)
    adjacency = op.Softmax(op.Add(scores, op.Reshape(mask, op.Constant(value_ints=[p, p, 1, 1]))), axis=2)
    # out_p = sum_q A_pq E_q: (b, p, q, 1, h, w) * (b, 1, q, c, h, w), summed over q
    out = op.ReduceSum(op.Mul(op.Unsqueeze(adjacency, op.Constant(value_ints=[3])),
                              op.Unsqueeze(nodes, op.Constant(value_ints=[1]))),
                       op.Constant(value_ints=[2]), keepdims=0)
    if return_adjacency:
        return out, adjacency
    return out, op.Slice(op.Reshape(nodes, op.Constant(value_ints=[-1])), op.Constant(value_ints=[0]),
                         op.Constant(value_ints=[0]))


def translation_table() -> dict:
    """The exporter's ``custom_translation_table`` for the four ops."""
    import megan_fast.ops  # noqa: F401  (registers torch.ops.megan_fast.*)

    ops = torch.ops.megan_fast
    return {
        ops.modulated_deform_conv2d.default: deform_conv2d,
        ops.upsample_bilinear2x.default: upsample_bilinear2x,
        ops.nonlocal_attention.default: nonlocal_attention,
        ops.graph_aggregate.default: graph_aggregate,
    }
