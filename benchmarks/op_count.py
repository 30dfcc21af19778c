"""Dispatched-op counts of MEGAN: one eval forward and one training step (every op but views).

    python benchmarks/op_count.py [--backend auto] [--top 8]

Eval forward: batch 1, 4 LR frames of 16x16, no grad.  Training step: batch 2
of the same size, forward + Charbonnier loss + backward; the Adam step
(``foreach=True``) is counted on its own line.  Counted on the CPU by a
TorchDispatchMode: each top-level dispatched op once (a fused op's inner
work is not seen; views are free and not counted).  On a GPU each counted op
is at least one kernel launch.  docs/PERFORMANCE.md, "Launch count".
"""

from __future__ import annotations

import argparse
import collections

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class OpCounter(TorchDispatchMode):
    """Counts the ops dispatched inside it, by name, views excluded."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def count(fn) -> collections.Counter:
    counter = OpCounter()
    with counter:
        fn()
    return counter.counts


def main() -> int:
    from megan_fast.models import MEGAN
    from megan_fast.ops import use_backend

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="auto", help="ops backend (default auto)")
    parser.add_argument("--top", type=int, default=8, help="how many of the most frequent ops to name")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = MEGAN()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, foreach=True)
    x_eval = torch.rand(1, 4, 3, 16, 16)
    x, target = torch.rand(2, 4, 3, 16, 16), torch.rand(2, 7, 3, 64, 64)

    def eval_forward():
        model.eval()
        with torch.no_grad():
            model(x_eval)

    def train_step():
        model.train()
        opt.zero_grad(set_to_none=True)
        loss = torch.sqrt((model(x) - target) ** 2 + 1e-6).mean()
        loss.backward()

    with use_backend(args.backend):
        train_step()
        opt.step()  # Adam's state is created on the first step: count a later one
        for name, fn in (("eval forward (b=1, 16x16)", eval_forward), ("training step (b=2, 16x16)", train_step),
                         ("Adam step (foreach)", opt.step)):
            counts = count(fn)
            top = ", ".join(f"{k} {v}" for k, v in counts.most_common(args.top))
            print(f"{name}: {sum(counts.values())} ops ({top})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
