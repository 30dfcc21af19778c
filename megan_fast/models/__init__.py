"""The MEGAN network."""

from megan_fast.models.megan import MEGAN, MEGANConfig

__all__ = ["MEGAN", "MEGANConfig"]
