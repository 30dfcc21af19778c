"""Host and JIT helpers shared by the Triton kernels of every op (one home, as Liger-Kernel's ops/utils.py).

The public ops (megan_fast/ops/) check arguments, shapes and dtypes; the
launchers here only assert what the kernels rely on (:func:`expect`), with a
RuntimeError that Python's ``-O`` does not strip.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = [
    "INTERPRET", "Precision", "dot", "expect", "launch", "num_sms", "numel_needs_int64", "precision", "runnable",
    "strided_needs_int64", "tf32_allowed",
]

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"  # read once: triton reads it at import too
INT32_LIMIT = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class Precision:
    """How a Triton kernel computes for one dtype on one device (:func:`precision`)."""

    ieee: bool  # fp32 / fp64 tl.dot tiles as exact IEEE products (the kernels' IEEE constexpr)
    compute: object  # the kernels' CDT: the triton type of accumulators and element-wise work
    accumulate: torch.dtype  # the same as a torch dtype: buffers of atomics and partial sums


def precision(dtype: torch.dtype, device: torch.device) -> Precision:
    """The one precision table of the Triton kernels, honoured by all four ops (docs/DESIGN.md section 2).

    ========  ======================  ======================================  ============
    dtype     device                  tl.dot products                         accumulation
    ========  ======================  ======================================  ============
    float16   cuda                    float16 operands (tensor cores)         float32
    bfloat16  cuda                    bfloat16 operands (tensor cores)        float32
    float32   cuda, TF32 not allowed  exact IEEE products                     float32
    float32   cuda, TF32 allowed      TF32 (:func:`tf32_allowed`)             float32
    float32   cpu (interpreter)       exact (numpy)                           float32
    float64   cpu (interpreter)       exact (numpy)                           float64
    float64   cuda                    refused by :func:`runnable`             -
    ========  ======================  ======================================  ============

    TF32 is allowed as for torch's own matmuls: by the user, never by default.
    """
    if dtype == torch.float64:
        return Precision(True, tl.float64, torch.float64)
    ieee = dtype == torch.float32 and not (device.type == "cuda" and tf32_allowed())
    return Precision(ieee, tl.float32, torch.float32)


def tf32_allowed() -> bool:
    """Whether the user allowed TF32 for fp32 matrix products, by either of torch's settings: the current one
    (``torch.backends.cuda.matmul.fp32_precision = "tf32"``, or ``torch.backends.fp32_precision``) or the legacy
    ``allow_tf32`` (reading the legacy flag after the new one was set raises in torch >= 2.9; the new one
    reflects both)."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision is not None:
        return precision == "tf32"
    return bool(matmul.allow_tf32)


@triton.jit
def dot(a, b, acc, IEEE: tl.constexpr):
    """acc + a @ b (acc may be None), accumulated in acc's type.  IEEE: exact fp32/fp64 products (no TF32)."""
    if IEEE:
        r = tl.dot(a, b, acc, input_precision="ieee")
    else:
        r = tl.dot(a, b, acc)
    return r


def expect(condition: bool, what: str) -> None:
    """The launchers' assertion: raises RuntimeError(``what``) when a kernel's precondition does not hold."""
    if not condition:
        raise RuntimeError(f"megan_fast Triton kernels: {what}")


def runnable(t: Tensor, op: str) -> None:
    """Raises RuntimeError for CPU tensors without the interpreter (TRITON_INTERPRET=1 set before import), and
    TypeError for float64 on a GPU (the kernels' GPU tiles are sized for 16- and 32-bit types; the C++ kernels
    cover float64)."""
    if t.device.type == "cpu" and not INTERPRET:
        raise RuntimeError(f"{op} (triton): CPU tensors need TRITON_INTERPRET=1 set before triton is imported")
    if t.device.type != "cpu" and t.dtype == torch.float64:
        raise TypeError(f"{op} (triton): float64 is not supported on the GPU; use float32, or the CPU kernels "
                        "for float64")


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (1 for anything else: the interpreter)."""
    if device.type != "cuda":
        return 1
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def numel_needs_int64(*tensors: Tensor | None) -> bool:
    """Whether a kernel that addresses whole tensors may form element offsets beyond int32 (more than 2^30
    elements: half the range, a margin for offsets built from several terms)."""
    return any(t is not None and t.numel() > INT32_LIMIT // 2 for t in tensors)


def strided_needs_int64(*tensors: Tensor) -> bool:
    """Whether some in-batch element offset (rows * row stride + ...) may exceed int32 (kernels that add the
    batch offset in int64 themselves)."""
    for t in tensors:
        if sum((s - 1) * abs(st) for s, st in zip(t.shape[1:], t.stride()[1:]) if s > 0) > INT32_LIMIT:
            return True
    return False


def launch(kernel, grid, args: tuple, meta: dict, op: str, dtype: torch.dtype, device: torch.device) -> None:
    """``kernel[grid](*args, **meta)``; float64 on a GPU whose Triton has no fp64 ``tl.dot`` gives a TypeError
    that says so (the CPU kernels cover float64)."""
    try:
        kernel[grid](*args, **meta)
    except Exception as exc:  # noqa: BLE001 - re-raised with a clearer message
        if dtype == torch.float64 and device.type == "cuda":
            raise TypeError(
                f"{op} (triton): float64 tl.dot is not supported by this Triton / GPU combination "
                f"({type(exc).__name__}: {exc}); use float32, or the CPU backend for float64"
            ) from exc
        raise
