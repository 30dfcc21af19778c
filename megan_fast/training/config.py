"""The training config: typed sections, YAML reading and the check of every entry (``megan-fast train --config``).

:func:`load_config` reads a YAML file into a :class:`TrainConfig` (sections
:class:`DataConfig`, :class:`OptimConfig`, :class:`LoggingConfig`): the
defaults filled in, every entry typed and ranged; data folders are opened
when training starts, before anything is written (docs/DESIGN.md section 5).
``model:`` is a mapping of :class:`~megan_fast.models.MEGANConfig` fields,
built by :func:`model_config`, and ``data.train`` / ``data.val`` are dataset
specs whose entries depend on their ``type`` (mappings, see
:func:`~megan_fast.training.datasets.build_dataset`).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import os
import re
from collections.abc import Mapping
from typing import Any

import yaml

from megan_fast._checks import check_bool as _bool, check_float as _float, check_int as _int, \
    check_str as _str
from megan_fast.errors import ConfigError
from megan_fast.inference import COMPILE_MODES  # optim.compile: eager, or torch.compile in that mode
from megan_fast.models import MEGANConfig
from megan_fast.training.datasets import dataset_class

__all__ = ["DataConfig", "LoggingConfig", "OptimConfig", "TrainConfig", "load_config", "model_config"]


_DATA_DEFAULTS = {"vimeo90k": {"root": None, "lq_root": None, "crop": 32, "augment": True},
                  "folder": {"root": None, "lq_root": None, "crop": 32, "augment": True}}


@dataclasses.dataclass
class DataConfig:
    """``data:``: the training set, the validation set (None: no validation) and how they are batched.

    ``train`` and ``val`` are dataset specs: ``type`` ('vimeo90k', 'folder'
    or 'photos') and the arguments of that dataset class.
    """

    train: dict = dataclasses.field(default_factory=lambda: {"type": "vimeo90k", **_DATA_DEFAULTS["vimeo90k"]})
    val: dict | None = None
    batch_size: int = 16  # over all processes
    num_workers: int = 4  # data-loader workers per process


@dataclasses.dataclass
class OptimConfig:
    """``optim:``: Adam, the warm-up + cosine schedule, the loss, EMA, mixed precision and compilation."""

    lr: float = 1e-4
    betas: list = dataclasses.field(default_factory=lambda: [0.9, 0.99])
    weight_decay: float = 0.0
    iterations: int = 600000
    eta_min: float = 1e-7
    warmup_iterations: int = 0
    grad_clip: float = 0.0  # 0: no clipping of the gradient norm
    charbonnier_eps: float = 1e-3
    ema_decay: float = 0.0  # 0: no EMA copy of the weights
    autocast: str = "none"  # none, bfloat16 or float16 (CUDA only)
    compile: str = "none"  # none, default or reduce-overhead (docs/DESIGN.md section 3)


@dataclasses.dataclass
class LoggingConfig:
    """``logging:``: the intervals (in iterations) of the loss line, validation and checkpoints."""

    print_every: int = 100
    val_every: int = 5000
    save_every: int = 5000
    keep_checkpoints: int = 3  # 0: keep all
    tensorboard: bool = True


@dataclasses.dataclass
class TrainConfig:
    """A training run's config: what ``config.yaml`` holds, typed.

    Build it with :func:`load_config` (a YAML file) or :meth:`from_dict` (a
    mapping in the same layout); both fill in the defaults and check every
    entry.  ``TrainConfig()`` holds the defaults; entries changed in Python
    afterwards are not checked again (``TrainConfig.from_dict(config.to_dict())``
    does).
    """

    name: str = "megan"
    output_dir: str = "runs/megan"
    seed: int = 0
    model: dict = dataclasses.field(default_factory=dict)  # MEGANConfig fields: see model_config()
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)

    @classmethod
    def from_dict(cls, raw: Mapping) -> "TrainConfig":
        """The config of a mapping laid out as the YAML file: defaults filled in, every entry checked.

        Raises:
            ConfigError: an unknown entry, a wrong type or range, a missing
                ``data.train.root``, a ``model:`` that is not a valid MEGANConfig.
        """
        if not isinstance(raw, Mapping):
            raise ConfigError(f"a training config must be a mapping, got {type(raw).__name__}")
        cfg = _merge(TrainConfig().to_dict(), dict(raw))
        _expand_paths(cfg)
        _check(cfg)
        return cls(name=cfg["name"], output_dir=cfg["output_dir"], seed=cfg["seed"], model=cfg["model"],
                   data=DataConfig(**cfg["data"]), optim=OptimConfig(**cfg["optim"]),
                   logging=LoggingConfig(**cfg["logging"]))

    def to_dict(self) -> dict:
        """The config as plain data in the YAML layout (a deep copy): what a run's ``config.yaml`` holds."""
        return dataclasses.asdict(self)

    def model_config(self) -> MEGANConfig:
        """The network's config, from ``model:`` (:func:`model_config`)."""
        return model_config(self.model)


