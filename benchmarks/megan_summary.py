"""Whole-model CPU figures in one run: inference and a training step, auto vs stock; FLOPs.

    python benchmarks/megan_summary.py [--repeats N] [--arch megan|zooming_slowmo|tmnet] [--times K]

Inference: one 4-frame window at 64x112 input (7 output frames of 256x448;
TMNet with --times K: K in-between frames per pair, 4 + 3K output frames).
Training: batch 2 of 32x32 LR crops, forward + backward of the Charbonnier loss.
FLOPs per output frame at 180x144 input, counted by FlopCounterMode on meta
tensors (the fused ops register their formulas).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from megan_fast import benchmarking
from megan_fast.models import MEGAN, MEGANConfig


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def flops_per_output_frame(h: int = 144, w: int = 180) -> float:
    with torch.device("meta"):
        model = MEGAN().eval()
    x = torch.rand(1, 4, 3, h, w, device="meta")
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() / 7


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--only", choices=("inference", "training", "flops"), default=None)
    parser.add_argument("--arch", choices=("megan", "zooming_slowmo", "tmnet"), default="megan",
                        help="the network: MEGAN (default), Zooming Slow-Mo or TMNet (MEGANConfig's presets)")
    parser.add_argument("--times", type=int, default=1,
                        help="in-between frames per pair of inputs at i/(K+1) (TMNet only; default 1)")
    args = parser.parse_args()
    torch.manual_seed(0)
    config = {"megan": MEGANConfig, "zooming_slowmo": MEGANConfig.zooming_slowmo, "tmnet": MEGANConfig.tmnet}[args.arch]()
    model = MEGAN(config)
    k = args.times
    times = None if k == 1 else [i / (k + 1) for i in range(1, k + 1)]
    frames_out = 4 + 3 * k
    print(f"architecture: {args.arch}, {sum(p.numel() for p in model.parameters()):,} parameters; {k} in-between "
          "frame(s) per pair")
    print(f"threads: {torch.get_num_threads()}; median of {args.repeats} after one warm-up call")
    print("| workload | auto (s) | stock (s) | speed-up |\n|---|---|---|---|")
    x = torch.rand(1, 4, 3, 64, 112)
    model.eval()
    res = {}
    for backend in ("auto", "stock") if args.only in (None, "inference") else ():
        step = benchmarking.model_step(model, backend, x, train=False, times=times)
        step()
        res[backend] = timed(step, args.repeats)
    if res:
        print(f"| inference, 64x112 -> {frames_out} x 256x448 | {res['auto']:.2f} ({frames_out / res['auto']:.2f} "
              f"frames/s) | {res['stock']:.2f} ({frames_out / res['stock']:.2f} frames/s) | "
              f"{res['stock'] / res['auto']:.2f}x |")
    model.train()
    xb, target = torch.rand(2, 4, 3, 32, 32), torch.rand(2, 7, 3, 128, 128)
    res = {}
    for backend in ("auto", "stock") if args.only in (None, "training") else ():
        step = benchmarking.model_step(model, backend, xb, train=True, target=target)
        torch.manual_seed(0)
        step()
        res[backend] = timed(lambda: (torch.manual_seed(0), step()), args.repeats)
    if res:
        print(f"| training step, b=2, 32x32 | {res['auto']:.2f} | {res['stock']:.2f} | "
              f"{res['stock'] / res['auto']:.2f}x |")
    if args.only in (None, "flops"):
        print(f"\nFLOPs per output frame at 180x144 input: {flops_per_output_frame() / 1e9:.1f} GFLOP")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
