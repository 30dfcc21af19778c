"""Whole MEGAN on CPU: inference and a training step, ``auto`` backend vs ``stock``.

    pytest benchmarks/test_bench_megan.py --benchmark-only --benchmark-group-by=group

stock = torchvision's deform_conv2d + SDPA + the plain graph formula.
"""

import pytest
import torch

from megan_fast import benchmarking
from megan_fast.models import MEGAN


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MEGAN()


@pytest.mark.parametrize("backend", ["auto", "stock"])
def test_megan_inference_cpu(benchmark, model, backend):
    """One 4-frame window at 64x112 input -> 7 frames of 256x448."""
    benchmark.group = "megan inference 64x112 (7 output frames)"
    model.eval()
    x = torch.rand(1, 4, 3, 64, 112)
    benchmark.pedantic(benchmarking.model_step(model, backend, x, train=False), rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("backend", ["auto", "stock"])
def test_megan_train_step_cpu(benchmark, model, backend):
    """Batch 2 of 32x32 LR crops, forward + backward of the Charbonnier loss."""
    benchmark.group = "megan training step b=2 32x32"
    model.train()
    x = torch.rand(2, 4, 3, 32, 32)
    target = torch.rand(2, 7, 3, 128, 128)
    step = benchmarking.model_step(model, backend, x, train=True, target=target)
    # Same memory-frame draws for both backends.
    benchmark.pedantic(lambda: (torch.manual_seed(0), step()), rounds=3, warmup_rounds=1)
