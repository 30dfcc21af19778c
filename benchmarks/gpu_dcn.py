"""GPU check and benchmark of the Triton DCN kernels against torchvision's CUDA op.

    python benchmarks/gpu_dcn.py            # prints a markdown table for docs/PERFORMANCE.md

Accuracy: for fp32 / fp16 / bf16, the Triton result and torchvision's result
(bf16: torchvision has none, so its fp32 result is the only peer) are compared
with a float64 run of torchvision; our error should be at most 2x torchvision's
own error in the same dtype.  Speed: median ms (CUDA events via
torch.utils.benchmark) for forward and forward+backward; peak memory above
the inputs.  Exits 0 with a message when no GPU is present.
"""

from __future__ import annotations

import sys

import torch

from megan_fast import benchmarking
from megan_fast.ops import modulated_deform_conv2d, use_backend


def _run(backend, inputs, backward):
    tensors = [inputs[k] for k in ("input", "offset", "weight", "bias", "mask")]
    with use_backend(backend):
        out = modulated_deform_conv2d(tensors[0], tensors[1], tensors[2], tensors[3], 1, 1, 1, tensors[4])
    if not backward:
        return out, []
    grads = torch.autograd.grad(out, tensors, torch.ones_like(out) / out.numel() ** 0.5)
    return out, list(grads)


def accuracy(case) -> list[str]:
    rows = []
    exact_inputs = benchmarking.dcn_inputs(case, device="cuda", dtype=torch.float64, requires_grad=True)
    exact = _run("stock", exact_inputs, True)
    exact = [exact[0]] + exact[1]
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        errs = {}
        for backend in ("triton", "stock"):
            if backend == "stock" and dtype == torch.bfloat16:
                continue
            inputs = {k: v.detach().to(dtype).requires_grad_(True) for k, v in exact_inputs.items()}
            out, grads = _run(backend, inputs, True)
            errs[backend] = [((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()
                             for a, b in zip([out] + grads, exact)]
        names = ["out", "d_input", "d_offset", "d_weight", "d_bias", "d_mask"]
        for i, name in enumerate(names):
            tv = errs.get("stock", [float("nan")] * 6)[i]
            rows.append(f"| {case.name} | {str(dtype)[6:]} | {name} | {errs['triton'][i]:.2e} | {tv:.2e} |")
    return rows


def speed(case, dtype) -> list[str]:
    rows = []
    for backward in (False, True):
        line = {}
        for backend in ("triton", "stock"):
            if backend == "stock" and dtype == torch.bfloat16:
                continue
            inputs = benchmarking.dcn_inputs(case, device="cuda", dtype=dtype, requires_grad=backward)
            fn = benchmarking.dcn_step(backend, inputs, backward)
            peak = benchmarking.cuda_peak_mib(fn)
            t = benchmarking.median_seconds(fn, 1.0, sync_cuda=True)
            line[backend] = (t * 1e3, peak)
        tri, stock = line["triton"], line.get("stock", (float("nan"), float("nan")))
        rows.append(
            f"| {case.name} | {str(dtype)[6:]} | {'fwd+bwd' if backward else 'fwd'} | {tri[0]:.3f} | {stock[0]:.3f} "
            f"| {stock[0] / tri[0]:.2f}x | {tri[1]:.0f} | {stock[1]:.0f} |"
        )
    return rows


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure")
        return 0
    print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    print("\n| case | dtype | tensor | triton rel. err | torchvision rel. err |\n|---|---|---|---|---|")
    for case in benchmarking.DCN_CASES:
        print("\n".join(accuracy(case)))
    print("\n| case | dtype | pass | triton ms | torchvision ms | speed-up | triton peak MiB | torchvision peak MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for case in benchmarking.DCN_CASES:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            print("\n".join(speed(case, dtype)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
