"""Iteration-based training of MEGAN (``megan-fast train --config file.yaml``).

- :mod:`~megan_fast.training.config`: the YAML config, its defaults and checks.
- :mod:`~megan_fast.training.loop`: the loop (:func:`train`, :func:`main_train`).
- :mod:`~megan_fast.training.checkpoints`: ``iter_N.pt``, plain data, exact resume.
- :mod:`~megan_fast.training.run_dir`: the run folder (``output_dir``).
"""

from megan_fast.errors import ConfigError
from megan_fast.training.checkpoints import (
    CHECKPOINT_PREFIX,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from megan_fast.training.config import DEFAULTS, build_dataset, load_config
from megan_fast.training.loop import EpochSampler, TrainResult, charbonnier, lr_at, main_train, train, validate
from megan_fast.training.run_dir import check_output_dir

__all__ = [
    "CHECKPOINT_PREFIX",
    "ConfigError",
    "DEFAULTS",
    "EpochSampler",
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
