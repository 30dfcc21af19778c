"""Iteration-based training of MEGAN (``megan-fast train --config file.yaml``).

One process, or many with ``torchrun`` (DistributedDataParallel + a
distributed sampler; gloo on CPU, NCCL on GPU).  Checkpoints hold the model,
optimizer, scheduler, EMA, iteration and every RNG state, written atomically,
so ``--resume`` continues exactly where a run stopped (bit for bit on CPU).

The data order is a function of (seed, epoch) only, and each item's crop and
augmentation of (seed, epoch, index), so a resumed run sees exactly the
batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import re
import warnings
from typing import Any

import torch
import torch.distributed as dist
import yaml
from torch import nn

from megan_fast import outputs
from megan_fast._checks import check_bool as _bool, check_float as _float, check_int as _int, \
    check_str as _str
from megan_fast.errors import CheckpointError, ConfigError
from megan_fast.models import MEGAN, MEGANConfig

CHECKPOINT_PREFIX = "iter_"
CHECKPOINT_RE = re.compile(r"iter_(\d+)\.pt")
CONFIG_NAME = "config.yaml"
RUN_KIND = outputs.Kind("training run folder", folder=True)
CHECKPOINT_KIND = outputs.Kind("training checkpoint", entries=CHECKPOINT_RE.pattern, by_name=True)
CONFIG_KIND = outputs.Kind("run config")


# --------------------------------------------------------------------------- config


DEFAULTS: dict[str, Any] = {
    "name": "megan",
    "output_dir": "runs/megan",
    "seed": 0,
    "model": {},
    "data": {
        "train": {"type": "vimeo90k", "root": None, "lq_root": None, "crop": 32, "augment": True},
        "val": None,
        "batch_size": 16,
        "num_workers": 4,
    },
    "optim": {
        "lr": 1e-4,
        "betas": [0.9, 0.99],
        "weight_decay": 0.0,
        "iterations": 600000,
        "eta_min": 1e-7,
        "warmup_iterations": 0,
        "grad_clip": 0.0,
        "charbonnier_eps": 1e-3,
        "ema_decay": 0.0,
        "autocast": "none",
    },
    "logging": {"print_every": 100, "val_every": 5000, "save_every": 5000, "keep_checkpoints": 3,
                "tensorboard": True},
}


def _merge(base: dict, override: dict, path: str = "") -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        where = f"{path}{key}"
        if key not in base:
            raise ConfigError(f"unknown config entry {where!r}; known entries here: {', '.join(sorted(base))}")
        if where in ("data.train", "data.val") and isinstance(value, dict):
            if "type" in value and not isinstance(value["type"], str):
                raise ConfigError(f"{where}.type must be 'vimeo90k', 'folder' or 'photos', got {value['type']!r}")
            out[key] = _data_spec(value, where, base[key] or {})
        elif isinstance(base[key], dict) and key != "model":
            if not isinstance(value, dict):
                raise ConfigError(f"{where} must be a mapping, got {value!r}")
            out[key] = _merge(base[key], value, where + ".")
        else:
            out[key] = value
    return out


_DATA_DEFAULTS = {"vimeo90k": {"root": None, "lq_root": None, "crop": 32, "augment": True},
                  "folder": {"root": None, "lq_root": None, "crop": 32, "augment": True}}


def _dataset_class(kind: str):
    from megan_fast import data

    if kind == "vimeo90k":
        return data.Vimeo90KSeptuplet
    if kind == "folder":
        return data.VideoFolderClips
    if kind == "photos":
        from megan_fast.data.synthetic import PhotoClips

        return PhotoClips
    raise ConfigError(f"data type must be 'vimeo90k', 'folder' or 'photos', got {kind!r}")


def _data_spec(value: dict, where: str, base: dict) -> dict:
    """A data.train / data.val entry: its type's defaults filled in, unknown entries refused."""
    import inspect

    kind = value.get("type", "vimeo90k")
    cls = _dataset_class(kind)
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


