"""How every fused op is registered, written once: one op per operation, one kernel per dispatch key.

For an op ``X`` (``modulated_deform_conv2d``, ``nonlocal_attention``, ``graph_aggregate``)::

    megan_fast::X, megan_fast::X_backward    schemas in csrc/megan_ops.cpp (defined here only
                                             when the C++ extension is not built)
        CPU            C++ kernels, csrc/cpu/X.cpp
        CUDA           Triton kernels, megan_fast/triton/X.py (registered here)
        Meta           fake kernels (shapes only), registered here
        Autograd       one formula: setup_context + a backward that calls X_backward
        AutocastCPU,   casts the floating inputs to the dtype the op runs in (float32 on
        AutocastCUDA   CPU, the autocast dtype on CUDA), so that direct torch.ops calls
                       under torch.autocast behave as the public function does

The Triton kernels also run on CPU tensors under ``TRITON_INTERPRET=1``, which
is how CI tests them without a GPU.  That is not a dispatch key of the op:
:func:`interpreted` wraps the same launchers and the same autograd formula in
a ``torch.autograd.Function``, which the ``triton`` backend calls for CPU
tensors (:mod:`megan_fast.ops._backend`).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from megan_fast import _ext

LIB = torch.library.Library("megan_fast", "FRAGMENT")


def _op(qualname: str):
    ns, name = qualname.split("::")
    return getattr(getattr(torch.ops, ns), name).default


def _has_cpu_kernel(qualname: str) -> bool:
    """Whether the C++ extension registered a CPU kernel for ``qualname``."""
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "CPU")
    except RuntimeError:
        return False


def autocast_dtype(device_type: str) -> torch.dtype:
    """The dtype an op runs in under autocast: the autocast dtype on CUDA; float32 on CPU (whose kernels are
    float32/float64)."""
    return torch.float32 if device_type == "cpu" else torch.get_autocast_dtype(device_type)


def check_dtype(fn: str, name: str, t: torch.Tensor, cpu: tuple, gpu: tuple) -> None:
    """The public ops' dtype table: TypeError naming ``name`` unless its dtype runs on its device type.

    Under ``torch.export`` nothing runs (the fake kernels trace shapes): a
    float16 graph may be traced on the CPU for another runtime (ONNX).
    """
    exporting = torch.compiler.is_exporting()
    allowed = cpu if t.device.type == "cpu" and not exporting else gpu + cpu
    if t.dtype not in allowed:
        raise TypeError(
            f"{fn}: {name} dtype {t.dtype} is not supported on {t.device.type}; expected one of "
            + ", ".join(str(d) for d in allowed)
        )


def _cast(args, dtype):
    return tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def autocast_cast(*tensors):
    """The public functions' autocast step (every backend, not only the ops): casts the floating tensors to
    :func:`autocast_dtype` inside ``torch.autocast``, and leaves them alone outside it."""
    first = next(t for t in tensors if t is not None)
    device_type = first.device.type
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return tensors
    return _cast(tensors, autocast_dtype(device_type))


def _register_autocast(qualname: str) -> None:
    """Autocast kernels of an op (the same cast as :func:`autocast_cast`, below the autocast key)."""
    op = _op(qualname)
    name = qualname.split("::")[1]
    for device_type in ("cpu", "cuda"):
        key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        keyset = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

        def run(*args, _device_type=device_type, _keyset=keyset):
            with torch._C._ExcludeDispatchKeyGuard(_keyset):
                return op(*_cast(args, autocast_dtype(_device_type)))

        op.py_impl(getattr(torch._C.DispatchKey, key))(run)  # for tracing (torch.compile)
        LIB.impl(name, lambda _keys, *args, _run=run: _run(*args), key, with_keyset=True)


def interpreted(launchers: tuple[Callable, Callable], make_autograd: Callable) -> Callable:
    """The Triton kernels on CPU tensors (``TRITON_INTERPRET=1``): the launchers with the op's autograd formula.

    Args:
        launchers: the Triton (forward, backward) host launchers, with the op's schemas.
        make_autograd: backward -> (setup_context, backward), as registered for the op.
    """
    launch_fwd, launch_bwd = launchers
    setup_context, backward = make_autograd(launch_bwd)

    class Interpreted(torch.autograd.Function):
        @staticmethod
        def forward(*args):
            return launch_fwd(*args)

        @staticmethod
        def setup_context(ctx, inputs, output):
            setup_context(ctx, inputs, output)

        @staticmethod
        def backward(ctx, *grads):
            return backward(ctx, *grads)

    return Interpreted.apply


@dataclasses.dataclass
class FusedOp:
    """What :func:`register_fused_op` registered for one op."""

    name: str
    op: Callable  # torch.ops.megan_fast.<name>.default
    native: bool  # the C++ CPU kernels are built
    triton_error: str | None  # why the Triton kernels are unavailable, or None
    cpu_triton: Callable | None  # the interpreted Triton path for CPU tensors (see interpreted)

    def availability(self) -> dict[tuple[str, str], str | None]:
        """(backend, device type) -> None if it can run there, else why not (for _backend.register_op)."""
        from megan_fast.ops import _backend

        avail: dict[tuple[str, str], str | None] = {}
        for dt in _backend.DEVICE_TYPES:
            avail[("triton", dt)] = self.triton_error or _backend.triton_status(dt)
            if not self.native:
                avail[("native", dt)] = f"the C++ extension is not built ({_ext.NATIVE_ERROR})"
            elif dt != "cpu":
                avail[("native", dt)] = "the native backend has C++ kernels for CPU tensors only; use 'triton'"
        return avail

    def auto_cpu(self) -> str:
        """What ``auto`` runs on CPU tensors: the C++ kernels, or the reference when they are not built."""
        return "native" if self.native else "reference"

    def cuda_auto(self, measured):
        """What ``auto`` runs on CUDA tensors: ``measured`` (a backend name or a :class:`_backend.PerCall` rule
        from docs/PERFORMANCE.md) once the op's Triton code paths have run on a real GPU
        (:data:`_backend.GPU_VERIFIED`) and Triton can run here; the peer ("stock") otherwise."""
        from megan_fast.ops import _backend

        usable = self.triton_error is None and _backend.triton_status("cuda") is None
        return measured if usable and _backend.gpu_verified(self.name) else "stock"


def register_fused_op(
    name: str,
    fwd_schema: str,
    bwd_schema: str,
    fake_forward: Callable,
    fake_backward: Callable,
    make_autograd: Callable[[Callable], tuple[Callable, Callable]],
    triton: tuple[str, str, str],
) -> FusedOp:
    """Registers the CUDA (Triton), Meta, Autograd and Autocast kernels of op ``name`` and its backward.

    Args:
        name: op name without namespace.
        fwd_schema, bwd_schema: argument/return part of the schemas, as in megan_ops.cpp.
        fake_forward, fake_backward: fake (meta) implementations.
        make_autograd: backward_op -> (setup_context, backward).
        triton: (module in megan_fast.triton, forward launcher, backward launcher) names;
            without Triton installed the op has no CUDA kernel (and says why).
    """
    module, triton_error = import_triton_module(triton[0])
    triton_launchers = (getattr(module, triton[1]), getattr(module, triton[2])) if module is not None else None
    fwd, bwd = f"megan_fast::{name}", f"megan_fast::{name}_backward"
    native = _ext.NATIVE_AVAILABLE and _has_cpu_kernel(fwd)
    if not hasattr(torch.ops.megan_fast, name):  # no C++ extension: the same schemas, from here
        LIB.define(f"{name}{fwd_schema}")
        LIB.define(f"{name}_backward{bwd_schema}")
    if triton_launchers is not None:
        torch.library.register_kernel(fwd, "cuda", triton_launchers[0], lib=LIB)
        torch.library.register_kernel(bwd, "cuda", triton_launchers[1], lib=LIB)
    torch.library.register_fake(fwd, fake_forward, lib=LIB)
    torch.library.register_fake(bwd, fake_backward, lib=LIB)
    setup_context, backward = make_autograd(_op(bwd))
    torch.library.register_autograd(fwd, backward, setup_context=setup_context, lib=LIB)
    _register_autocast(fwd)
    cpu_triton = interpreted(triton_launchers, make_autograd) if triton_launchers is not None else None
    return FusedOp(name, _op(fwd), native, triton_error, cpu_triton)


def import_triton_module(name: str):
    """(module, None) or (None, reason) for megan_fast.triton.<name>."""
    try:
        import importlib

        return importlib.import_module(f"megan_fast.triton.{name}"), None
    except ImportError as exc:
        return None, f"triton kernels unavailable ({exc})"
