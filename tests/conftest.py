"""Test set-up: without a GPU, the Triton kernels run on CPU tensors under the interpreter.

TRITON_INTERPRET must be set before triton or megan_fast is imported.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):  # one of several test processes: a core each, for the children too
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["TORCHINDUCTOR_COMPILE_THREADS"] = "1"  # no pool of compiler processes beside the other workers
    torch.set_num_threads(1)

# Small random models drive recurrent states (ConvLSTM) into denormal floats,
# which make CPU arithmetic ~10x slower without changing any comparison here.
torch.set_flush_denormal(True)


@pytest.fixture
def scalar_inductor():
    """Inductor generating scalar C++: the network's lowering and code generation are all tested, in half the
    compile time of vectorised code (which is inductor's own, the same for any network)."""
    import torch._inductor.config

    with torch._inductor.config.patch({"cpp.vec_isa_ok": False}):
        yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