def _where(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


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


def _check_config(cfg: dict) -> None:
    """Types and ranges of every entry (load_config's checks after merging the defaults)."""
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


def load_config(path: str) -> dict:
    """Reads a YAML training config, fills in the defaults and checks every entry; raises ConfigError.

    Nothing is read but the file itself: the data folders are checked when
    training starts (:func:`train`), before anything is written.
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
    cfg = _merge(DEFAULTS, raw)
    _expand_paths(cfg)
    if not isinstance(cfg["model"], dict):
        raise ConfigError(f"model must be a mapping of MEGANConfig fields, got {cfg['model']!r}")
    _check_config(cfg)
    if cfg["data"]["train"].get("type", "vimeo90k") != "photos" and cfg["data"]["train"].get("root") is None:
        raise ConfigError("data.train.root must be set to the training data folder")
    MEGANConfig.from_dict(dict(cfg["model"]), source="model")
    return cfg


# --------------------------------------------------------------------------- pieces


def charbonnier(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """mean(sqrt((pred - target)^2 + eps^2))."""
    return torch.sqrt((pred - target) ** 2 + eps * eps).mean()


def build_dataset(spec: dict, seed: int, train: bool):
    spec = dict(spec)
    kind = spec.pop("type", "vimeo90k")
    cls = _dataset_class(kind)
    if kind == "photos":
        if not train:
            raise ConfigError("data type 'photos' is for training; validate on written clips (type 'folder')")
        return cls(**spec, seed=seed)
    root = spec.pop("root", None)
    if root is None:
        raise ConfigError(f"data type {kind!r} needs a root folder")
    if kind == "folder" and not train:
        spec.setdefault("mode", "eval")  # whole frames, the protocol's windows
    return cls(root, **spec, **({"seed": seed} if train else {}))


class EpochSampler(torch.utils.data.Sampler):
    """Indices of a seeded permutation per epoch, sharded over ranks, from any start position."""

    def __init__(self, size: int, seed: int, rank: int = 0, world: int = 1) -> None:
        self.size, self.seed, self.rank, self.world = size, seed, rank, world
        self.epoch, self.start = 0, 0

    def set_position(self, epoch: int, start: int) -> None:
        self.epoch, self.start = epoch, start

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        order = torch.randperm(self.size, generator=g).tolist()
        per_rank = len(order) // self.world
        mine = order[self.rank * per_rank : (self.rank + 1) * per_rank]
        return iter(mine[self.start :])

    def __len__(self) -> int:
        return self.size // self.world - self.start


def lr_at(it: int, optim: dict) -> float:
    """Linear warm-up, then cosine annealing from lr to eta_min over the remaining iterations."""
    warm = int(optim["warmup_iterations"])
    if it < warm:
        return optim["lr"] * (it + 1) / warm
    total = max(1, optim["iterations"] - warm)
    progress = min(1.0, (it - warm) / total)
    return optim["eta_min"] + 0.5 * (optim["lr"] - optim["eta_min"]) * (1 + math.cos(math.pi * progress))


def _checkpoints(ckpt_dir: str) -> list[tuple[int, str]]:
    """(iteration, path) of the ``iter_N.pt`` files in ``ckpt_dir``, oldest first (other names are ignored)."""
    if not os.path.isdir(ckpt_dir):
        return []
    found = [(int(m.group(1)), n) for n in os.listdir(ckpt_dir) if (m := CHECKPOINT_RE.fullmatch(n))]
    return [(it, os.path.join(ckpt_dir, n)) for it, n in sorted(found)]


def latest_checkpoint(output_dir: str) -> str | None:
    """The path of the newest ``checkpoints/iter_N.pt`` of a run folder, or None."""
    found = _checkpoints(os.path.join(output_dir, "checkpoints"))
    return found[-1][1] if found else None


_CHECKPOINT_ENTRIES = {"model": dict, "optimizer": dict, "scheduler": dict, "iteration": int, "rng": dict}


def load_checkpoint(path: str) -> dict:
    """Reads a training checkpoint with ``torch.load(weights_only=True)``: tensors, numbers, strings, lists, dicts.

    Raises:
        CheckpointError: unreadable, not a checkpoint (nothing in it is run:
            no unpickling of objects), or missing entries; the path is named.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # untrusted bytes: any failure is "not a checkpoint"
        text = str(exc).strip()
        first = text.splitlines()[0].split(". ")[0].rstrip(".") if text else type(exc).__name__
        raise CheckpointError(f"{path}: not a megan-fast training checkpoint ({first})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a megan-fast training checkpoint (holds a {type(state).__name__})")
    for key, kind in _CHECKPOINT_ENTRIES.items():
        if not isinstance(state.get(key), kind) or isinstance(state.get(key), bool):
            raise CheckpointError(f"{path}: not a megan-fast training checkpoint (entry {key!r} missing or wrong)")
    if state["iteration"] < 0:
        raise CheckpointError(f"{path}: not a megan-fast training checkpoint (iteration {state['iteration']})")
    return state


# --------------------------------------------------------------------------- the loop


@dataclasses.dataclass
class TrainResult:
    iteration: int
    last_loss: float
    checkpoint: str | None
    val_psnr: float | None


def _data_inputs(cfg: dict) -> list[tuple[str, str | None]]:
    """The folders and files a config reads, as (entry, path): outputs may not overlap them."""
    found = []
    for part in ("train", "val"):
        spec = cfg["data"].get(part) or {}
        for key in ("root", "lq_root", "list_file"):
            found.append((f"data.{part}.{key}", spec.get(key)))
    return found


RUN_ENTRIES = (CONFIG_NAME, "checkpoints", "model", "tensorboard")


def _never_saved(run: str) -> bool:
    """Whether ``run`` holds only what a start killed before its first checkpoint leaves (our config.yaml, a
    checkpoints folder with at most a temporary in it): such a folder may be started again."""
    if not os.path.isdir(run):
        return False
    names = {n for n in os.listdir(run) if not outputs.TMP_NAME.fullmatch(n)}
    ckpts = os.path.join(run, "checkpoints")
    if not names <= {CONFIG_NAME, "checkpoints"}:
        return False
    if CONFIG_NAME in names and not outputs.is_ours(os.path.join(run, CONFIG_NAME)):
        return False
    if "checkpoints" in names:
        if os.path.islink(ckpts) or not os.path.isdir(ckpts):
            return False
        if any(not outputs.TMP_NAME.fullmatch(n) for n in os.listdir(ckpts)):
            return False
    return True


def check_output_dir(cfg: dict, resume: bool, inputs: list[tuple[str, str | None]] = ()) -> outputs.Output:
    """Checks ``output_dir`` before anything is written: a fresh run needs a new or empty folder, ``resume`` a run.

    Raises:
        OutputError: empty path, a file, overlapping an input, or not writable;
            a fresh run into a folder that holds files.
        CheckpointError: ``resume`` and no checkpoint in the folder.
    """
    own_config = os.path.join(os.path.abspath(str(cfg["output_dir"] or ".")), CONFIG_NAME)
    if resume:  # continuing a run from the config it saved: that file is read, then rewritten the same
        inputs = [(n, p) for n, p in inputs if not (p and os.path.realpath(p) == os.path.realpath(own_config))]
    out = outputs.check_output(cfg["output_dir"], "output_dir", RUN_KIND, inputs=[*_data_inputs(cfg), *inputs],
                               existing="keep", make_parents=True)
    ckpt_dir = os.path.join(out.path, "checkpoints")
    for name in RUN_ENTRIES:  # the run writes into these: a link would send its writes and pruning elsewhere
        if os.path.islink(os.path.join(out.path, name)):
            raise outputs.OutputError(f"output_dir {out.shown!r}: {name!r} in it is a symbolic link; a run writes "
                                      "only into folders of its own")
    model_dir = os.path.join(out.path, "model")
    for name in ("checkpoints", "model", "tensorboard"):
        path = os.path.join(out.path, name)
        if os.path.exists(path) and not os.path.isdir(path):
            raise outputs.OutputError(f"output_dir {out.shown!r}: {name!r} in it is a file; a run keeps a folder "
                                      "there")
    mine = [path for _, path in _checkpoints(ckpt_dir)]
    mine += [os.path.join(model_dir, n) for n in ("config.json", "model.safetensors")]
    for path in mine:
        if os.path.islink(path) or (os.path.exists(path) and not os.path.isfile(path)):
            raise outputs.OutputError(f"output_dir {out.shown!r}: {os.path.relpath(path, out.path)!r} is not a "
                                      "file of the run's own (a link or a folder); a run writes only its own files")
    held = sorted(n for n in os.listdir(out.path) if not outputs.TMP_NAME.fullmatch(n)) \
        if os.path.isdir(out.path) else []
    if not resume and _never_saved(out.path):
        held = []  # a start that was killed before its first checkpoint: begin again
    if resume:
        if latest_checkpoint(out.path) is None:
            raise CheckpointError(f"--resume: no checkpoint (iter_N.pt) in {ckpt_dir}")
    elif held:
        first = held[0]
        raise outputs.OutputError(f"output_dir {out.shown!r} is not empty (it holds {first!r}); pass --resume to "
                                  "continue the run there, or choose a new output_dir")
    return out


def _dataset(spec: dict, seed: int, train: bool, where: str):
    """build_dataset with every failure (missing folder, bad entry) as a ConfigError naming the entry."""
    try:
        return build_dataset(spec, seed, train)
    except ConfigError:
        raise
    except (ValueError, TypeError, OSError, ImportError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _check_items(config: MEGANConfig, train_set, val_set) -> None:
    """Reads the first item of each dataset and checks that it fits the model (frames, x4 sizes): a crop larger
    than the frames, LR frames of the wrong size or a scale other than 4 fail here, before anything is written."""
    n_in, t_out = config.num_input_frames, config.num_output_frames
    for where, dataset in (("data.train", train_set), ("data.val", val_set)):
        if dataset is None or len(dataset) == 0:
            continue
        try:
            item = dataset[0]
        except (ValueError, OSError, TypeError, IndexError, RuntimeError) as exc:
            raise ConfigError(f"{where}: {exc}") from None
        lq, gt = item["lq"], item["gt"]
        if lq.shape[0] != n_in or gt.shape[0] != t_out:
            raise ConfigError(f"{where} gives {lq.shape[0]} input and {gt.shape[0]} target frames per item, but "
                              f"model.num_input_frames {n_in} needs {n_in} and {t_out}")
        if tuple(gt.shape[-2:]) != (4 * lq.shape[-2], 4 * lq.shape[-1]):
            raise ConfigError(f"{where} gives {lq.shape[-1]}x{lq.shape[-2]} inputs for {gt.shape[-1]}x{gt.shape[-2]} "
                              "targets; MEGAN upscales x4 (scale 4, LR frames a quarter of GT)")


def _undo_start(out_dir: str, existed: set[str] | None, made: list[str] = ()) -> None:
    """After a run that saved no checkpoint fails: removes what it wrote (its config.yaml, the folders it made),
    so that the same command can simply be run again.  ``existed``: the names in ``out_dir`` before the run
    wrote anything (None: there was no ``out_dir``); ``made``: missing parent folders it created, innermost
    first.  Nothing the run did not write is touched."""
    import shutil

    before = existed or set()
    config = os.path.join(out_dir, CONFIG_NAME)
    if CONFIG_NAME not in before and outputs.is_ours(config):
        os.remove(config)
    tb = os.path.join(out_dir, "tensorboard")
    if "tensorboard" not in before and os.path.isdir(tb) and not os.path.islink(tb):
        shutil.rmtree(tb, ignore_errors=True)
    folders = ([os.path.join(out_dir, "checkpoints")] if "checkpoints" not in before else []) + \
        ([out_dir] if existed is None else [])
    for path in [*folders, *made]:
        with contextlib.suppress(OSError):
            os.rmdir(path)  # only if empty


def _restore(state: dict, path: str, model, optimizer, scheduler, scaler, ema, rank: int, dev) -> int:
    """Loads a checkpoint's states into the training objects; returns its iteration."""
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler") is not None:
            scaler.load_state_dict(state["scaler"])
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"][rank] if rank < len(rng["torch"]) else rng["torch"][0])
        if torch.cuda.is_available() and rng.get("cuda") is not None and dev.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"])
        if model.lmga.generator is not None and rng.get("lmga") is not None:
            model.lmga.generator.set_state(rng["lmga"])
    except (CheckpointError, ValueError, KeyError, TypeError, RuntimeError, IndexError) as exc:
        raise CheckpointError(f"{path}: does not fit this run's config ({exc})") from None
    return int(state["iteration"])


def _worker_init(worker_id: int) -> None:
    """Data workers ignore SIGTERM and SIGINT: a signal to the process group is handled by the main process,
    which removes its temporaries and shuts the workers down (no "worker killed by signal" traceback).

    They are forked with both signals blocked (:func:`megan_fast.outputs.signals_held`), so one that came
    before this point is pending: ignoring first, then unblocking, discards it."""
    import signal

    import threading

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})
    default_hook = threading.excepthook

    def quiet(args):
        # A tensor handed over while the main process stopped: its helper thread loses the connection.
        if not issubclass(args.exc_type, (ConnectionError, EOFError)):
            default_hook(args)

    threading.excepthook = quiet


