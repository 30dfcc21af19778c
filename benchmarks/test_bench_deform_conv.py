"""modulated_deform_conv2d: native (C++) vs stock (torchvision) vs reference, CPU float32.

    pytest benchmarks/ --benchmark-only --benchmark-group-by=param:case,param:pass

Compare ``native`` with ``stock`` in the same group; the figures go into
docs/PERFORMANCE.md.
"""

import pytest
import torch

import megan_fast
from megan_fast import benchmarking

BACKENDS = ["native", "stock", "reference"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("case", benchmarking.DCN_CASES, ids=[c.name for c in benchmarking.DCN_CASES])
def test_dcn_cpu(benchmark, case, pass_, backend):
    if backend == "native" and not megan_fast._ext.NATIVE_AVAILABLE:
        pytest.skip(f"C++ extension not built: {megan_fast._ext.NATIVE_ERROR}")
    benchmark.group = f"dcn {case.name} {pass_}"
    benchmark.extra_info["threads"] = torch.get_num_threads()
    backward = pass_ == "fwd+bwd"
    inputs = benchmarking.dcn_inputs(case, requires_grad=backward)
    rounds = 3 if backend == "reference" else 10
    benchmark.pedantic(benchmarking.dcn_step(backend, inputs, backward), rounds=rounds, warmup_rounds=1)
