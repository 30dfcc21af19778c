"""Backend choice for the fused ops, made once (not per call).

Backends:
    native     C++ kernels in csrc/ (CPU tensors).
    triton     Triton kernels in megan_fast/triton/ (CUDA tensors; CPU tensors
               only under ``TRITON_INTERPRET=1``, which is how CI tests them).
    reference  plain PyTorch, obviously correct, slow.
    stock      what a user would assemble from existing parts (torchvision's
               deform_conv2d, ``F.scaled_dot_product_attention``, ...).
    auto       the fastest measured implementation for the tensor's device.

The default comes from the environment variable ``MEGAN_FAST_BACKEND`` (``auto``
if unset); :func:`use_backend` changes it for a block, in the calling thread
only (a :class:`threading.local`: other threads keep theirs; ``torch.compile``
traces both the look-up, guarding on it, and a ``use_backend`` block inside
a compiled function), and :func:`set_backend` for the rest of the calling
thread.  Every op registers
one implementation per backend (per device type where they differ:
``triton`` on CPU tensors is the interpreted path of
:func:`megan_fast.ops._library.interpreted`); the choices are resolved into
tables ``backend -> op -> device type -> callable`` when an op is
registered, so a call costs two dictionary look-ups.  What ``auto`` runs is
a backend per device type, or a :class:`PerCall` rule (measured in
docs/PERFORMANCE.md) that picks one of named backends from the call's
arguments; on CUDA only where the op's Triton code paths have run on a real
GPU (:data:`GPU_VERIFIED`), the peer otherwise; ``megan-fast info`` shows
both.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import threading
from typing import Callable, Iterator, Union

import torch

BACKENDS = ("auto", "native", "triton", "reference", "stock")
DEVICE_TYPES = ("cpu", "cuda")
ENV_VAR = "MEGAN_FAST_BACKEND"


def _check_name(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source}: unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
    return name


@functools.lru_cache(maxsize=None)
def triton_status(device_type: str) -> str | None:
    """None if Triton kernels can run on ``device_type``, else the reason why not."""
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"triton is not installed ({exc})"
    if device_type == "cuda":
        return None if torch.cuda.is_available() else "no CUDA device"
    if device_type == "cpu":
        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            return None
        return "Triton runs on CPU tensors only under TRITON_INTERPRET=1 (set before import)"
    return f"no Triton support for device type {device_type!r}"


@dataclasses.dataclass(frozen=True)
class PerCall:
    """An ``auto`` rule: ``pick(*args)`` names the backend (one of ``backends``) for each call."""

    backends: tuple[str, ...]
    pick: Callable[..., str]
    rule: str  # in words, for megan-fast info

    @property
    def name(self) -> str:
        return " or ".join(self.backends)


Choice = Union[str, PerCall]


# Triton code paths on CUDA that have run on a real GPU: the Triton tests passed there and
# benchmarks/gpu_summary.py measured them (docs/PERFORMANCE.md, "GPU-verified paths").  Until both
# passes of an op are verified, ``auto`` runs its peer (torchvision, SDPA, the plain formula) on CUDA.
GPU_VERIFIED: dict[str, dict[str, bool]] = {
    # The autotuned forward and the one-pass backward: under the interpreter and compiled for sm_90 only.
    "modulated_deform_conv2d": {"forward": False, "backward": False},
    # The autotuned forward and the backward whose dQ kernel computes D: the same.
    "nonlocal_attention": {"forward": False, "backward": False},
    # Unchanged since the H100 session of docs/PERFORMANCE.md, "GPU (H100)".
    "graph_aggregate": {"forward": True, "backward": True},
    # Never run on a GPU.
    "upsample_bilinear2x": {"forward": False, "backward": False},
}


def gpu_verified(op: str) -> bool:
    """Whether every CUDA code path of op ``op``'s Triton kernels has run on a real GPU (:data:`GPU_VERIFIED`)."""
    return all(GPU_VERIFIED.get(op, {"forward": False}).values())


class _Registry:
    def __init__(self) -> None:
        self.impls: dict[str, dict[str, Callable | dict[str, Callable]]] = {}
        self.available: dict[str, dict[tuple[str, str], str | None]] = {}
        self.auto: dict[str, dict[str, Choice]] = {}
        # backend name -> op -> device type -> callable, for every backend name
        self.tables: dict[str, dict[str, dict[str, Callable]]] = {name: {} for name in BACKENDS}


_REG = _Registry()
# The backend in force in each thread (attribute ``name``); the environment variable gives the default.
_DEFAULT = _check_name(os.environ.get(ENV_VAR, "auto"), ENV_VAR)
_LOCAL = threading.local()


