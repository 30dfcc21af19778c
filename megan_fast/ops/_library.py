"""The pattern every fused op follows in torch.library, written once.

Each op ``X`` has a forward op and a backward op:
    megan_fast::X, megan_fast::X_backward                  schema in csrc/megan_ops.cpp,
                                                            C++ CPU kernel, Triton CUDA kernel
    megan_fast::X_triton, megan_fast::X_triton_backward    defined here (same schema), Triton
                                                            kernels for CPU (interpreter) and CUDA
Both pairs share one fake implementation and one autograd formula, whose
backward calls the pair's registered backward op.
"""

from __future__ import annotations

from typing import Callable

import torch

from megan_fast import _ext

LIB = torch.library.Library("megan_fast", "FRAGMENT")


def _op(qualname: str):
    ns, name = qualname.split("::")
    return getattr(getattr(torch.ops, ns), name).default


def _has_cpu_kernel(qualname: str) -> bool:
    """Whether the C++ extension registered a CPU kernel for ``qualname`` (it may predate the op)."""
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "CPU")
    except RuntimeError:
        return False


def register_fused_op(
    name: str,
    fwd_schema: str,
    bwd_schema: str,
    fake_forward: Callable,
    fake_backward: Callable,
    make_autograd: Callable[[Callable], tuple[Callable, Callable]],
    triton_launchers: tuple[Callable, Callable] | None,
) -> tuple[str | None, str]:
    """Registers fakes, autograd and Triton kernels for op ``name``.

    Args:
        name: op name without namespace.
        fwd_schema, bwd_schema: argument/return part of the schemas (as in megan_ops.cpp).
        fake_forward, fake_backward: fake (meta) implementations.
        make_autograd: backward_op -> (setup_context, backward).
        triton_launchers: the Triton (forward, backward) host launchers, or None
            when Triton is not installed.

    Returns:
        (native qualname or None when the C++ extension is not built, triton qualname).
    """
    triton_fwd = f"megan_fast::{name}_triton"
    LIB.define(f"{name}_triton{fwd_schema}")
    LIB.define(f"{name}_triton_backward{bwd_schema}")
    pairs = [(triton_fwd, f"{triton_fwd}_backward")]
    native_fwd = None
    if _ext.NATIVE_AVAILABLE and _has_cpu_kernel(f"megan_fast::{name}"):
        native_fwd = f"megan_fast::{name}"
        pairs.append((native_fwd, f"{native_fwd}_backward"))

    if triton_launchers is not None:
        launch_fwd, launch_bwd = triton_launchers
        for dev in ("cpu", "cuda"):
            torch.library.register_kernel(pairs[0][0], dev, launch_fwd, lib=LIB)
            torch.library.register_kernel(pairs[0][1], dev, launch_bwd, lib=LIB)
        if native_fwd is not None:
            # The C++ op also runs on CUDA tensors, through the Triton kernels.
            torch.library.register_kernel(pairs[1][0], "cuda", launch_fwd, lib=LIB)
            torch.library.register_kernel(pairs[1][1], "cuda", launch_bwd, lib=LIB)

    for fwd, bwd in pairs:
        torch.library.register_fake(fwd, fake_forward, lib=LIB)
        torch.library.register_fake(bwd, fake_backward, lib=LIB)
        setup_context, backward = make_autograd(_op(bwd))
        torch.library.register_autograd(fwd, backward, setup_context=setup_context, lib=LIB)
    return native_fwd, triton_fwd


def import_triton_module(name: str):
    """(module, None) or (None, reason) for megan_fast.triton.<name>."""
    try:
        import importlib

        return importlib.import_module(f"megan_fast.triton.{name}"), None
    except ImportError as exc:
        return None, f"triton kernels unavailable ({exc})"


def availability(native_op: str | None, triton_error: str | None) -> dict[tuple[str, str], str | None]:
    """(backend, device type) -> None if it can run there, else why not (for _backend.register_op)."""
    from megan_fast.ops import _backend

    avail: dict[tuple[str, str], str | None] = {}
    for dt in _backend.DEVICE_TYPES:
        avail[("triton", dt)] = triton_error or _backend.triton_status(dt)
        if native_op is None:
            avail[("native", dt)] = f"the C++ extension is not built ({_ext.NATIVE_ERROR})"
        elif dt != "cpu":
            avail[("native", dt)] = "the native backend has C++ kernels for CPU tensors only; use 'triton'"
    return avail


def auto_choice(native_op: str | None, triton_error: str | None, cpu: str = "native", cuda: str = "triton") -> dict:
    """Device type -> backend for ``auto``, given the measured preference and what is available."""
    from megan_fast.ops import _backend

    if cpu == "native" and native_op is None:
        cpu = "reference"
    if cuda in ("triton", "triton_or_stock") and (
            triton_error is not None or _backend.triton_status("cuda") is not None):
        cuda = "stock"
    return {"cpu": cpu, "cuda": cuda}


def autocast_cast(*tensors):
    """Casts the floating tensors to the dtype the op runs in under autocast (no-op outside autocast).

    Under ``torch.autocast`` the callers' tensors arrive in mixed dtypes
    (activations in bf16/fp16, parameters in fp32).  On CUDA the op then runs
    in the autocast dtype; on CPU, whose kernels are float32/float64, in float32.
    """
    first = next(t for t in tensors if t is not None)
    device_type = first.device.type
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.float32 if device_type == "cpu" else torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors)
