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

import copy
import dataclasses
import json
import math
import os
import time
from typing import Any

import torch
import torch.distributed as dist
import yaml
from torch import nn

from megan_fast.models import MEGAN

CHECKPOINT_PREFIX = "iter_"


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


class ConfigError(ValueError):
    """A training config with a missing, unknown or invalid entry."""


def _merge(base: dict, override: dict, path: str = "") -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        where = f"{path}{key}"
        if key not in base:
            raise ConfigError(f"unknown config entry {where!r}; known entries here: {', '.join(sorted(base))}")
        if where in ("data.train", "data.val") and isinstance(value, dict):
            out[key] = _data_spec(value, where, base[key] or {})
        elif isinstance(base[key], dict) and isinstance(value, dict) and key != "model":
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


def load_config(path: str) -> dict:
    """Reads a YAML training config and fills in the defaults; raises ConfigError on bad entries."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} not found")
    with open(path) as f:
        try:
            raw = yaml.safe_load(f) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    cfg = _merge(DEFAULTS, raw)
    optim = cfg["optim"]
    if not (isinstance(optim["iterations"], int) and optim["iterations"] > 0):
        raise ConfigError(f"optim.iterations must be a positive integer, got {optim['iterations']!r}")
    if not optim["lr"] > 0:
        raise ConfigError(f"optim.lr must be positive, got {optim['lr']!r}")
    if optim["autocast"] not in ("none", "bfloat16", "float16"):
        raise ConfigError(f"optim.autocast must be none, bfloat16 or float16, got {optim['autocast']!r}")
    if not 0 <= optim["ema_decay"] < 1:
        raise ConfigError(f"optim.ema_decay must be in [0, 1), got {optim['ema_decay']!r}")
    if cfg["data"]["train"].get("type", "vimeo90k") != "photos" and cfg["data"]["train"].get("root") is None:
        raise ConfigError("data.train.root must be set to the training data folder")
    if int(cfg["data"]["batch_size"]) < 1:
        raise ConfigError(f"data.batch_size must be >= 1, got {cfg['data']['batch_size']!r}")
    try:
        MEGAN(dict(cfg["model"]))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"model: {exc}") from exc
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


def _atomic_save(obj, path: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def latest_checkpoint(output_dir: str) -> str | None:
    ckpt_dir = os.path.join(output_dir, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        return None
    names = [n for n in os.listdir(ckpt_dir) if n.startswith(CHECKPOINT_PREFIX) and n.endswith(".pt")]
    if not names:
        return None
    return os.path.join(ckpt_dir, max(names, key=lambda n: int(n[len(CHECKPOINT_PREFIX) : -3])))


# --------------------------------------------------------------------------- the loop


@dataclasses.dataclass
class TrainResult:
    iteration: int
    last_loss: float
    checkpoint: str | None
    val_psnr: float | None


def train(cfg: dict, resume: bool = False, device: str | None = None, progress: bool = True,
          stop_at: int | None = None) -> TrainResult:
    """Runs (or resumes) training as configured; returns where it ended.

    ``stop_at`` ends the run early after that iteration (with a checkpoint),
    leaving the schedule unchanged, so that ``resume`` continues it later.
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
    out_dir = cfg["output_dir"]
    ckpt_dir = os.path.join(out_dir, "checkpoints")
    if rank == 0:
        os.makedirs(ckpt_dir, exist_ok=True)
        with open(os.path.join(out_dir, "config.yaml"), "w") as f:
            yaml.safe_dump(cfg, f, sort_keys=False)

    model = MEGAN(dict(cfg["model"])).to(dev)
    ema = copy.deepcopy(model).eval().requires_grad_(False) if optim_cfg["ema_decay"] > 0 else None
    optimizer = torch.optim.Adam(model.parameters(), lr=optim_cfg["lr"], betas=tuple(optim_cfg["betas"]),
                                 weight_decay=optim_cfg["weight_decay"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_at(it, optim_cfg) / optim_cfg["lr"])

    start_it = 0
    if resume:
        path = latest_checkpoint(out_dir)
        if path is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {ckpt_dir}")
        state = torch.load(path, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        start_it = int(state["iteration"])
        torch.set_rng_state(state["rng"]["torch"][rank] if rank < len(state["rng"]["torch"]) else state["rng"]["torch"][0])
        if torch.cuda.is_available() and state["rng"].get("cuda") is not None and dev.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"])
        if model.lmga.generator is not None and state["rng"].get("lmga") is not None:
            model.lmga.generator.set_state(state["rng"]["lmga"])

    train_set = build_dataset(data_cfg["train"], seed, train=True)
    batch = int(data_cfg["batch_size"]) // world
    if batch < 1:
        raise ConfigError(f"data.batch_size {data_cfg['batch_size']} is smaller than the {world} processes")
    sampler = EpochSampler(len(train_set), seed, rank, world)
    per_epoch = len(sampler) // batch
    if per_epoch == 0:
        raise ConfigError(f"the training set has {len(train_set)} items: fewer than one batch of {batch} per process")

    net = model
    if distributed:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    amp_dtype = {"none": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[optim_cfg["autocast"]]
    use_amp = amp_dtype is not None and dev.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)

    writer = None
    if rank == 0 and log_cfg["tensorboard"]:
        try:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(os.path.join(out_dir, "tensorboard"))
        except ImportError:
            writer = None

    it = start_it
    total = int(optim_cfg["iterations"])
    end = min(total, stop_at) if stop_at is not None else total
    last_loss = float("nan")
    val_psnr = None
    saved = None
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
                                             num_workers=int(data_cfg["num_workers"]), pin_memory=dev.type == "cuda",
                                             generator=torch.Generator().manual_seed(seed + epoch))
        for item in loader:
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
            if data_cfg.get("val") and rank == 0 and (it % log_cfg["val_every"] == 0 or it == total):
                val_psnr = validate(ema or model, data_cfg["val"], dev)
                model.train()
                if writer is not None:
                    writer.add_scalar("val/psnr_y", val_psnr, it)
            if it % log_cfg["save_every"] == 0 or it == end:
                saved = save_checkpoint(out_dir, it, model, optimizer, scheduler, ema, rank, world,
                                        int(log_cfg["keep_checkpoints"]))
            if it >= end or it % per_epoch == 0:
                break
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


def save_checkpoint(out_dir, it, model, optimizer, scheduler, ema, rank, world, keep) -> str | None:
    rng = {"torch": _gather_rng(rank, world),
           "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
           "lmga": model.lmga.generator.get_state() if model.lmga.generator is not None else None}
    if rank != 0:
        return None
    path = os.path.join(out_dir, "checkpoints", f"{CHECKPOINT_PREFIX}{it}.pt")
    _atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                  "scheduler": scheduler.state_dict(), "ema": ema.state_dict() if ema is not None else None,
                  "iteration": it, "rng": rng, "config": model.config_dict()}, path)
    # Also a ready-to-use model folder (safetensors + config) of the weights to evaluate.
    (ema or model).save_pretrained(os.path.join(out_dir, "model"))
    ckpts = sorted((n for n in os.listdir(os.path.dirname(path)) if n.startswith(CHECKPOINT_PREFIX)),
                   key=lambda n: int(n[len(CHECKPOINT_PREFIX) : -3]))
    for old in ckpts[:-keep] if keep > 0 else []:
        os.remove(os.path.join(os.path.dirname(path), old))
    return path


def validate(model: MEGAN, spec: dict, dev: torch.device) -> float:
    """Mean Y-PSNR over a validation set (whole items, no augmentation)."""
    from megan_fast.metrics import psnr_y

    dataset = build_dataset(spec, 0, train=False)
    model.eval()
    scores = []
    with torch.no_grad():
        for i in range(len(dataset)):
            item = dataset[i]
            pred = model(item["lq"].unsqueeze(0).to(dev))[0].float().cpu()
            scores.append(psnr_y(pred, item["gt"]).mean().item())
    return float(sum(scores) / max(1, len(scores)))


def main_train(args) -> int:
    cfg = load_config(args.config)
    if args.output_dir:
        cfg["output_dir"] = args.output_dir
    if args.iterations:
        cfg["optim"]["iterations"] = args.iterations
    result = train(cfg, resume=args.resume, device=args.device, stop_at=args.stop_at)
    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps(dataclasses.asdict(result)))
    return 0
