"""The network family (MEGAN, Zooming Slow-Mo, TMNet): models by name, the config, the network and its weights.

- :mod:`~megan_fast.models.registry`: :func:`create_model`, :func:`list_models`.
- :mod:`~megan_fast.models.config`: :class:`MEGANConfig` and the presets.
- :mod:`~megan_fast.models.megan`: the network, :class:`MEGAN`; :mod:`~megan_fast.models.blocks` its parts.
- :mod:`~megan_fast.models.loading` / :mod:`~megan_fast.models.saving`: model folders and official files
  (:mod:`~megan_fast.models.official`), :func:`load_model`.
"""

from megan_fast.models.config import MEGANConfig
from megan_fast.models.loading import load_model
from megan_fast.models.megan import MEGAN
from megan_fast.models.registry import create_model, list_models

__all__ = ["MEGAN", "MEGANConfig", "create_model", "list_models", "load_model"]
