"""GPU accuracy and speed of the Triton kernels against their peers, and whole-model figures.

    python benchmarks/gpu_summary.py [--only ceiling,attention,graph,model,training]
    python benchmarks/gpu_summary.py --only ceiling,kernels    # issue 15's table, one call

Sections (each prints a markdown table for docs/PERFORMANCE.md):
- ceiling: a large bf16 matrix product and a device-to-device copy (the two
  numbers every figure below is compared with).
- attention: Triton vs ``F.scaled_dot_product_attention`` (PyTorch picks its
  flash kernel for fp16/bf16 at d = 32) at n = 1,024, 7,168 and 57,600;
  accuracy of both against a float64 explicit formula; TFLOP/s counted as
  4*b*n*m*d for the forward and 2.5 times that for the backward.
- graph: Triton vs the plain formula, accuracy, time and peak memory.
- model: MEGAN inference at 180x144 input (7 frames of 720x576 per window),
  backends auto / triton / stock, float32 and bf16 autocast; frames/s.
- training: a training step (forward + backward of the Charbonnier loss)
  at batch 2 and 16 of 32x32 crops, auto vs stock.
- profile: torch.profiler tables of a training step (b = 16).
- compiled: eager vs ``torch.compile(fullgraph=True)`` ("default" and
  "reduce-overhead", CUDA graphs) of a training step and of inference.
- zsm: the model table for Zooming Slow-Mo (``MEGANConfig.zooming_slowmo()``).
- tmnet: the model table for TMNet (``MEGANConfig.tmnet()``) at k = 1 and k = 7 in-between frames.
- kernels: the Triton kernels (one-pass DCN backward, attention dQ kernel
  computing D, autotuned blocks) against the peer (torchvision's CUDA DCN,
  SDPA), fp32/fp16/bf16, with each case's floor (bytes at the measured copy
  bandwidth, FLOPs at the measured bf16 matrix ceiling) and the fraction of
  it reached; their accuracy against float64.  Autotuning runs in the
  warm-up, outside the timed region.  Run the Triton tests first
  (``pytest tests -k triton``): the figures count once the kernels pass on
  the GPU (docs/PERFORMANCE.md, "GPU-verified paths").

Every timing is the median of CUDA-event timings after warm-up
(``triton.testing.do_bench``); peak memory is ``max_memory_allocated`` above
what was allocated before the call.  Exits 0 with a message without a GPU.
"""

from __future__ import annotations

import argparse
import sys
import traceback

import torch

from megan_fast import benchmarking
from megan_fast.ops import graph_aggregate, modulated_deform_conv2d, nonlocal_attention, use_backend
from megan_fast.reference import graph_aggregate_reference as graph_reference


