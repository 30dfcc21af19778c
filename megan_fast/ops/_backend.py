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
if unset); :func:`use_backend` changes it for a block, :func:`set_backend` for
good.  Every op registers one implementation per backend (per device type
where they differ: ``triton`` on CPU tensors is the interpreted path of
:func:`megan_fast.ops._library.interpreted`); the choice is resolved into a
table ``op -> device type -> callable`` whenever the backend changes, so a
call costs one dictionary look-up.  What ``auto`` runs is a backend per device
type, or a :class:`PerCall` rule (measured in docs/PERFORMANCE.md) that picks
one of named backends from the call's arguments; ``megan-fast info`` shows it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
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


class _Registry:
    def __init__(self) -> None:
        self.impls: dict[str, dict[str, Callable | dict[str, Callable]]] = {}
        self.available: dict[str, dict[tuple[str, str], str | None]] = {}
        self.auto: dict[str, dict[str, Choice]] = {}
        self.table: dict[str, dict[str, Callable]] = {}
        self.name = _check_name(os.environ.get(ENV_VAR, "auto"), ENV_VAR)


_REG = _Registry()


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


def backend_for(op: str, device_type: str) -> Choice:
    """The backend (or per-call rule) that op ``op`` uses for tensors of ``device_type`` now."""
    if _REG.name != "auto":
        return _REG.name
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


def _resolve(op: str, device_type: str) -> Callable:
    choice = backend_for(op, device_type)
    if isinstance(choice, PerCall):
        chosen = {b: _impl_for(op, b, device_type) for b in choice.backends}
        pick = choice.pick
        return lambda *args: chosen[pick(*args)](*args)
    return _impl_for(op, choice, device_type)


def _rebuild(op: str) -> None:
    _REG.table[op] = {dt: _resolve(op, dt) for dt in DEVICE_TYPES}


def impl(op: str, device_type: str) -> Callable:
    """The callable that runs ``op`` for tensors of ``device_type``."""
    table = _REG.table[op]
    if device_type in table:
        return table[device_type]
    if device_type == "meta":
        # Shape propagation (FLOP counting, fake tensors): the op's fake kernel.
        backend = "native" if _REG.name in ("auto", "native", "triton") else _REG.name
        return _REG.impls[op][backend]
    # Other devices (mps, xpu, ...) run the plain-PyTorch reference unless a
    # specific backend was asked for.
    if _REG.name in ("auto", "reference"):
        return _REG.impls[op]["reference"]
    return _unavailable(op, _REG.name, device_type, "no kernel for this device")


def get_backend() -> str:
    """The backend name in force (``auto`` unless changed)."""
    return _REG.name


def set_backend(name: str) -> None:
    """Sets the backend for all ops until changed again."""
    _REG.name = _check_name(name, "set_backend(name)")
    for op in _REG.impls:
        _rebuild(op)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Runs the block with backend ``name`` for every op, then restores the previous one.

    Example:
        >>> with megan_fast.ops.use_backend("reference"):
        ...     y = modulated_deform_conv2d(x, offset, weight, mask=mask)
    """
    previous = _REG.name
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


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
