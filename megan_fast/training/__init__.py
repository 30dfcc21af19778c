"""Iteration-based training of MEGAN (``megan-fast train --config file.yaml``; docs/DESIGN.md sections 3 and 5).

- :mod:`~megan_fast.training.config`: the YAML config as typed sections, its defaults and checks.
- :mod:`~megan_fast.training.trainer`: :class:`Trainer`, the loop in named steps; :func:`train`, :func:`main_train`.
- :mod:`~megan_fast.training.datasets`: the datasets of ``data:``, their check against the model, the data order.
- :mod:`~megan_fast.training.optim`: the loss, Adam and its schedule, mixed precision, EMA.
- :mod:`~megan_fast.training.checkpoints`: ``iter_N.pt``, plain data, exact resume.
- :mod:`~megan_fast.training.run_dir`: the run folder (``output_dir``).
"""

from megan_fast.training.checkpoints import latest_checkpoint, list_checkpoints, load_checkpoint
from megan_fast.training.config import DataConfig, LoggingConfig, OptimConfig, TrainConfig, load_config
from megan_fast.training.datasets import build_dataset
from megan_fast.training.optim import charbonnier, lr_at
from megan_fast.training.trainer import TrainResult, Trainer, main_train, train, validate

__all__ = [
    "DataConfig",
    "LoggingConfig",
    "OptimConfig",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "build_dataset",
    "charbonnier",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_config",
    "lr_at",
    "main_train",
    "train",
    "validate",
]
