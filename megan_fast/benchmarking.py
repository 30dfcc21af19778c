"""Benchmark cases and timing helpers shared by benchmarks/ and ``megan-fast bench``.

The shapes are MEGAN's: 64->64 channels, 3x3, padding 1, 8 offset groups, at
the 64x112 feature size (batch 4) and the 32x32 training crop (batch 16).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Callable

import torch

from megan_fast.ops import modulated_deform_conv2d, use_backend


@dataclasses.dataclass(frozen=True)
class DCNCase:
    name: str
    batch: int
    channels: int
    height: int
    width: int
    offset_groups: int = 8
    kernel: int = 3


DCN_CASES = (
    DCNCase("b4-c64-64x112", 4, 64, 64, 112),
    DCNCase("b16-c64-32x32", 16, 64, 32, 32),
)


def dcn_inputs(case: DCNCase, device="cpu", dtype=torch.float32, requires_grad=False, seed=0) -> dict:
    """Random DCN inputs for ``case`` (offsets of a few pixels, sigmoid mask)."""
    g = torch.Generator().manual_seed(seed)
    k = case.kernel
    kk = case.offset_groups * k * k
    b, c, h, w = case.batch, case.channels, case.height, case.width

    def make(*shape, scale=1.0, fn=None):
        t = torch.randn(*shape, generator=g) * scale
        if fn is not None:
            t = fn(t)
        return t.to(device=device, dtype=dtype).requires_grad_(requires_grad)

    return {
        "input": make(b, c, h, w),
        "offset": make(b, 2 * kk, h, w, scale=2.0),
        "weight": make(c, c, k, k, scale=(1.0 / (c * k * k)) ** 0.5),
        "bias": make(c),
        "mask": make(b, kk, h, w, fn=torch.sigmoid),
    }


def dcn_step(backend: str, inputs: dict, backward: bool) -> Callable[[], None]:
    """A closure running one forward (and backward) of the DCN op on ``backend``."""
    tensors = (inputs["input"], inputs["offset"], inputs["weight"], inputs["bias"], inputs["mask"])
    grad = None

    def run() -> None:
        nonlocal grad
        with use_backend(backend):
            out = modulated_deform_conv2d(
                inputs["input"], inputs["offset"], inputs["weight"], inputs["bias"], 1, 1, 1, inputs["mask"]
            )
        if backward:
            if grad is None:
                grad = torch.randn_like(out)
            torch.autograd.grad(out, tensors, grad)

    return run


def median_seconds(fn: Callable[[], None], min_run_time: float = 1.0, sync_cuda: bool = False) -> float:
    """Median seconds per call (torch.utils.benchmark, after a warm-up call), with torch's current threads."""
    import torch.utils.benchmark as tb

    fn()
    if sync_cuda:
        torch.cuda.synchronize()
    # (the Timer's own default is one thread, whatever torch.get_num_threads() says)
    timer = tb.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def dcn_summary(backends=("native", "stock"), cases=None, device="cpu", min_run_time=1.0) -> list[dict]:
    """Times forward and forward+backward per case (default: :data:`DCN_CASES`) and backend."""
    rows = []
    for case in cases if cases is not None else DCN_CASES:
        for backward in (False, True):
            inputs = dcn_inputs(case, device=device, requires_grad=backward)
            times = {}
            for backend in backends:
                times[backend] = median_seconds(
                    dcn_step(backend, inputs, backward), min_run_time, sync_cuda=device == "cuda"
                )
            rows.append({"case": case.name, "pass": "fwd+bwd" if backward else "fwd", "seconds": times})
    return rows


# --------------------------------------------------------------------------- attention

ATTENTION_SIZES = (1024, 7168)  # MEGAN: 32x32 training crop, 64x112 features