def train(cfg: dict, resume: bool = False, device: str | None = None, progress: bool = True,
          stop_at: int | None = None, inputs: list[tuple[str, str | None]] = ()) -> TrainResult:
    """Runs (or resumes) training as configured; returns where it ended.

    ``stop_at`` ends the run early after that iteration (with a checkpoint),
    leaving the schedule unchanged, so that ``resume`` continues it later.
    Everything is checked (output folder, data, resume checkpoint) before
    anything is written; ``inputs`` are more (name, path) pairs that
    ``output_dir`` may not overlap (the config file).
    """
    from tqdm import tqdm

    distributed = dist.is_available() and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1
    if distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() and device != "cpu" else "gloo")
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    if device is None:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if dev.index is None:  # "cuda": this process's GPU
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(dev)

    seed = int(cfg["seed"])
    torch.manual_seed(seed + rank)
    optim_cfg, log_cfg, data_cfg = cfg["optim"], cfg["logging"], cfg["data"]
    out = check_output_dir(cfg, resume, list(inputs))
    out_dir = out.path
    ckpt_dir = os.path.join(out_dir, "checkpoints")

    train_set = _dataset(data_cfg["train"], seed, True, "data.train")
    val_set = _dataset(data_cfg["val"], 0, False, "data.val") if data_cfg.get("val") else None
    batch = int(data_cfg["batch_size"]) // world
    if batch < 1:
        raise ConfigError(f"data.batch_size {data_cfg['batch_size']} is smaller than the {world} processes")
    sampler = EpochSampler(len(train_set), seed, rank, world)
    per_epoch = len(sampler) // batch
    if per_epoch == 0:
        raise ConfigError(f"the training set has {len(train_set)} items: fewer than one batch of {batch} per process")

    model = MEGAN(dict(cfg["model"])).to(dev)
    _check_items(model.config, train_set, val_set)
    ema = copy.deepcopy(model).eval().requires_grad_(False) if optim_cfg["ema_decay"] > 0 else None
    optimizer = torch.optim.Adam(model.parameters(), lr=optim_cfg["lr"], betas=tuple(optim_cfg["betas"]),
                                 weight_decay=optim_cfg["weight_decay"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_at(it, optim_cfg) / optim_cfg["lr"])
    amp_dtype = {"none": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[optim_cfg["autocast"]]
    use_amp = amp_dtype is not None and dev.type == "cuda"
    if amp_dtype is not None and not use_amp:
        warnings.warn(f"optim.autocast {optim_cfg['autocast']} applies on CUDA devices only; "
                      f"training in float32 on {dev.type}", stacklevel=2)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)

    start_it = 0
    if resume:
        path = latest_checkpoint(out_dir)
        start_it = _restore(load_checkpoint(path), path, model, optimizer, scheduler, scaler, ema, rank, dev)

    # Everything is checked: only now is anything written (once every process has checked: rank 0's
    # config.yaml must not make another process's "output_dir is not empty" check fail).
    if distributed:
        dist.barrier()
    it = start_it
    total = int(optim_cfg["iterations"])
    end = min(total, stop_at) if stop_at is not None else total
    last_loss = float("nan")
    val_psnr = None
    saved = None
    existed = set(os.listdir(out_dir)) if os.path.isdir(out_dir) else None
    made, parent = [], os.path.dirname(out_dir)  # parent folders this run will create
    while parent and not os.path.exists(parent):
        made.append(parent)
        parent = os.path.dirname(parent)
    writer = bar = batches = None
    try:
        if rank == 0:
            os.makedirs(ckpt_dir, exist_ok=True)
            config_out = out.child(CONFIG_NAME, CONFIG_KIND)
            config_out.check_existing()
            with config_out.atomic_file() as tmp, open(tmp, "w", encoding="utf-8") as f:
                f.write(f"# {outputs.written_by('train')}: the resolved config of this run\n")
                yaml.safe_dump(cfg, f, sort_keys=False)
            if log_cfg["tensorboard"]:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    writer = SummaryWriter(os.path.join(out_dir, "tensorboard"))
                except ImportError:
                    writer = None
        net = model
        if distributed:
            net = nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
        bar = tqdm(total=total, initial=start_it, unit="it", desc=cfg["name"], disable=not progress or rank != 0)
        model.train()
        while it < end:
            epoch, pos = divmod(it, per_epoch)
            sampler.set_position(epoch, pos * batch)
            if hasattr(train_set, "set_epoch"):
                train_set.set_epoch(epoch)
            # Its own generator: creating a loader must not consume the global RNG,
            # or a resumed run would draw different memory frames than an uninterrupted one.
            loader = torch.utils.data.DataLoader(train_set, batch_size=batch, sampler=sampler, drop_last=True,
                                                 num_workers=int(data_cfg["num_workers"]),
                                                 pin_memory=dev.type == "cuda", worker_init_fn=_worker_init,
                                                 generator=torch.Generator().manual_seed(seed + epoch))
            with outputs.signals_held():  # the workers start here (see signals_held)
                batches = iter(loader)
            for item in batches:
                outputs.raise_if_signalled()
                lq, gt = item["lq"].to(dev, non_blocking=True), item["gt"].to(dev, non_blocking=True)
                with torch.autocast(dev.type, dtype=amp_dtype, enabled=use_amp):
                    loss = charbonnier(net(lq).float(), gt, optim_cfg["charbonnier_eps"])
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if optim_cfg["grad_clip"] > 0:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(model.parameters(), optim_cfg["grad_clip"])
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                if ema is not None:
                    with torch.no_grad():
                        d = optim_cfg["ema_decay"]
                        for pe, pm in zip(ema.parameters(), model.parameters()):
                            pe.lerp_(pm.detach(), 1 - d)
                        for be, bm in zip(ema.buffers(), model.buffers()):
                            be.copy_(bm)
                it += 1
                last_loss = loss.item()
                bar.update(1)
                if rank == 0 and (it % log_cfg["print_every"] == 0 or it == total):
                    bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
                    if writer is not None:
                        writer.add_scalar("train/loss", last_loss, it)
                        writer.add_scalar("train/lr", scheduler.get_last_lr()[0], it)
                if val_set is not None and rank == 0 and (it % log_cfg["val_every"] == 0 or it == total):
                    val_psnr = validate(ema or model, val_set, dev)
                    model.train()
                    if writer is not None:
                        writer.add_scalar("val/psnr_y", val_psnr, it)
                if it % log_cfg["save_every"] == 0 or it == end:
                    saved = save_checkpoint(out_dir, it, model, optimizer, scheduler, ema, rank, world,
                                            int(log_cfg["keep_checkpoints"]), scaler)
                if it >= end or it % per_epoch == 0:
                    break
            with outputs.signals_held():  # ... and are joined here
                batches = None
    except BaseException:
        with outputs.signals_held():  # stop the data workers now, not whenever the iterator is collected
            del batches
        if writer is not None:
            writer.close()
            writer = None
        if rank == 0 and not resume and latest_checkpoint(out_dir) is None:
            _undo_start(out_dir, existed, made)  # a failed start leaves nothing: the same command can be run again
        raise
    finally:
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()
    if distributed:
        dist.barrier()
    return TrainResult(it, last_loss, saved, val_psnr)


def _gather_rng(rank: int, world: int) -> list:
    state = torch.get_rng_state()
    if world == 1:
        return [state]
    states = [None] * world
    dist.all_gather_object(states, state)
    return states


def save_checkpoint(out_dir, it, model, optimizer, scheduler, ema, rank, world, keep, scaler=None) -> str | None:
    """Writes ``checkpoints/iter_{it}.pt`` (tensors, numbers, strings, lists and dicts only) and ``model/``.

    Keeps the newest ``keep`` checkpoints (0: all); only ``iter_N.pt`` files are ever removed.
    """
    rng = {"torch": _gather_rng(rank, world),
           "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
           "lmga": model.lmga.generator.get_state() if model.lmga.generator is not None else None}
    if rank != 0:
        return None
    ckpt_dir = os.path.join(out_dir, "checkpoints")
    path = os.path.join(ckpt_dir, f"{CHECKPOINT_PREFIX}{it}.pt")
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "ema": ema.state_dict() if ema is not None else None,
             "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
             "iteration": it, "rng": rng, "config": model.config_dict(), "written_by": outputs.written_by("train")}
    with outputs.Output(path, "checkpoint", CHECKPOINT_KIND, True, path).atomic_file() as tmp:
        torch.save(state, tmp)
    # Also a ready-to-use model folder (safetensors + config) of the weights to evaluate.
    (ema or model).save_pretrained(os.path.join(out_dir, "model"))
    for _, old in _checkpoints(ckpt_dir)[:-keep] if keep > 0 else []:
        os.remove(old)
    return path


