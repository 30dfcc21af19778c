"""nonlocal_attention on CPU, float32, b=4, d=32: native vs stock (SDPA) vs the explicit formula.

    pytest benchmarks/test_bench_nonlocal_attention.py --benchmark-only --benchmark-group-by=group
"""

import pytest
import torch

from megan_fast import benchmarking
from megan_fast.ops import _library

HAS_NATIVE = _library._has_cpu_kernel("megan_fast::nonlocal_attention") if hasattr(torch.ops, "megan_fast") else False


@pytest.mark.parametrize("backend", ["native", "stock", "explicit"])
@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("n", benchmarking.ATTENTION_SIZES)
def test_attention_cpu(benchmark, n, pass_, backend):
    if backend == "native" and not HAS_NATIVE:
        pytest.skip("C++ kernel not built")
    benchmark.group = f"attention n={n} {pass_}"
    backward = pass_ == "fwd+bwd"
    qkv = benchmarking.attention_inputs(n, requires_grad=backward)
    rounds = 3 if (backend == "explicit" and n > 2000) else 10
    benchmark.pedantic(benchmarking.attention_step(backend, qkv, backward), rounds=rounds, warmup_rounds=1)
