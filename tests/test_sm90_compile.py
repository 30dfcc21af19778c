"""The autotuned Triton kernels compile for a Hopper GPU (sm_90) without register spills, checked on any
machine: Triton lowers them to PTX and its bundled ptxas assembles it, no GPU needed.  The interpreter
that runs the kernels elsewhere in CI does not compile them at all, so this is the one test that catches
a kernel that only fails (or spills) on the real target.  ``python -m megan_fast.triton.sm90_compile``
reports every config; it runs in a process of its own here (this one has the interpreter on)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")
try:
    from triton.backends import backends as _backends
except ImportError:  # an older Triton: the compiler is looked up when it runs
    _backends = {"nvidia": None}
if "nvidia" not in _backends:
    pytest.skip("this Triton has no NVIDIA backend to compile for sm_90 with", allow_module_level=True)


def test_first_configs_compile_for_sm90_without_spills():
    env = dict(os.environ, TRITON_INTERPRET="0")
    res = subprocess.run([sys.executable, "-m", "megan_fast.triton.sm90_compile", "--first", "--dtype", "float16"],
                         capture_output=True, text=True, env=env, timeout=900)
    assert res.returncode == 0, res.stdout + res.stderr
    rows = [line for line in res.stdout.splitlines() if line.startswith("| ") and "float16" in line]
    names = {row.split("|")[1].strip() for row in rows}
    assert names == {"dcn forward", "dcn backward (one pass)", "attention dq (computes D)", "attention dkdv",
                     "attention forward"}, res.stdout
    assert "0 config(s) spill" in res.stdout
