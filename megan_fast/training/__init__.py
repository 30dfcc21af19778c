"""Iteration-based training of MEGAN (``megan-fast train --config file.yaml``).

- :mod:`~megan_fast.training.config`: the YAML config, its defaults and checks.
- :mod:`~megan_fast.training.loop`: the loop (:func:`train`, :func:`main_train`).
- :mod:`~megan_fast.training.checkpoints`: ``iter_N.pt``, plain data, exact resume.
- :mod:`~megan_fast.training.run_dir`: the run folder (``output_dir``).
"""

from megan_fast.errors import CheckpointError, ConfigError
from megan_fast.models import MEGAN, MEGANConfig
from megan_fast.training.checkpoints import (
    CHECKPOINT_KIND,
    CHECKPOINT_PREFIX,
    CHECKPOINT_RE,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from megan_fast.training.config import DEFAULTS, build_dataset, load_config
from megan_fast.training.loop import EpochSampler, TrainResult, charbonnier, lr_at, main_train, train, validate
from megan_fast.training.run_dir import CONFIG_KIND, CONFIG_NAME, RUN_ENTRIES, RUN_KIND, check_output_dir

__all__ = [
    "CHECKPOINT_KIND",
    "CHECKPOINT_PREFIX",
    "CHECKPOINT_RE",
    "CONFIG_KIND",
    "CONFIG_NAME",
    "CheckpointError",
    "ConfigError",
    "DEFAULTS",
    "EpochSampler",
    "MEGAN",
    "MEGANConfig",
    "RUN_ENTRIES",
    "RUN_KIND",
    "TrainResult",
    "build_dataset",
    "charbonnier",
    "check_output_dir",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_config",
    "lr_at",
    "main_train",
    "save_checkpoint",
    "train",
    "validate",
]