def validate(model: MEGAN, data, dev: torch.device) -> float:
    """Mean Y-PSNR over a validation set (a dataset, or a ``data.val`` spec; whole items, no augmentation)."""
    from megan_fast.metrics import psnr_y

    dataset = build_dataset(data, 0, train=False) if isinstance(data, dict) else data
    model.eval()
    scores = []
    with torch.no_grad():
        for i in range(len(dataset)):
            item = dataset[i]
            pred = model(item["lq"].unsqueeze(0).to(dev))[0].float().cpu()
            scores.append(psnr_y(pred, item["gt"]).mean().item())
    return float(sum(scores) / max(1, len(scores)))


def main_train(config: str, output_dir: str | None = None, iterations: int | None = None, resume: bool = False,
               device: str | None = None, stop_at: int | None = None, progress: bool = True) -> TrainResult:
    """``megan-fast train``: loads ``config``, applies the overrides, trains; the config file is an input."""
    cfg = load_config(config)
    if output_dir is not None:
        cfg["output_dir"] = output_dir
    if iterations is not None:
        cfg["optim"]["iterations"] = _int("--iterations", iterations, 1)
    if stop_at is not None:
        _int("--stop-at", stop_at, 1)
    return train(cfg, resume=resume, device=device, stop_at=stop_at, progress=progress,
                 inputs=[("--config", config)])
