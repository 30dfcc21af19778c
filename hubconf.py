"""torch.hub entry points: ``torch.hub.load("path/to/megan_fast", "tmnet", source="local", pretrained=...)``.

Each is :func:`megan_fast.models.create_model` for one member of the family;
``pretrained`` takes a model folder of this package or an official ``.pth``
(read with ``weights_only=True``).  The package must be installed (its C++
kernels are built by ``pip install -e .``).
"""

dependencies = ["torch", "torchvision", "safetensors", "numpy"]

from megan_fast.models.registry import create_model as _create_model  # noqa: E402


def megan(pretrained=None, **overrides):
    """MEGAN (10.66 M parameters); ``overrides``: MEGANConfig fields."""
    return _create_model("megan", pretrained, **overrides)


def zooming_slowmo(pretrained=None, **overrides):
    """Zooming Slow-Mo (11.10 M parameters), e.g. ``pretrained="xiang2020zooming.pth"``."""
    return _create_model("zooming_slowmo", pretrained, **overrides)


def tmnet(pretrained=None, **overrides):
    """TMNet (12.26 M parameters), e.g. ``pretrained="tmnet_multiple_frames.pth"``."""
    return _create_model("tmnet", pretrained, **overrides)
