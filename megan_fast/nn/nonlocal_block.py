"""Non-local residual block over all positions of an image."""

from __future__ import annotations

from torch import Tensor, nn

from megan_fast.ops.nonlocal_attention import nonlocal_attention


class NonLocalBlock(nn.Module):
    """Embedded dot-product non-local block (Wang et al.), as MEGAN's feature extractor uses it.

    ``z = x + W_z(softmax(scale * theta(x)^T phi(x)) g(x))`` over all h*w
    positions of each image, with theta, phi, g 1x1 convs ``channels -> inner``
    and W_z a 1x1 conv ``inner -> channels`` initialised to zero, so a new block
    is the identity.  The attention runs in the fused
    :func:`megan_fast.ops.nonlocal_attention` (no (h*w)^2 matrix is stored).

    Args:
        channels: input and output channels.
        inner: channels of the embedding.
        scale: logit scale of the softmax.

    Shape:
        (b, channels, h, w) -> (b, channels, h, w).
    """

    def __init__(self, channels: int = 64, inner: int = 32, scale: float = 1.0) -> None:
        super().__init__()
        self.channels, self.inner, self.scale = channels, inner, float(scale)
        self.theta = nn.Conv2d(channels, inner, 1)
        self.phi = nn.Conv2d(channels, inner, 1)
        self.g = nn.Conv2d(channels, inner, 1)
        self.W_z = nn.Conv2d(inner, channels, 1)
        nn.init.zeros_(self.W_z.weight)
        nn.init.zeros_(self.W_z.bias)

    def forward(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        # (b, inner, h, w) -> (b, h*w, inner): one query/key/value row per position.
        q = self.theta(x).flatten(2).transpose(1, 2)
        k = self.phi(x).flatten(2).transpose(1, 2)
        v = self.g(x).flatten(2).transpose(1, 2)
        y = nonlocal_attention(q, k, v, self.scale)
        y = y.transpose(1, 2).reshape(b, self.inner, h, w)
        return x + self.W_z(y)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, inner={self.inner}, scale={self.scale}"