def attention_inputs(n: int, b: int = 4, d: int = 32, device="cpu", dtype=torch.float32, requires_grad=False,
                     seed=0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    return tuple(
        torch.randn(b, n, d, generator=g).to(device=device, dtype=dtype).requires_grad_(requires_grad)
        for _ in range(3)
    )


def attention_explicit(q, k, v, scale=1.0):
    """What one writes without a fused kernel: the n x m matrix, softmax, matmul."""
    return torch.softmax(scale * q @ k.transpose(1, 2), dim=-1) @ v


def attention_step(backend: str, qkv: tuple, backward: bool) -> Callable[[], None]:
    from megan_fast.ops import nonlocal_attention

    grad = None

    def run() -> None:
        nonlocal grad
        if backend == "explicit":
            out = attention_explicit(*qkv)
        else:
            with use_backend(backend):
                out = nonlocal_attention(*qkv, 1.0)
        if backward:
            if grad is None:
                grad = torch.randn_like(out)
            torch.autograd.grad(out, qkv, grad)

    return run


# --------------------------------------------------------------------------- graph aggregation

GRAPH_SHAPE = dict(b=7, p=5, c=64, hd=16, h=64, w=112)


def graph_inputs(b=7, p=5, c=64, hd=16, h=64, w=112, device="cpu", dtype=torch.float32, requires_grad=False,
                 seed=0) -> tuple:
    g = torch.Generator().manual_seed(seed)

    def make(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype).requires_grad_(requires_grad)

    return make(b, p, c, h, w), make(hd, c, scale=c**-0.5), make(hd, scale=0.1), make(hd, scale=hd**-0.5)


def graph_step(backend: str, inputs: tuple, backward: bool) -> Callable[[], None]:
    from megan_fast.ops import graph_aggregate

    grad = None

    def run() -> None:
        nonlocal grad
        with use_backend(backend):
            out = graph_aggregate(*inputs, 0.2)
        if backward:
            if grad is None:
                grad = torch.randn_like(out)
            torch.autograd.grad(out, inputs, grad)

    return run


# --------------------------------------------------------------------------- whole model


def model_step(model, backend: str, x, train: bool, target=None, autocast_dtype: torch.dtype | None = None,
               memory_indices: list[int] | torch.Tensor | None = None,
               times: list[float] | None = None) -> Callable[[], None]:
    """One inference pass (no grad), or one training step's forward + backward (Charbonnier loss).

    ``autocast_dtype`` runs the model under ``torch.autocast`` of ``x``'s device
    type; ``memory_indices`` fixes LMGA's memory frames; ``times`` the in-between times (TMNet).
    """
    kwargs = {} if times is None else {"times": times}

    def run() -> None:
        amp = contextlib.nullcontext() if autocast_dtype is None else torch.autocast(x.device.type, autocast_dtype)
        with use_backend(backend):
            if not train:
                with torch.no_grad(), amp:
                    model(x, memory_indices, **kwargs)
                return
            with amp:
                y = model(x, memory_indices, **kwargs)
            loss = torch.sqrt((y.float() - target) ** 2 + 1e-6).mean()
            loss.backward()
            model.zero_grad(set_to_none=True)

    return run


def cuda_peak_mib(fn: Callable[[], None]) -> float:
    """Peak CUDA memory (MiB) of one call of ``fn`` above what was allocated before it (after a warm-up call)."""
    fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def bench_forward(model, window, runs: int = 3) -> dict:
    """Times one inference forward pass on ``window`` (1, n_in, 3, h, w) with backends "auto" and "stock".

    One warm-up pass per backend, then ``runs`` timed passes, alternating
    between the backends (so that load from other processes hits both alike).

    Returns:
        {"auto_s", "stock_s" (medians, seconds), "speedup" (stock / auto),
        "runs", "auto_backends" ({op: backend that "auto" picks on this device})}.
    """
    from megan_fast.ops import _backend

    cuda = window.device.type == "cuda"
    steps = {b: model_step(model, b, window, train=False) for b in ("auto", "stock")}
    for step in steps.values():
        step()
    times: dict[str, list[float]] = {b: [] for b in steps}
    for _ in range(runs):
        for b, step in steps.items():
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            step()
            if cuda:
                torch.cuda.synchronize()
            times[b].append(time.perf_counter() - start)
    med = {b: sorted(ts)[len(ts) // 2] for b, ts in times.items()}
    with use_backend("auto"):
        chosen = {r["op"]: r["backend"] for r in _backend.describe() if r["device"] == window.device.type}
    return {"auto_s": med["auto"], "stock_s": med["stock"], "speedup": med["stock"] / med["auto"],
            "runs": runs, "auto_backends": chosen}
