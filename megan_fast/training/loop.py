"""The training loop: data order, loss, schedule, EMA, validation, checkpoints; one process or many.

One process, or many with ``torchrun`` (DistributedDataParallel + a
distributed sampler; gloo on CPU, NCCL on GPU).  The data order is a function
of (seed, epoch) only, and each item's crop and augmentation of (seed, epoch,
index), so a resumed run sees exactly the batches the uninterrupted run would
have seen (bit for bit on CPU).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import warnings

import torch
import torch.distributed as dist
from torch import nn

from megan_fast import outputs
from megan_fast._checks import check_int as _int
from megan_fast.errors import ConfigError
from megan_fast.models import MEGAN, MEGANConfig
from megan_fast.training.checkpoints import latest_checkpoint, load_checkpoint, restore, save_checkpoint
from megan_fast.training.config import build_dataset, load_config
from megan_fast.training.run_dir import check_output_dir, undo_start, write_config

__all__ = ["EpochSampler", "TrainResult", "charbonnier", "lr_at", "main_train", "train", "validate"]


def charbonnier(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """mean(sqrt((pred - target)^2 + eps^2))."""
    return torch.sqrt((pred - target) ** 2 + eps * eps).mean()

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

@dataclasses.dataclass
class TrainResult:
    iteration: int
    last_loss: float
    checkpoint: str | None
    val_psnr: float | None

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

def _processes(device: str | None):
    """(distributed, rank, world size, torch.device) of this process (torchrun sets WORLD_SIZE, LOCAL_RANK)."""
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
    return distributed, rank, world, dev


def _optimizer(model: nn.Module, optim_cfg: dict):
    """Adam and the warm-up + cosine schedule of :func:`lr_at`."""
    optimizer = torch.optim.Adam(model.parameters(), lr=optim_cfg["lr"], betas=tuple(optim_cfg["betas"]),
                                 weight_decay=optim_cfg["weight_decay"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_at(it, optim_cfg) / optim_cfg["lr"])
    return optimizer, scheduler


def _mixed_precision(autocast: str, dev: torch.device):
    """(autocast dtype or None, whether autocast is on, gradient scaler) for ``optim.autocast`` on ``dev``."""
    amp_dtype = {"none": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[autocast]
    use_amp = amp_dtype is not None and dev.type == "cuda"
    if amp_dtype is not None and not use_amp:
        warnings.warn(f"optim.autocast {autocast} applies on CUDA devices only; training in float32 on {dev.type}",
                      stacklevel=3)
    return amp_dtype, use_amp, torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)


def _step(loss, model, optimizer, scheduler, scaler, grad_clip: float) -> None:
    """One optimizer step: scaled backward, optional clipping of the gradient norm, schedule."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()


@torch.no_grad()
def _update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm.detach(), 1 - decay)
    for be, bm in zip(ema.buffers(), model.buffers()):
        be.copy_(bm)


def _data(data_cfg: dict, seed: int, rank: int, world: int):
    """(train set, validation set or None, sampler, per-process batch, batches per epoch); ConfigError if the
    data cannot be opened or is too small."""
    train_set = _dataset(data_cfg["train"], seed, True, "data.train")
    val_set = _dataset(data_cfg["val"], 0, False, "data.val") if data_cfg.get("val") else None
    batch = int(data_cfg["batch_size"]) // world
    if batch < 1:
        raise ConfigError(f"data.batch_size {data_cfg['batch_size']} is smaller than the {world} processes")
    sampler = EpochSampler(len(train_set), seed, rank, world)
    per_epoch = len(sampler) // batch
    if per_epoch == 0:
        raise ConfigError(f"the training set has {len(train_set)} items: fewer than one batch of {batch} per process")
    return train_set, val_set, sampler, batch, per_epoch


def _epoch_batches(train_set, sampler: EpochSampler, batch: int, epoch: int, pos: int, num_workers: int,
                   dev: torch.device, seed: int):
    """The batches of ``epoch`` from batch ``pos`` on (a resumed run starts mid-epoch), workers started."""
    sampler.set_position(epoch, pos * batch)
    if hasattr(train_set, "set_epoch"):
        train_set.set_epoch(epoch)
    # Its own generator: creating a loader must not consume the global RNG,
    # or a resumed run would draw different memory frames than an uninterrupted one.
    loader = torch.utils.data.DataLoader(train_set, batch_size=batch, sampler=sampler, drop_last=True,
                                         num_workers=num_workers, pin_memory=dev.type == "cuda",
                                         worker_init_fn=_worker_init,
                                         generator=torch.Generator().manual_seed(seed + epoch))
    with outputs.signals_held():  # the workers start here (see signals_held)
        return iter(loader)


