"""Where the Triton kernels run in the tests, and the skips.

On a machine with a GPU they run on CUDA tensors; without one, on CPU tensors
under the interpreter (TRITON_INTERPRET=1 must be set before triton is
imported: tests/conftest.py does it).  Without Triton, or without a GPU and
with the interpreter off, they cannot run: the tests that need them skip
with that reason.  Test files that hold only Triton tests call
:func:`skip_module_without_triton` at import; harnesses of every backend put
:func:`triton_param` among their backends.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DEVICE = TRITON_DEVICE  # (the name the Triton-only test files use)

if importlib.util.find_spec("triton") is None:
    SKIP_REASON: str | None = "triton is not installed"
elif TRITON_DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    SKIP_REASON = ("no GPU and TRITON_INTERPRET != 1: the Triton kernels can run on CPU tensors only under the "
                   "interpreter, which must be enabled before triton is imported")
else:
    SKIP_REASON = None

cuda_only = pytest.mark.skipif(TRITON_DEVICE != "cuda", reason="needs a CUDA GPU (fp16/bf16 and GPU-sized problems)")


def skip_module_without_triton() -> None:
    """Skips the calling test module where the Triton kernels cannot run."""
    if SKIP_REASON is not None:
        pytest.skip(SKIP_REASON, allow_module_level=True)


def require_triton() -> None:
    """Skips the calling test where the Triton kernels cannot run."""
    if SKIP_REASON is not None:
        pytest.skip(SKIP_REASON)


def triton_param():
    """The backend name "triton" as a pytest parameter that skips where the Triton kernels cannot run."""
    return pytest.param("triton", marks=pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or ""))


def launched_kernels(monkeypatch, module) -> list[str]:
    """Records the name of every kernel the launchers of ``module`` start (through its ``launch``)."""
    names: list[str] = []
    real = module.launch

    def recording(kernel, *args, **kwargs):
        fn = kernel
        while hasattr(fn, "fn"):  # autotuner / heuristics wrappers -> the jitted function
            fn = fn.fn
        names.append(getattr(fn, "__name__", repr(fn)))
        return real(kernel, *args, **kwargs)

    monkeypatch.setattr(module, "launch", recording)
    return names
