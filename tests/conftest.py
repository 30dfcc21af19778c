"""Test set-up: without a GPU, the Triton kernels run on CPU tensors under the interpreter.

TRITON_INTERPRET must be set before triton or megan_fast is imported.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# Small random models drive recurrent states (ConvLSTM) into denormal floats,
# which make CPU arithmetic ~10x slower without changing any comparison here.
torch.set_flush_denormal(True)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