def model_config(model: Any) -> MEGANConfig:
    """The one place where a training config's ``model:`` entry becomes a :class:`MEGANConfig`: its fields, or
    ``name`` (a model of :func:`megan_fast.models.list_models`: ``megan``, ``zooming_slowmo``, ``tmnet``) and
    fields that change that preset.  ConfigError naming the field for an unknown, mistyped or out-of-range one."""
    from megan_fast.models.registry import model_config as preset_config

    if isinstance(model, Mapping) and "name" in model:
        fields = {k: v for k, v in model.items() if k != "name"}
        if not isinstance(model["name"], str):
            raise ConfigError(f"model.name must be one of {', '.join(_model_names())}, got {model['name']!r}")
        try:
            return preset_config(model["name"], **fields)
        except ConfigError as exc:
            raise ConfigError(f"model: {str(exc).removeprefix('MEGAN: ')}") from None
    return MEGANConfig.from_dict(dict(model) if isinstance(model, Mapping) else model, source="model")


def _model_names() -> list[str]:
    from megan_fast.models import list_models

    return list_models()


def _merge(base: dict, override: dict, path: str = "") -> dict:
    """``base`` (the defaults) with ``override``'s entries, section by section; unknown entries refused."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        where = f"{path}{key}"
        if key not in base:
            raise ConfigError(f"unknown config entry {where!r}; known entries here: {', '.join(sorted(base))}")
        if where in ("data.train", "data.val") and isinstance(value, dict):
            if "type" in value and not isinstance(value["type"], str):
                raise ConfigError(f"{where}.type must be 'vimeo90k', 'folder' or 'photos', got {value['type']!r}")
            out[key] = _data_spec(value, where)
        elif isinstance(base[key], dict) and key != "model":
            if not isinstance(value, dict):
                raise ConfigError(f"{where} must be a mapping, got {value!r}")
            out[key] = _merge(base[key], value, where + ".")
        else:
            out[key] = value
    return out


def _data_spec(value: dict, where: str) -> dict:
    """A data.train / data.val entry: its type's defaults filled in (training sets), unknown entries refused."""
    kind = value.get("type", "vimeo90k")
    cls = dataset_class(kind)
    spec = {**_DATA_DEFAULTS.get(kind, {}), **value} if where == "data.train" else dict(value)
    known = set(inspect.signature(cls).parameters) - {"seed", "gt_root"} | {"type", "root"}
    if kind == "photos":
        known -= {"root"}
    unknown = sorted(set(spec) - known)
    if unknown:
        raise ConfigError(f"unknown config entry {where}.{unknown[0]!r} for data type {kind!r}; "
                          f"known entries: {', '.join(sorted(known))}")
    return spec

