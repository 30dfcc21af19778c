"""Shared helpers of the DCN tests: random problems and torchvision's answers."""

from __future__ import annotations

import torch
import torchvision.ops


def make_problem(
    b=2, c_in=4, c_out=6, h=7, w=9, k=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1),
    groups=1, og=2, with_mask=True, with_bias=True, offset_scale=2.0, dtype=torch.float64, device="cpu",
):
    kh, kw = k
    h_out = (h + 2 * padding[0] - (dilation[0] * (kh - 1) + 1)) // stride[0] + 1
    w_out = (w + 2 * padding[1] - (dilation[1] * (kw - 1) + 1)) // stride[1] + 1
    opts = dict(dtype=dtype, device=device)
    return dict(
        input=torch.randn(b, c_in, h, w, **opts),
        offset=torch.randn(b, 2 * og * kh * kw, h_out, w_out, **opts) * offset_scale,
        weight=torch.randn(c_out, c_in // groups, kh, kw, **opts) / (c_in * kh * kw) ** 0.5,
        bias=torch.randn(c_out, **opts) if with_bias else None,
        mask=torch.rand(b, og * kh * kw, h_out, w_out, **opts) if with_mask else None,
        stride=stride, padding=padding, dilation=dilation,
    )


TENSOR_ARGS = ("input", "offset", "weight", "bias", "mask")


def forward_and_grads(fn, problem, grad_output=None, seed=1):
    """Runs fn(**problem) and returns (output, grad_output, {name: grad}) for every tensor argument."""
    args = {k: (v.detach().clone().requires_grad_(True) if k in TENSOR_ARGS and v is not None else v)
            for k, v in problem.items()}
    out = fn(**args)
    if grad_output is None:
        g = torch.Generator(device="cpu").manual_seed(seed)
        grad_output = torch.randn(out.shape, generator=g, dtype=out.dtype).to(out.device)
    leaves = [k for k in TENSOR_ARGS if args.get(k) is not None]
    grads = torch.autograd.grad(out, [args[k] for k in leaves], grad_output, allow_unused=True)
    return out.detach(), grad_output, dict(zip(leaves, grads))


def torchvision_fn(input, offset, weight, bias, stride, padding, dilation, mask):
    return torchvision.ops.deform_conv2d(input, offset, weight, bias, stride, padding, dilation, mask)
