"""Models by name: ``create_model("tmnet", pretrained=...)`` and ``list_models()``, as timm's registry.

Every member of the family is a config of one network (:class:`MEGAN`):
``megan``, ``zooming_slowmo`` and ``tmnet``, each a preset of
:class:`MEGANConfig` (:data:`megan_fast.models.config.PRESETS`).  ``pretrained``
takes what every ``--checkpoint`` takes (a model folder of ours or an
official ``.pth``), through the one safe loader
(:func:`megan_fast.models.loading.load_model`), and must hold that network.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
from typing import Any

from megan_fast.errors import CheckpointError, ConfigError
from megan_fast.models.config import PRESETS, MEGANConfig
from megan_fast.models.megan import MEGAN

__all__ = ["create_model", "list_models", "model_config"]

# name -> (what the config's family_name says, one line for list_models' readers)
_MODELS: dict[str, tuple[str, str]] = {
    "megan": ("MEGAN", "MEGAN (10.66 M parameters): the paper's network, 4 frames in, 7 out"),
    "zooming_slowmo": ("Zooming Slow-Mo", "Zooming Slow-Mo (11.10 M): MEGAN's backbone, any number of frames >= 2"),
    "tmnet": ("TMNet", "TMNet (12.26 M): Zooming Slow-Mo with temporal modulation, frames at any time"),
}


def list_models(pattern: str = "*") -> list[str]:
    """The names :func:`create_model` takes (``fnmatch`` pattern, e.g. ``"*slowmo*"``), sorted."""
    return sorted(n for n in _MODELS if fnmatch.fnmatch(n, pattern))


def model_config(name: str, **overrides: Any) -> MEGANConfig:
    """The config of model ``name`` with ``overrides`` of its fields (:class:`MEGANConfig`).

    Raises:
        ConfigError: an unknown name, or an override that is not a field or not in range.
    """
    if name not in _MODELS:
        raise ConfigError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    return MEGANConfig.from_dict({**dataclasses.asdict(MEGANConfig()), **PRESETS[name], **overrides},
                                 source=f"model {name!r}")


def create_model(name: str, pretrained: str | os.PathLike | None = None, **overrides: Any) -> MEGAN:
    """A model of the family by name: ``megan``, ``zooming_slowmo`` or ``tmnet`` (:func:`list_models`).

    Args:
        name: the model's name.
        pretrained: None (random initial weights), or a model folder of ours or
            an official ``.pth`` (what ``--checkpoint`` takes), which must hold
            this network; its config is the folder's or the file's.
        overrides: config fields to change (``nf=32``, ``memory_seed=0``, ...);
            with ``pretrained``, only fields that keep every weight's shape.

    Returns:
        The model, in training mode as any new ``nn.Module`` (call ``.eval()``
        for inference), on the CPU.

    Raises:
        ConfigError: an unknown name or override.
        CheckpointError: ``pretrained`` cannot be read, holds another network,
            or does not fit the overrides.
    """
    family, _ = _MODELS.get(name, (None, None))
    if pretrained is None:
        return MEGAN(model_config(name, **overrides))
    if family is None:
        model_config(name)  # the unknown-name error
    from megan_fast.models.loading import load_model

    model = load_model(pretrained)
    source = os.fspath(pretrained)
    if model.config.family_name != family:
        raise CheckpointError(f"{source}: holds a {model.config.family_name} network, not {family} ({name!r}); "
                              f"create_model({_name_of(model.config.family_name)!r}, pretrained=...) loads it")
    if overrides:
        config = MEGANConfig.from_dict({**model.config_dict(), **overrides}, source=f"model {name!r}")
        changed = MEGAN(config)
        mismatch = _shape_change(changed, model)
        if mismatch:
            raise CheckpointError(f"{source}: the overrides change the shapes of its weights ({mismatch}); "
                                  "override only fields that keep them (memory_seed, global_skip, ...)")
        changed.load_state_dict(model.state_dict())
        model = changed
    return model.train()


def _name_of(family: str) -> str:
    return next(n for n, (f, _) in _MODELS.items() if f == family)


def _shape_change(a: MEGAN, b: MEGAN) -> str | None:
    from megan_fast.models.loading import describe_mismatch

    return describe_mismatch({k: tuple(v.shape) for k, v in a.state_dict().items()},
                             {k: tuple(v.shape) for k, v in b.state_dict().items()})
