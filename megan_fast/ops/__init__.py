"""The fused ops of MEGAN and the backend switch.

>>> from megan_fast.ops import modulated_deform_conv2d, nonlocal_attention, graph_aggregate, use_backend
>>> from megan_fast.ops import upsample_bilinear2x
"""

from megan_fast.ops._backend import BACKENDS, get_backend, set_backend, use_backend
from megan_fast.ops.deform_conv import modulated_deform_conv2d
from megan_fast.ops.graph_aggregate import graph_aggregate
from megan_fast.ops.nonlocal_attention import nonlocal_attention
from megan_fast.ops.upsample import upsample_bilinear2x
from megan_fast.ops import _flops

_flops.register_all()

__all__ = ["BACKENDS", "get_backend", "set_backend", "use_backend", "modulated_deform_conv2d", "nonlocal_attention",
           "graph_aggregate", "upsample_bilinear2x"]
