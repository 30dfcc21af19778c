"""The network family (MEGAN and its backbone Zooming Slow-Mo) and the one loader of weights."""

from megan_fast.models.loading import load_model
from megan_fast.models.megan import MEGAN, MEGANConfig

__all__ = ["MEGAN", "MEGANConfig", "load_model"]