class _Loader(yaml.SafeLoader):
    """YAML 1.1 as PyYAML reads it, except that ``1e-4`` (no dot) is a number, as in YAML 1.2, not a string,
    and that a key given twice in one mapping is an error (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: merged keys may be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"the key {key!r} is given twice",
                                                            key_node.start_mark)
                seen.add(key)
            except TypeError:
                raise yaml.constructor.ConstructorError(None, None, f"a key must be a plain value, got {key!r}",
                                                        key_node.start_mark) from None
        return super().construct_mapping(node, deep=deep)

_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)

def _pair(where: str, value: Any) -> list[float]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ConfigError(f"{where} must be a list of two numbers [min, max], got {value!r}")
    return [_float(f"{where}[{i}]", v) for i, v in enumerate(value)]

def _names(where: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{where} must be a non-empty list of names, got {value!r}")
    return [_str(f"{where}[{i}]", v) for i, v in enumerate(value)]

# data.train / data.val entries: name -> check(where, value); the dataset classes check the rest on creation.
_DATA_CHECKS = {
    "type": lambda w, v: v,
    "root": lambda w, v: _str(w, v, none_ok=True),
    "lq_root": lambda w, v: _str(w, v, none_ok=True),
    "list_file": lambda w, v: _str(w, v, none_ok=True),
    "split": lambda w, v: _str(w, v),
    "mode": lambda w, v: _str(w, v),
    "crop": lambda w, v: None if v is None else _int(w, v, 1),
    "scale": lambda w, v: _int(w, v, 1),
    "window_stride": lambda w, v: _int(w, v, 1),
    "length": lambda w, v: _int(w, v, 1),
    "augment": _bool,
    "quantize_lq": _bool,
    "zoom_prob": lambda w, v: _float(w, v, 0, 1),
    "pan_speed": _pair,
    "zoom_speed": _pair,
    "view_scale": _pair,
    "photos": lambda w, v: _names(w, v),
}

def _check_entries(cfg: dict) -> None:
    """Types and ranges of every entry but ``model:`` (a config in the YAML layout, defaults merged)."""
    _str("name", cfg["name"])
    _str("output_dir", cfg["output_dir"])
    _int("seed", cfg["seed"], 0)
    if cfg["seed"] >= 2**32:
        raise ConfigError(f"seed must be < 2**32, got {cfg['seed']}")
    data, optim, log = cfg["data"], cfg["optim"], cfg["logging"]
    _int("data.batch_size", data["batch_size"], 1)
    _int("data.num_workers", data["num_workers"], 0)
    for part in ("train", "val"):
        spec = data[part]
        if spec is None and part == "val":
            continue
        if not isinstance(spec, dict):
            raise ConfigError(f"data.{part} must be a mapping of dataset entries, got {spec!r}")
        for key, value in spec.items():
            _DATA_CHECKS.get(key, lambda w, v: v)(f"data.{part}.{key}", value)
    _float("optim.lr", optim["lr"], 0, lo_open=True)
    betas = optim["betas"]
    if not isinstance(betas, (list, tuple)) or len(betas) != 2:
        raise ConfigError(f"optim.betas must be a list of two numbers in [0, 1), got {betas!r}")
    for i, b in enumerate(betas):
        _float(f"optim.betas[{i}]", b, 0, 1, hi_open=True)
    _float("optim.weight_decay", optim["weight_decay"], 0)
    _int("optim.iterations", optim["iterations"], 1)
    _float("optim.eta_min", optim["eta_min"], 0)
    _int("optim.warmup_iterations", optim["warmup_iterations"], 0)
    _float("optim.grad_clip", optim["grad_clip"], 0)
    _float("optim.charbonnier_eps", optim["charbonnier_eps"], 0, lo_open=True)
    _float("optim.ema_decay", optim["ema_decay"], 0, 1, hi_open=True)
    if optim["autocast"] not in ("none", "bfloat16", "float16"):
        raise ConfigError(f"optim.autocast must be none, bfloat16 or float16, got {optim['autocast']!r}")
    if optim["compile"] not in COMPILE_MODES:
        raise ConfigError(f"optim.compile must be {', '.join(COMPILE_MODES)}, got {optim['compile']!r}")
    for key in ("print_every", "val_every", "save_every"):
        _int(f"logging.{key}", log[key], 1)
    _int("logging.keep_checkpoints", log["keep_checkpoints"], 0)
    _bool("logging.tensorboard", log["tensorboard"])

def _expand_paths(cfg: dict) -> None:
    """``~`` in the path entries means the home folder, as in a shell (YAML does not expand it)."""
    if isinstance(cfg.get("output_dir"), str):
        cfg["output_dir"] = os.path.expanduser(cfg["output_dir"])
    for part in ("train", "val"):
        spec = cfg["data"].get(part)
        for key in ("root", "lq_root", "list_file"):
            if isinstance(spec, dict) and isinstance(spec.get(key), str):
                spec[key] = os.path.expanduser(spec[key])

def _check(cfg: dict) -> None:
    """Every check of a config in the YAML layout (defaults merged), in the order the messages are promised."""
    if not isinstance(cfg["model"], dict):
        raise ConfigError(f"model must be a mapping of MEGANConfig fields, got {cfg['model']!r}")
    _check_entries(cfg)
    if cfg["data"]["train"].get("type", "vimeo90k") != "photos" and cfg["data"]["train"].get("root") is None:
        raise ConfigError("data.train.root must be set to the training data folder")
    model_config(cfg["model"])


def load_config(path: str) -> TrainConfig:
    """Reads a YAML training config, fills in the defaults and checks every entry; raises ConfigError.

    Nothing is read but the file itself: the data folders are checked when
    training starts (:meth:`megan_fast.training.Trainer.setup`), before
    anything is written.
    """
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} not found")
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.load(f, Loader=_Loader) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return TrainConfig.from_dict(raw)
