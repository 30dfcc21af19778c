"""NonLocalBlock against a plain-PyTorch non-local block."""

import pytest
import torch
from torch import nn

from megan_fast.nn import NonLocalBlock
from megan_fast.ops import use_backend


def plain_non_local(block: NonLocalBlock, x: torch.Tensor) -> torch.Tensor:
    """The textbook embedded-Gaussian block with the explicit (hw x hw) matrix."""
    b, c, h, w = x.shape
    theta = block.theta(x).view(b, block.inner, h * w).permute(0, 2, 1)
    phi = block.phi(x).view(b, block.inner, h * w)
    g = block.g(x).view(b, block.inner, h * w).permute(0, 2, 1)
    f = torch.softmax(block.scale * torch.bmm(theta, phi), dim=-1)
    y = torch.bmm(f, g).permute(0, 2, 1).reshape(b, block.inner, h, w)
    return x + block.W_z(y)


def test_new_block_is_identity():
    block = NonLocalBlock(16, 8)
    x = torch.randn(2, 16, 5, 6)
    torch.testing.assert_close(block(x), x)


@pytest.mark.parametrize("backend", ["auto", "reference", "stock"])
def test_matches_plain_block_forward_and_gradients(backend):
    torch.manual_seed(0)
    block = NonLocalBlock(16, 8, scale=0.5).double()
    nn.init.normal_(block.W_z.weight, std=0.2)  # make the attention path matter
    x = torch.randn(2, 16, 5, 7, dtype=torch.float64, requires_grad=True)
    with use_backend(backend):
        out = block(x)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, *block.parameters()], g)
    ref = plain_non_local(block, x)
    grads_ref = torch.autograd.grad(ref, [x, *block.parameters()], g)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


def test_odd_sizes_and_float32():
    block = NonLocalBlock(8, 4)
    nn.init.normal_(block.W_z.weight, std=0.2)
    x = torch.randn(3, 8, 1, 13)
    torch.testing.assert_close(block(x), plain_non_local(block, x), atol=1e-5, rtol=1e-5)
    assert "inner=4" in repr(block)