def register_op(
    op: str,
    impls: dict[str, Callable | dict[str, Callable]],
    available: dict[tuple[str, str], str | None],
    auto: dict[str, Choice],
) -> None:
    """Registers an op's implementations.

    Args:
        op: op name, e.g. ``"modulated_deform_conv2d"``.
        impls: backend name -> callable, or -> {device type: callable} (all but ``auto``).
        available: (backend, device type) -> None if it runs there, else the
            reason it does not (missing pairs mean available).
        auto: device type -> backend (or :class:`PerCall` rule) that ``auto`` uses there.
    """
    _REG.impls[op] = dict(impls)
    _REG.available[op] = dict(available)
    _REG.auto[op] = dict(auto)
    _rebuild(op)


def _unavailable(op: str, backend: str, device_type: str, reason: str) -> Callable:
    def fail(*args, **kwargs):
        raise RuntimeError(
            f"megan_fast.ops.{op}: backend {backend!r} cannot run on {device_type} tensors: {reason}. "
            f"Choose another with megan_fast.ops.use_backend(...) or {ENV_VAR}."
        )

    return fail


def backend_for(op: str, device_type: str, name: str | None = None) -> Choice:
    """The backend (or per-call rule) that op ``op`` uses for tensors of ``device_type`` under backend ``name``
    (default: the one in force)."""
    name = get_backend() if name is None else name
    if name != "auto":
        return name
    return _REG.auto[op].get(device_type, "reference")


def _impl_for(op: str, backend: str, device_type: str) -> Callable:
    reason = _REG.available[op].get((backend, device_type))
    if reason is not None:
        return _unavailable(op, backend, device_type, reason)
    found = _REG.impls[op][backend]
    if isinstance(found, dict):
        if device_type not in found:
            return _unavailable(op, backend, device_type, "no kernel for this device")
        return found[device_type]
    return found


def _resolve(op: str, device_type: str, name: str) -> Callable:
    choice = backend_for(op, device_type, name)
    if isinstance(choice, PerCall):
        chosen = {b: _impl_for(op, b, device_type) for b in choice.backends}
        pick = choice.pick
        return lambda *args: chosen[pick(*args)](*args)
    return _impl_for(op, choice, device_type)


def _rebuild(op: str) -> None:
    for name in BACKENDS:
        _REG.tables[name][op] = {dt: _resolve(op, dt, name) for dt in DEVICE_TYPES}


def impl(op: str, device_type: str) -> Callable:
    """The callable that runs ``op`` for tensors of ``device_type`` under the backend in force."""
    name = get_backend()
    table = _REG.tables[name][op]
    if device_type in table:
        return table[device_type]
    if device_type == "meta":
        # Shape propagation (FLOP counting, fake tensors): the op's fake kernel.
        backend = "native" if name in ("auto", "native", "triton") else name
        return _REG.impls[op][backend]
    # Other devices (mps, xpu, ...) run the plain-PyTorch reference unless a
    # specific backend was asked for.
    if name in ("auto", "reference"):
        return _REG.impls[op]["reference"]
    return _unavailable(op, name, device_type, "no kernel for this device")


def get_backend() -> str:
    """The backend name in force in this thread (``auto`` unless changed)."""
    return getattr(_LOCAL, "name", _DEFAULT)


def set_backend(name: str) -> None:
    """Sets the backend for the rest of the calling thread (other threads keep theirs)."""
    _LOCAL.name = _check_name(name, "set_backend(name)")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Runs the block with backend ``name`` for every op, then restores the previous one.

    Only the calling thread is affected: other threads go on with their own
    backend.  ``torch.compile`` traces it, inside a compiled function too,
    and guards on the choice (another backend compiles again).

    Example:
        >>> with megan_fast.ops.use_backend("reference"):
        ...     y = modulated_deform_conv2d(x, offset, weight, mask=mask)
    """
    checked = _check_name(name, "use_backend(name)")
    previous = get_backend()
    _LOCAL.name = checked
    try:
        yield
    finally:
        _LOCAL.name = previous


def describe() -> list[dict[str, str]]:
    """One row per (op, device type): backend in use and availability, for ``megan-fast info``."""
    rows = []
    for op in sorted(_REG.impls):
        for dt in DEVICE_TYPES:
            choice = backend_for(op, dt)
            if isinstance(choice, PerCall):
                reasons = [_REG.available[op].get((b, dt)) for b in choice.backends]
                status = next((r for r in reasons if r is not None), None) or f"per call: {choice.rule}"
                rows.append({"op": op, "device": dt, "backend": choice.name, "status": status})
                continue
            reason = _REG.available[op].get((choice, dt))
            rows.append({"op": op, "device": dt, "backend": choice, "status": "ok" if reason is None else reason})
    return rows