def _tensorboard(out_dir: str):
    """A SummaryWriter into ``out_dir/tensorboard``, or None when TensorBoard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(os.path.join(out_dir, "tensorboard"))


def _missing_parents(path: str) -> list[str]:
    """The parent folders of ``path`` that do not exist yet, innermost first (a run creates them)."""
    made, parent = [], os.path.dirname(path)
    while parent and not os.path.exists(parent):
        made.append(parent)
        parent = os.path.dirname(parent)
    return made


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

    distributed, rank, world, dev = _processes(device)
    seed = int(cfg["seed"])
    torch.manual_seed(seed + rank)
    optim_cfg, log_cfg, data_cfg = cfg["optim"], cfg["logging"], cfg["data"]
    out = check_output_dir(cfg, resume, list(inputs))
    out_dir = out.path
    ckpt_dir = os.path.join(out_dir, "checkpoints")

    train_set, val_set, sampler, batch, per_epoch = _data(data_cfg, seed, rank, world)

    model = MEGAN(dict(cfg["model"])).to(dev)
    _check_items(model.config, train_set, val_set)
    ema = copy.deepcopy(model).eval().requires_grad_(False) if optim_cfg["ema_decay"] > 0 else None
    optimizer, scheduler = _optimizer(model, optim_cfg)
    amp_dtype, use_amp, scaler = _mixed_precision(optim_cfg["autocast"], dev)

    start_it = 0
    if resume:
        path = latest_checkpoint(out_dir)
        start_it = restore(load_checkpoint(path), path, model, optimizer, scheduler, scaler, ema, rank, dev)

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
    made = _missing_parents(out_dir)
    writer = bar = batches = None
    try:
        if rank == 0:
            os.makedirs(ckpt_dir, exist_ok=True)
            write_config(out, cfg)
            writer = _tensorboard(out_dir) if log_cfg["tensorboard"] else None
        net = model
        if distributed:
            net = nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
        if optim_cfg["compile"] != "none":
            # Static shapes (drop_last keeps every batch one size): one graph, replayable as a CUDA graph.
            net = torch.compile(net, mode=optim_cfg["compile"], fullgraph=True, dynamic=False)
        num_frames = model.config.num_output_frames
        bar = tqdm(total=total, initial=start_it, unit="it", desc=cfg["name"], disable=not progress or rank != 0)
        model.train()
        while it < end:
            batches = _epoch_batches(train_set, sampler, batch, it // per_epoch, it % per_epoch,
                                     int(data_cfg["num_workers"]), dev, seed)
            for item in batches:
                outputs.raise_if_signalled()
                lq, gt = item["lq"].to(dev, non_blocking=True), item["gt"].to(dev, non_blocking=True)
                # LMGA's memory frames are drawn here, on the host, and passed in as a device tensor: the
                # same draws as an eager forward makes, and a captured step replays with fresh ones.
                kwargs = {}
                if model.lmga is not None:
                    kwargs["memory_indices"] = model.lmga.draw_memory_indices(num_frames).to(dev, non_blocking=True)
                with torch.autocast(dev.type, dtype=amp_dtype, enabled=use_amp):
                    loss = charbonnier(net(lq, **kwargs).float(), gt, optim_cfg["charbonnier_eps"])
                _step(loss, model, optimizer, scheduler, scaler, optim_cfg["grad_clip"])
                if ema is not None:
                    _update_ema(ema, model, optim_cfg["ema_decay"])
                it += 1
                bar.update(1)
                logging = rank == 0 and (it % log_cfg["print_every"] == 0 or it == total)
                if logging or it == end:
                    last_loss = loss.item()  # the loop's own host sync: on logging steps and the last one
                if logging:
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
            undo_start(out_dir, existed, made)  # a failed start leaves nothing: the same command can be run again
        raise
    finally:
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()
    if distributed:
        dist.barrier()
    return TrainResult(it, last_loss, saved, val_psnr)

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
