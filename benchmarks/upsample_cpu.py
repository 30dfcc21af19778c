"""upsample_bilinear2x on CPU: our C++ kernel vs the stock formula (F.interpolate, then * 2), float32.

    python benchmarks/upsample_cpu.py

Shapes of PCD's coarse pyramid levels (a training step's and an eval
window's).  Medians of megan_fast.benchmarking.median_seconds.
"""

from __future__ import annotations

import torch

from megan_fast.benchmarking import median_seconds
from megan_fast.ops import upsample_bilinear2x, use_backend

SHAPES = [(14, 64, 8, 14), (14, 64, 16, 28), (2, 64, 36, 45)]


def main() -> int:
    torch.manual_seed(0)
    print(f"threads: {torch.get_num_threads()}")
    print("| input (n, c, h, w) | ours fwd | stock fwd | ratio | ours fwd+bwd | stock fwd+bwd | ratio |")
    print("|---|---|---|---|---|---|---|")
    for shape in SHAPES:
        x = torch.randn(shape, requires_grad=True)
        times = {}
        for backend in ("native", "stock"):
            with use_backend(backend):
                def fwd():
                    with torch.no_grad():
                        upsample_bilinear2x(x, 2.0)

                def fwd_bwd():
                    y = upsample_bilinear2x(x, 2.0)
                    y.backward(torch.ones_like(y))

                times[backend] = (median_seconds(fwd, 0.5) * 1e6, median_seconds(fwd_bwd, 0.5) * 1e6)
        (nf, nb), (sf, sb) = times["native"], times["stock"]
        print(f"| {', '.join(map(str, shape))} | {nf:,.0f} us | {sf:,.0f} us | {sf / nf:.1f}x | {nb:,.0f} us | "
              f"{sb:,.0f} us | {sb / nb:.1f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