def bench_ms(fn, warmup=25, rep=200) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 (NaN if a has any NaN)."""
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("nan")
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# --------------------------------------------------------------------------- ceiling


def ceiling() -> dict:
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = bench_ms(lambda: a @ b)
    tflops = 2 * n**3 / ms / 1e9
    x = torch.randn(2**28, device="cuda")  # 1 GiB
    y = torch.empty_like(x)
    ms_copy = bench_ms(lambda: y.copy_(x))
    tbs = 2 * x.numel() * 4 / ms_copy / 1e9
    print(f"\nceiling: bf16 8192^3 matmul {tflops:.0f} TFLOP/s; device copy {tbs:.2f} TB/s (read + write)")
    return {"bf16_tflops": tflops, "copy_tbs": tbs}


# --------------------------------------------------------------------------- attention


def attention(peak_tflops: float) -> None:
    print("\n### nonlocal_attention accuracy (rel. L2 error vs float64 explicit formula), b=2, n=m=1000, d=32")
    print("| dtype | tensor | triton | SDPA |\n|---|---|---|---|")
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 1000, 32, device="cuda", dtype=torch.float64, generator=g) for _ in range(3))
    q = q * 0.4  # logits of a few units: a peaked but not one-hot softmax
    go = torch.randn(2, 1000, 32, device="cuda", dtype=torch.float64, generator=g)
    qx, kx, vx = (t.clone().requires_grad_(True) for t in (q, k, v))
    ref = benchmarking.attention_explicit(qx, kx, vx)
    ref_grads = torch.autograd.grad(ref, (qx, kx, vx), go)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        errs = {}
        for backend in ("triton", "stock"):
            qs, ks, vs = (t.to(dtype).requires_grad_(True) for t in (q, k, v))
            with use_backend(backend):
                out = nonlocal_attention(qs, ks, vs, 1.0)
            grads = torch.autograd.grad(out, (qs, ks, vs), go.to(dtype))
            errs[backend] = [rel(a, b) for a, b in zip((out, *grads), (ref, *ref_grads))]
        for i, name in enumerate(("out", "dq", "dk", "dv")):
            print(f"| {str(dtype)[6:]} | {name} | {errs['triton'][i]:.2e} | {errs['stock'][i]:.2e} |")

    print(f"\n### nonlocal_attention speed, d = dv = 32, scale 1 (TFLOP/s; fraction of the measured "
          f"{peak_tflops:.0f} TFLOP/s bf16 matmul ceiling)")
    print("| b | n = m | dtype | pass | triton ms | SDPA ms | speed-up | triton TFLOP/s | SDPA TFLOP/s | "
          "triton peak MiB | SDPA peak MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for b, n in ((4, 1024), (4, 7168), (1, 57600)):
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            for backward in (False, True):
                qkv = benchmarking.attention_inputs(n, b=b, device="cuda", dtype=dtype, requires_grad=backward)
                qkv = tuple((t.detach() * 0.4).requires_grad_(backward) for t in qkv)
                flops = 4 * b * n * n * 32 * (3.5 if backward else 1.0)
                res = {}
                for backend in ("triton", "stock"):
                    step = benchmarking.attention_step(backend, qkv, backward)
                    res[backend] = (bench_ms(step), benchmarking.cuda_peak_mib(step))
                t, s = res["triton"], res["stock"]
                print(f"| {b} | {n:,} | {str(dtype)[6:]} | {'fwd+bwd' if backward else 'fwd'} | {t[0]:.3f} | "
                      f"{s[0]:.3f} | {s[0] / t[0]:.2f}x | {flops / t[0] / 1e9:.0f} ({flops / t[0] / 1e9 / peak_tflops:.0%}) "
                      f"| {flops / s[0] / 1e9:.0f} | {t[1]:.0f} | {s[1]:.0f} |", flush=True)


# --------------------------------------------------------------------------- kernels


def _dcn_floor(case, dtype, backward: bool, ceil: dict) -> float:
    """ms: max(bytes / copy bandwidth, FLOPs / bf16 matrix ceiling) of one DCN call."""
    esize = torch.empty(0, dtype=dtype).element_size()
    p = case.batch * case.height * case.width
    k2 = case.kernel ** 2
    c = case.channels
    # input, offset, mask, output (+ grad_output read and grad input/offset/mask written)
    elems = p * c + p * 2 * case.offset_groups * k2 + p * case.offset_groups * k2 + p * c
    flops = 2 * p * k2 * c * c
    if backward:
        elems *= 2
        flops *= 3
    return max(elems * esize / (ceil["copy_tbs"] * 1e9), flops / (ceil["bf16_tflops"] * 1e9))


def _attention_floor(b, n, dtype, backward: bool, ceil: dict) -> float:
    esize = torch.empty(0, dtype=dtype).element_size()
    elems = 4 * b * n * 32 * (2 if backward else 1)
    flops = 4 * b * n * n * 32 * (3.5 if backward else 1.0)
    from megan_fast.triton._utils import tf32_allowed

    peak = ceil["bf16_tflops"] * (1.0 if dtype != torch.float32 else 0.5 if tf32_allowed() else 0.07)
    return max(elems * esize / (ceil["copy_tbs"] * 1e9), flops / (peak * 1e9))


def _timed(make_step):
    step = make_step()
    step()  # autotuning (a new problem size) happens here, before any timing
    torch.cuda.synchronize()
    return bench_ms(step), benchmarking.cuda_peak_mib(step)


def kernels(ceil: dict) -> None:
    print("\n### Triton kernels vs peers (ms; floor = max(bytes / "
          f"{ceil['copy_tbs']:.2f} TB/s, FLOPs / {ceil['bf16_tflops']:.0f} TFLOP/s); peak MiB)")
    print("| op | case | dtype | pass | triton | peer | triton vs peer | floor | triton / floor | triton MiB | "
          "peer MiB |")  # times in ms, the floor in us
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for case in benchmarking.DCN_CASES:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for backward in (False, True):
                inputs = benchmarking.dcn_inputs(case, device="cuda", dtype=dtype, requires_grad=backward)
                ours = _timed(lambda: benchmarking.dcn_step("triton", inputs, backward))
                peer = (_timed(lambda: benchmarking.dcn_step("stock", inputs, backward))
                        if dtype != torch.bfloat16 else (float("nan"), float("nan")))
                _row("DCN", case.name, dtype, backward, ours, peer, _dcn_floor(case, dtype, backward, ceil))
    for b, n in ((4, 1024), (4, 7168), (1, 57600)):
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            for backward in (False, True):
                qkv = benchmarking.attention_inputs(n, b=b, device="cuda", dtype=dtype, requires_grad=backward)
                qkv = tuple((t.detach() * 0.4).requires_grad_(backward) for t in qkv)
                ours = _timed(lambda: benchmarking.attention_step("triton", qkv, backward))
                peer = _timed(lambda: benchmarking.attention_step("stock", qkv, backward))
                _row("attention", f"b{b} n={n:,}", dtype, backward, ours, peer,
                     _attention_floor(b, n, dtype, backward, ceil))
    _kernel_accuracy()


def _row(op, case, dtype, backward, ours, peer, floor) -> None:
    print(f"| {op} | {case} | {str(dtype)[6:]} | {'fwd+bwd' if backward else 'fwd'} | {ours[0]:.3f} "
          f"| {peer[0]:.3f} | {peer[0] / ours[0]:.2f}x | {floor * 1e3:.1f} us | "
          f"{ours[0] / floor:.1f}x | {ours[1]:.0f} | {peer[1]:.0f} |", flush=True)


def _kernel_accuracy() -> None:
    print("\n### accuracy (rel. L2 error vs float64; DCN b16 32x32, attention b2 n=1000)")
    print("| op | dtype | out | grads (max over inputs) |\n|---|---|---|---|")
    case = benchmarking.DCN_CASES[1]
    exact = benchmarking.dcn_inputs(case, device="cuda", dtype=torch.float64, requires_grad=True)
    keys = ("input", "offset", "weight", "bias", "mask")

    def dcn(inputs, backend):
        with use_backend(backend):
            out = modulated_deform_conv2d(inputs["input"], inputs["offset"], inputs["weight"], inputs["bias"], 1, 1,
                                          1, inputs["mask"])
        g = torch.autograd.grad(out, [inputs[k] for k in keys], torch.ones_like(out) / out.numel() ** 0.5)
        return out, g

    ref_out, ref_g = dcn(exact, "stock")
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 1000, 32, device="cuda", dtype=torch.float64, generator=g) for _ in range(3))
    go = torch.randn(2, 1000, 32, device="cuda", dtype=torch.float64, generator=g)
    qx, kx, vx = (t.clone().requires_grad_(True) for t in (q * 0.4, k, v))
    aref = benchmarking.attention_explicit(qx, kx, vx)
    aref_g = torch.autograd.grad(aref, (qx, kx, vx), go)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        inputs = {kk: t.detach().to(dtype).requires_grad_(True) for kk, t in exact.items()}
        out, grads = dcn(inputs, "triton")
        print(f"| DCN | {str(dtype)[6:]} | {rel(out, ref_out):.2e} | "
              f"{max(rel(a, b) for a, b in zip(grads, ref_g)):.2e} |")
        qs, ks, vs = (t.detach().to(dtype).requires_grad_(True) for t in (qx, kx, vx))
        with use_backend("triton"):
            out = nonlocal_attention(qs, ks, vs, 1.0)
        grads = torch.autograd.grad(out, (qs, ks, vs), go.to(dtype))
        print(f"| attention | {str(dtype)[6:]} | {rel(out, aref):.2e} | "
              f"{max(rel(a, b) for a, b in zip(grads, aref_g)):.2e} |", flush=True)


# --------------------------------------------------------------------------- graph


def graph() -> None:
    print("\n### graph_aggregate accuracy (rel. L2 vs float64 plain formula), b=2, p=5, c=64, hd=16, 17x23")
    print("| dtype | tensor | triton | plain formula |\n|---|---|---|---|")
    exact = benchmarking.graph_inputs(b=2, h=17, w=23, device="cuda", dtype=torch.float64, requires_grad=True)
    ref = graph_reference(*exact, 0.2)
    go = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, exact, go)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        errs = {}
        for backend in ("triton", "stock"):
            inp = tuple(t.detach().to(dtype).requires_grad_(True) for t in exact)
            with use_backend(backend):
                out = graph_aggregate(*inp, 0.2)
            grads = torch.autograd.grad(out, inp, go.to(dtype))
            errs[backend] = [rel(a, b) for a, b in zip((out, *grads), (ref, *ref_grads))]
        for i, name in enumerate(("out", "d_nodes", "d_w1", "d_b1", "d_w2")):
            print(f"| {str(dtype)[6:]} | {name} | {errs['triton'][i]:.2e} | {errs['stock'][i]:.2e} |")

    print("\n### graph_aggregate speed and peak memory, p=5, c=64, hd=16")
    print("| shape | dtype | pass | triton ms | plain ms | speed-up | triton peak MiB | plain peak MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for b, h, w in ((7, 64, 112), (7, 144, 180)):
        for dtype in (torch.float32, torch.bfloat16):
            for backward in (False, True):
                inp = benchmarking.graph_inputs(b=b, h=h, w=w, device="cuda", dtype=dtype, requires_grad=backward)
                res = {}
                for backend in ("triton", "stock"):
                    step = benchmarking.graph_step(backend, inp, backward)
                    res[backend] = (bench_ms(step, rep=100), benchmarking.cuda_peak_mib(step))
                t, s = res["triton"], res["stock"]
                print(f"| b{b} {h}x{w} | {str(dtype)[6:]} | {'fwd+bwd' if backward else 'fwd'} | {t[0]:.3f} | "
                      f"{s[0]:.3f} | {s[0] / t[0]:.2f}x | {t[1]:.0f} | {s[1]:.0f} |", flush=True)


# --------------------------------------------------------------------------- whole model


def model_check() -> None:
    """A small perturbed MEGAN: triton vs reference backends, outputs and parameter gradients (float32)."""
    from megan_fast.models import MEGAN

    torch.manual_seed(0)
    model = MEGAN(nf=16, front_blocks=1, back_blocks=1, num_pfrdb=1, memory_seed=0).cuda()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    x = torch.rand(2, 4, 3, 20, 28, device="cuda")
    torch.backends.cudnn.allow_tf32 = False
    res = {}
    for backend in ("triton", "reference"):
        model.zero_grad(set_to_none=True)
        with use_backend(backend):
            y = model(x, memory_indices=[0, 2, 4, 6])
            y.square().mean().backward()
        res[backend] = (y.detach(), [p.grad.detach().clone() for p in model.parameters()])
    names = [n for n, _ in model.named_parameters()]
    per = sorted(((rel(a, b), n, b.norm().item()) for n, a, b in zip(names, res["triton"][1], res["reference"][1])),
                 reverse=True)
    for err, name, norm in per[:8]:
        print(f"  worst gradient: {name}: rel. err {err:.2e} (reference norm {norm:.2e})")
    out_err = rel(res["triton"][0], res["reference"][0])
    torch.backends.cudnn.allow_tf32 = True
    grad_err = max(rel(a, b) for a, b in zip(res["triton"][1], res["reference"][1]))
    print(f"\nMEGAN (small, perturbed) triton vs reference on CUDA, float32 (TF32 off): output rel. err "
          f"{out_err:.2e}, worst parameter-gradient rel. err {grad_err:.2e}")


def model_inference(arch: str = "megan", k: int = 1) -> None:
    """One window at 180x144 input; TMNet with k in-between frames per pair (4 + 3k output frames)."""
    from megan_fast.models import MEGAN, MEGANConfig

    torch.manual_seed(0)
    presets = {"megan": MEGANConfig, "zooming_slowmo": MEGANConfig.zooming_slowmo, "tmnet": MEGANConfig.tmnet}
    model = MEGAN(presets[arch]()).cuda().eval()
    times = None if k == 1 else [i / (k + 1) for i in range(1, k + 1)]
    frames = 4 + 3 * k
    print(f"\n### {arch} inference, one window: 4 frames of 180x144 -> {frames} frames of 720x576")
    print("| batch | precision | backend | ms / window | output frames/s | peak MiB |\n|---|---|---|---|---|---|")
    for batch in (1, 4):
        x = torch.rand(batch, 4, 3, 144, 180, device="cuda")
        for precision in ("bf16 autocast", "fp32 (TF32 convs)", "fp32") if batch == 1 else ("bf16 autocast",):
            for backend in ("auto", "triton", "stock"):
                amp = precision.startswith("bf16")
                torch.backends.cudnn.allow_tf32 = precision != "fp32"
                torch.backends.cuda.matmul.allow_tf32 = precision != "fp32"

                step = benchmarking.model_step(model, backend, x, train=False,
                                               autocast_dtype=torch.bfloat16 if amp else None, times=times)
                try:
                    ms = bench_ms(step, warmup=200, rep=1000)
                    peak = benchmarking.cuda_peak_mib(step)
                except torch.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    print(f"| {batch} | {precision} | {backend} | out of memory | - | - |", flush=True)
                    continue
                print(f"| {batch} | {precision} | {backend} | {ms:.1f} | {frames * batch / ms * 1e3:.1f} | "
                      f"{peak:.0f} |", flush=True)
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cuda.matmul.allow_tf32 = False


def training() -> None:
    from megan_fast.models import MEGAN

    torch.manual_seed(0)
    model = MEGAN().cuda().train()
    print("\n### MEGAN training step, 32x32 crops (forward + backward of the Charbonnier loss)")
    print("| batch | precision | backend | ms / step | peak MiB |\n|---|---|---|---|---|")
    for batch in (2, 16):
        x = torch.rand(batch, 4, 3, 32, 32, device="cuda")
        target = torch.rand(batch, 7, 3, 128, 128, device="cuda")
        for amp in (False, True):
            for backend in ("auto", "stock"):
                step = benchmarking.model_step(model, backend, x, train=True, target=target,
                                               autocast_dtype=torch.bfloat16 if amp else None,
                                               memory_indices=[0, 2, 4, 6])
                ms = bench_ms(step, warmup=200, rep=1000)
                print(f"| {batch} | {'bf16 autocast' if amp else 'fp32'} | {backend} | {ms:.1f} | "
                      f"{benchmarking.cuda_peak_mib(step):.0f} |", flush=True)


def compiled() -> None:
    """The whole step as one graph: eager vs torch.compile(fullgraph=True) "default" and "reduce-overhead"
    (CUDA graphs), training b = 16 and inference b = 1 and 4 windows, bf16 autocast, backend auto."""
    from megan_fast.models import MEGAN

    torch.manual_seed(0)
    base = MEGAN().cuda()
    print("\n### MEGAN compiled vs eager (bf16 autocast, backend auto)")
    print("| pass | batch | mode | ms | frames/s or steps/s |\n|---|---|---|---|---|")
    idx = torch.tensor([0, 2, 4, 6], device="cuda")  # a device index: what a captured training step passes
    for mode in ("none", "default", "reduce-overhead"):
        model = base if mode == "none" else torch.compile(base, mode=mode, fullgraph=True)
        base.train()
        x = torch.rand(16, 4, 3, 32, 32, device="cuda")
        target = torch.rand(16, 7, 3, 128, 128, device="cuda")
        step = benchmarking.model_step(model, "auto", x, train=True, target=target, autocast_dtype=torch.bfloat16,
                                       memory_indices=idx)
        ms = bench_ms(step, warmup=20, rep=200)
        print(f"| training | 16 | {mode} | {ms:.1f} | {1e3 / ms:.2f} |", flush=True)
        base.eval()
        for batch in (1, 4):
            x = torch.rand(batch, 4, 3, 144, 180, device="cuda")
            step = benchmarking.model_step(model, "auto", x, train=False, autocast_dtype=torch.bfloat16)
            ms = bench_ms(step, warmup=20, rep=200)
            print(f"| inference 180x144 -> 720x576 | {batch} | {mode} | {ms:.1f} | {7 * batch / ms * 1e3:.1f} |",
                  flush=True)


def profile() -> None:
    """Where a training step's time goes: torch.profiler tables (CPU and CUDA), stock and auto."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    from megan_fast.models import MEGAN

    torch.manual_seed(0)
    model = MEGAN().cuda().train()
    x = torch.rand(16, 4, 3, 32, 32, device="cuda")
    target = torch.rand(16, 7, 3, 128, 128, device="cuda")
    for backend in ("stock", "auto"):
        step = benchmarking.model_step(model, backend, x, train=True, target=target, memory_indices=[0, 2, 4, 6])
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
            step()
            torch.cuda.synchronize()
        ka = p.key_averages()
        print(f"\n### profile, training step b=16 32x32 fp32, backend {backend}")
        print(ka.table(sort_by="self_cuda_time_total", row_limit=14, max_name_column_width=50))
        print(ka.table(sort_by="self_cpu_time_total", row_limit=10, max_name_column_width=50))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", default="ceiling,attention,graph,model,training")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure")
        return 0
    import triton

    print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, triton {triton.__version__}")
    parts = set(args.only.split(","))
    ceil = {"bf16_tflops": 989.0, "copy_tbs": 3.35}  # datasheet values until "ceiling" has measured them
    failed = False
    sections = [
        ("ceiling", lambda: ceiling()),
        ("attention", lambda: attention(ceil["bf16_tflops"])),
        ("graph", graph),
        ("model", lambda: (model_check(), model_inference())),
        ("training", training),
        ("model_check", model_check),
        ("profile", profile),
        ("compiled", compiled),
        ("zsm", lambda: model_inference("zooming_slowmo")),
        ("tmnet", lambda: (model_inference("tmnet"), model_inference("tmnet", 7))),
        ("kernels", lambda: kernels(ceil)),
    ]
    for name, fn in sections:
        if name not in parts:
            continue
        try:
            result = fn()
            if name == "ceiling":
                ceil = result
        except Exception:  # keep going: one broken section must not hide the others' figures
            failed = True
            print(f"\n[{name}] FAILED:\n{traceback.format_exc()}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
