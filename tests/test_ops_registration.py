"""How the ops are registered: one op per operation, autocast kernels, per-call auto rules, the native build."""

from __future__ import annotations

import torch

import megan_fast
from megan_fast.ops import (
    _backend, _library, graph_aggregate, modulated_deform_conv2d, nonlocal_attention, upsample_bilinear2x,
)

OPS = ("modulated_deform_conv2d", "nonlocal_attention", "graph_aggregate", "upsample_bilinear2x")


def test_the_cpp_extension_is_built_and_registers_every_cpu_kernel():
    # CI must fail, not skip, when the C++ extension did not build: every native test depends on this.
    assert megan_fast._ext.NATIVE_AVAILABLE, megan_fast._ext.NATIVE_ERROR
    for name in OPS:
        for qualname in (f"megan_fast::{name}", f"megan_fast::{name}_backward"):
            assert _library._has_cpu_kernel(qualname), qualname


def test_one_op_per_operation():
    names = {n for n in dir(torch.ops.megan_fast) if not n.startswith("_")}
    assert names >= {*OPS, *(f"{n}_backward" for n in OPS)}
    assert not [n for n in names if "triton" in n]  # no twin ops: the Triton kernels are the CUDA kernels
    for name in OPS:
        op = getattr(torch.ops.megan_fast, name).default
        for key in ("CPU", "Meta", "Autograd", "AutocastCPU", "AutocastCUDA"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), key), (name, key)


def test_direct_op_calls_under_autocast_behave_like_the_public_functions():
    torch.manual_seed(0)
    x = torch.randn(1, 4, 5, 6)
    offset = torch.randn(1, 2 * 9, 5, 6) * 0.5
    weight = torch.randn(3, 4, 3, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        xb = x.to(torch.bfloat16)  # an activation in bf16, parameters in fp32: mixed dtypes
        direct = torch.ops.megan_fast.modulated_deform_conv2d(xb, offset, weight, None, None, [1, 1], [1, 1], [1, 1])
        public = modulated_deform_conv2d(xb, offset, weight, padding=1)
    assert direct.dtype == public.dtype == torch.float32  # CPU kernels run in float32 under autocast
    torch.testing.assert_close(direct, public, rtol=0, atol=0)
    q, k, v = (torch.randn(2, 7, 4) for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = torch.ops.megan_fast.nonlocal_attention(q.to(torch.bfloat16), k, v, 1.0)
        public = nonlocal_attention(q.to(torch.bfloat16), k, v)
    torch.testing.assert_close(out, public, rtol=0, atol=0)
    nodes, w1, b1, w2 = torch.randn(1, 3, 4, 2, 2), torch.randn(5, 4), torch.randn(5), torch.randn(5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = torch.ops.megan_fast.graph_aggregate(nodes.to(torch.bfloat16), w1, b1, w2, 0.2, False)
        public = graph_aggregate(nodes.to(torch.bfloat16), w1, b1, w2)
    torch.testing.assert_close(out, public, rtol=0, atol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = torch.ops.megan_fast.upsample_bilinear2x(x.to(torch.bfloat16), 2.0)
        public = upsample_bilinear2x(x.to(torch.bfloat16), 2.0)
    torch.testing.assert_close(out, public, rtol=0, atol=0)


def test_a_per_call_auto_rule_dispatches_and_is_described():
    calls = []
    impls = {b: (lambda *a, _b=b: calls.append(_b) or _b) for b in ("native", "triton", "reference", "stock")}
    rule = _backend.PerCall(("native", "reference"), lambda x: "native" if x > 0 else "reference", "positive: native")
    _backend.register_op("toy_op", impls, {}, {"cpu": rule, "cuda": "stock"})
    try:
        fn = _backend.impl("toy_op", "cpu")
        assert [fn(1), fn(-1)] == ["native", "reference"]
        rows = [r for r in _backend.describe() if r["op"] == "toy_op"]
        assert rows[0] == {"op": "toy_op", "device": "cpu", "backend": "native or reference",
                           "status": "per call: positive: native"}
        with _backend.use_backend("stock"):
            assert _backend.impl("toy_op", "cpu")(5) == "stock"
    finally:
        for table in (_backend._REG.impls, _backend._REG.available, _backend._REG.auto,
                      *_backend._REG.tables.values()):
            table.pop("toy_op", None)


def test_every_cpu_code_path_is_honoured_and_correct():
    """MEGAN_FAST_CPU_ISA caps the code path of every C++ kernel (one dispatch, csrc/cpu/isa.h)."""
    import subprocess
    import sys

    best = torch.ops.megan_fast.cpu_isa()
    order = ["baseline", "avx2", "avx512"]
    script = (
        "import torch\n"
        "from megan_fast.ops import graph_aggregate, modulated_deform_conv2d, nonlocal_attention, use_backend\n"
        "from megan_fast.ops import upsample_bilinear2x\n"
        "torch.manual_seed(0)\n"
        "x, off, m, w = torch.randn(1, 8, 5, 6, dtype=torch.float64), torch.randn(1, 36, 5, 6, dtype=torch.float64), "
        "torch.rand(1, 18, 5, 6, dtype=torch.float64), torch.randn(4, 8, 3, 3, dtype=torch.float64)\n"
        "q, k, v = (torch.randn(2, 37, 32, dtype=torch.float64) for _ in range(3))\n"
        "nodes, w1, b1, w2 = torch.randn(1, 5, 64, 3, 5, dtype=torch.float64), torch.randn(16, 64, dtype=torch.float64), "
        "torch.randn(16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)\n"
        "calls = [lambda: modulated_deform_conv2d(x, off, w, padding=1, mask=m), lambda: nonlocal_attention(q, k, v), "
        "lambda: graph_aggregate(nodes, w1, b1, w2), lambda: upsample_bilinear2x(x, 2.0)]\n"
        "for f in calls:\n"
        "    with use_backend('native'):\n"
        "        a = f()\n"
        "    with use_backend('reference'):\n"
        "        b = f()\n"
        "    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)\n"
        "print(torch.ops.megan_fast.cpu_isa())\n"
    )
    for cap in ("baseline", "avx2"):
        res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                             env={**__import__("os").environ, "MEGAN_FAST_CPU_ISA": cap})
        assert res.returncode == 0, res.stderr[-2000:]
        want = cap if order.index(cap) <= order.index(best) else best
        assert res.stdout.strip() == want
