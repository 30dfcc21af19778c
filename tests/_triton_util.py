"""Shared preamble of the Triton kernel tests: where they run, and the skips.

Importing this module skips the importing test module when Triton is missing,
or when there is no GPU and the interpreter is off (TRITON_INTERPRET=1 must be
set before triton is imported: tests/conftest.py does it).
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip(
        "no GPU and TRITON_INTERPRET != 1: the Triton kernels can run on CPU tensors only under the "
        "interpreter, which must be enabled before triton is imported",
        allow_module_level=True,
    )

cuda_only = pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA GPU (fp16/bf16 and GPU-sized problems)")


@pytest.fixture(params=["current", "previous"])
def kernel_generation(request, monkeypatch):
    """Runs a test once per generation of the Triton kernels (megan_fast/triton/_utils.kernel_generation):
    the current ones and the previous ones they replace, both reachable until measured on a GPU."""
    monkeypatch.setenv("MEGAN_FAST_TRITON_KERNELS", request.param)
    return request.param


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
