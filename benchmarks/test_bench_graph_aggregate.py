"""graph_aggregate on CPU, float32, b=7, p=5, c=64, hd=16, 64x112: native vs the plain formula.

    pytest benchmarks/test_bench_graph_aggregate.py --benchmark-only --benchmark-group-by=group
"""

import pytest
import torch

from megan_fast import benchmarking
from megan_fast.ops import _library

HAS_NATIVE = _library._has_cpu_kernel("megan_fast::graph_aggregate") if hasattr(torch.ops, "megan_fast") else False


@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
def test_graph_cpu(benchmark, pass_, backend):
    if backend == "native" and not HAS_NATIVE:
        pytest.skip("C++ kernel not built")
    benchmark.group = f"graph_aggregate {pass_}"
    backward = pass_ == "fwd+bwd"
    inputs = benchmarking.graph_inputs(requires_grad=backward)
    benchmark.pedantic(benchmarking.graph_step(backend, inputs, backward), rounds=5, warmup_rounds=1)
