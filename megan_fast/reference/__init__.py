"""Plain-PyTorch references of the fused ops: slow, obviously correct, differentiable by autograd."""

from megan_fast.reference.deform_conv import modulated_deform_conv2d_reference
from megan_fast.reference.graph_aggregate import graph_aggregate_reference
from megan_fast.reference.nonlocal_attention import nonlocal_attention_reference
from megan_fast.reference.upsample import upsample_bilinear2x_reference

__all__ = ["modulated_deform_conv2d_reference", "nonlocal_attention_reference", "graph_aggregate_reference",
           "upsample_bilinear2x_reference"]
