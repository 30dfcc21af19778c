"""megan_fast: fast, installable MEGAN space-time video super-resolution.

Fused kernels for the network's hot paths (modulated deformable convolution,
non-local attention, LMGA graph aggregation) with C++ CPU and Triton GPU
backends, and the network itself as a drop-in ``nn.Module``.

    >>> import megan_fast
    >>> from megan_fast.ops import modulated_deform_conv2d, use_backend
    >>> from megan_fast.nn import ModulatedDeformConv2d, DCNPack
"""

__version__ = "0.1.0"

from megan_fast import _ext  # noqa: F401  (loads the C++ kernels if built)
from megan_fast import ops  # noqa: F401
from megan_fast import nn  # noqa: F401

__all__ = ["ops", "nn", "__version__"]
