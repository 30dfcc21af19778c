"""Shared helpers of the DCN tests: random problems, torchvision's answers, and a run through a backend."""

from __future__ import annotations

import torch
import torchvision.ops

TENSOR_ARGS = ("input", "offset", "weight", "bias", "mask")


def _out_size(n, k, s, p, d):
    return (n + 2 * p - (d * (k - 1) + 1)) // s + 1


def make_problem(
    b=2, c_in=4, c_out=6, h=7, w=9, k=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1),
    groups=1, og=2, with_mask=True, with_bias=True, offset_scale=2.0, dtype=torch.float64, device="cpu", seed=0,
):
    """A random DCN problem (seeded): the arguments of modulated_deform_conv2d as a dict."""
    gen = torch.Generator().manual_seed(seed)
    kh, kw = k
    ho = _out_size(h, kh, stride[0], padding[0], dilation[0])
    wo = _out_size(w, kw, stride[1], padding[1], dilation[1])

    def rnd(*shape, uniform=False):
        t = (torch.rand if uniform else torch.randn)(*shape, generator=gen, dtype=torch.float64)
        return t.to(dtype=dtype, device=device)

    return dict(
        input=rnd(b, c_in, h, w),
        offset=rnd(b, 2 * og * kh * kw, ho, wo) * offset_scale,
        weight=rnd(c_out, c_in // groups, kh, kw) / (c_in * kh * kw / groups) ** 0.5,
        bias=rnd(c_out) if with_bias else None,
        mask=rnd(b, og * kh * kw, ho, wo, uniform=True) if with_mask else None,
        stride=stride, padding=padding, dilation=dilation,
    )


def forward_and_grads(fn, problem, grad_output=None, seed=1):
    """Runs fn(**problem) and returns (output, grad_output, {name: grad}) for every tensor argument."""
    args = {k: (v.detach().clone().requires_grad_(True) if k in TENSOR_ARGS and v is not None else v)
            for k, v in problem.items()}
    out = fn(**args)
    if grad_output is None:
        g = torch.Generator(device="cpu").manual_seed(seed)
        grad_output = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype).to(out.device)
    leaves = [k for k in TENSOR_ARGS if args.get(k) is not None]
    grads = torch.autograd.grad(out, [args[k] for k in leaves], grad_output, allow_unused=True)
    return out.detach(), grad_output, dict(zip(leaves, grads))


def torchvision_fn(input, offset, weight, bias, stride, padding, dilation, mask):
    """torchvision's op; on CUDA, its CPU kernels for huge or infinite offsets (its CUDA kernels read out of
    bounds there: an illegal memory access that poisons the CUDA context)."""
    if input.device.type == "cuda" and not bool((offset.abs() < 1e4).all()):
        args = [t.cpu() if t is not None else None for t in (input, offset, weight, bias, mask)]
        out = torchvision.ops.deform_conv2d(args[0], args[1], args[2], args[3], stride, padding, dilation, args[4])
        return out.to(input.device)
    return torchvision.ops.deform_conv2d(input, offset, weight, bias, stride, padding, dilation, mask)
