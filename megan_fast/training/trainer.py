"""The training loop as a class of named steps (:class:`Trainer`), and the functions that run it.

One process, or many with ``torchrun`` (DistributedDataParallel + a
distributed sampler; gloo on CPU, NCCL on GPU).  The data order, the RNG
draws and every state are restored on ``--resume``, so a resumed run makes
the steps the uninterrupted run would have made (bit for bit on CPU;
docs/DESIGN.md section 3).  Everything is checked before anything is
written, and a run that fails before its first checkpoint takes back what it
wrote (section 5).
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import nn

from megan_fast import outputs
from megan_fast._checks import check_int as _int
from megan_fast.distributed import init_processes
from megan_fast.errors import CheckpointError, ConfigError
from megan_fast.models import MEGAN
from megan_fast.training.checkpoints import latest_checkpoint, load_checkpoint, restore, save_checkpoint
from megan_fast.training.config import TrainConfig, load_config
from megan_fast.training.datasets import (build_dataset, check_items, epoch_batches, open_dataset,
                                          per_process_batches)
from megan_fast.training.optim import build_optimizer, charbonnier, mixed_precision, update_ema
from megan_fast.training.run_dir import check_output_dir, undo_start, what_exists, write_config

__all__ = ["TrainResult", "Trainer", "main_train", "train", "validate"]


@dataclasses.dataclass
class TrainResult:
    """Where a run ended: its iteration, the last loss read on the host (NaN if it made no step), the checkpoint
    it wrote last (None: none; always None on ranks other than 0) and the last validation PSNR (None: none)."""

    iteration: int
    last_loss: float
    checkpoint: str | None
    val_psnr: float | None


def _tensorboard(out_dir: str):
    """A SummaryWriter into ``out_dir/tensorboard``, or None when TensorBoard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(os.path.join(out_dir, "tensorboard"))


class Trainer:
    """Trains (or resumes) MEGAN as configured, in named steps a subclass may override (as BasicSR's models).

    :meth:`fit` runs :meth:`setup` (processes, data, model, optimizer, the
    resumed state: everything checked, nothing written), then per iteration
    :meth:`step` (forward, :meth:`compute_loss`, :meth:`optimizer_step`, EMA),
    :meth:`on_step_end`, the loss line, :meth:`validate` and :meth:`save` at
    their intervals, until ``optim.iterations`` or ``stop_at``.  A subclass
    changes the loss with :meth:`compute_loss`, the network with
    :meth:`build_model`, the data with :meth:`build_datasets`, and observes
    the steps with :meth:`on_step_end`; resume stays exact as long as what it
    draws from the RNGs happens inside an iteration (the checkpoint is
    written at its end).

    Args:
        config: a :class:`TrainConfig` (:func:`load_config`), or a mapping in
            the YAML layout (checked by :meth:`TrainConfig.from_dict`).
        resume: continue from the newest checkpoint in ``output_dir``.
        device: "cpu", "cuda", "cuda:1"; None: this process's GPU if any.
        progress: show a progress bar (rank 0).
        stop_at: end after this iteration (with a checkpoint), the schedule
            unchanged, so that ``resume`` continues it later.
        inputs: more (name, path) pairs that ``output_dir`` may not overlap
            (the config file).

    After :meth:`setup`: ``device``, ``rank``, ``world``, ``distributed``,
    ``model`` (the :class:`MEGAN`), ``net`` (what the steps run: the model,
    wrapped by DDP and ``torch.compile`` as configured), ``ema`` (or None),
    ``optimizer``, ``scheduler``, ``scaler``, ``train_set``, ``val_set`` (or
    None) and ``iteration`` (the number of steps made).
    """

    def __init__(self, config: TrainConfig | Mapping, resume: bool = False, device: str | None = None,
                 progress: bool = True, stop_at: int | None = None,
                 inputs: list[tuple[str, str | None]] = ()) -> None:
        self.config = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config)
        self.resume, self.progress, self.stop_at, self.inputs = resume, progress, stop_at, list(inputs)
        self._device = device
        self.model: MEGAN | None = None
        self.iteration = 0
        self.last_loss = float("nan")
        self.val_psnr: float | None = None
        self.checkpoint: str | None = None
        self.writer = None

    # ------------------------------------------------------------------ set-up: checks only, nothing written

    def setup(self) -> None:
        """Processes, output folder, data, model, optimizer and the resumed state, in this order (the RNG draws of
        a run depend on it); raises ConfigError, OutputError or CheckpointError before anything is written
        (docs/DESIGN.md section 5).  :meth:`fit` calls it if it was not called before."""
        cfg = self.config
        world, self.device = init_processes(self._device)
        self.distributed, self.rank, self.world = world.distributed, world.rank, world.size
        torch.manual_seed(cfg.seed + self.rank)
        self.out = check_output_dir(cfg, self.resume, self.inputs)
        self.train_set, self.val_set = self.build_datasets()
        self.sampler, self.batch_size, self.per_epoch = per_process_batches(
            len(self.train_set), cfg.data.batch_size, cfg.seed, self.rank, self.world)
        self.model = self.build_model().to(self.device)
        check_items(self.model.config, self.train_set, self.val_set)
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False) if cfg.optim.ema_decay > 0 else None
        self.optimizer, self.scheduler = build_optimizer(self.model, cfg.optim)
        self.amp_dtype, self.use_amp, self.scaler = mixed_precision(cfg.optim.autocast, self.device)
        if self.resume:
            self.iteration = self.restore()
        # Everything is checked: only now may anything be written (once every process has checked: rank 0's
        # config.yaml must not make another process's "output_dir is not empty" check fail).
        if self.distributed:
            dist.barrier()
        self.net = self.wrap_model()

    def build_datasets(self):
        """(training set, validation set or None) of ``data.train`` / ``data.val``; ConfigError naming the entry
        if one cannot be opened."""
        data = self.config.data
        train_set = open_dataset(data.train, self.config.seed, True, "data.train")
        val_set = open_dataset(data.val, 0, False, "data.val") if data.val else None
        return train_set, val_set

    def build_model(self) -> MEGAN:
        """The network of ``model:`` (on the CPU; :meth:`setup` moves it to the device), after a check on the
        meta device that it fits in memory with its gradients and Adam's two moments."""
        from megan_fast.models.loading import check_memory

        config = self.config.model_config()
        try:
            with torch.device("meta"):
                params = sum(p.numel() for p in MEGAN(config).parameters())
            check_memory(4 * params, 0, "model")
        except (RuntimeError, OverflowError, MemoryError) as exc:
            raise ConfigError(f"model: a network this package cannot build ({str(exc).splitlines()[0][:120]})") \
                from None
        except CheckpointError as exc:
            raise ConfigError(str(exc)) from None
        return MEGAN(config)

    def restore(self) -> int:
        """Loads the newest checkpoint of the run folder into the model, EMA, optimizer, scheduler, scaler and the
        RNGs; returns its iteration.  CheckpointError if it is unreadable or does not fit the run."""
        path = latest_checkpoint(self.out.path)
        return restore(load_checkpoint(path), path, self.model, self.optimizer, self.scheduler, self.scaler,
                       self.ema, self.rank, self.device)

    def wrap_model(self) -> nn.Module:
        """What the steps run: the model, in DistributedDataParallel over several processes, and compiled as one
        graph with ``optim.compile`` (docs/DESIGN.md section 3, "Compiled and batched paths")."""
        net = self.model
        if self.distributed:
            net = nn.parallel.DistributedDataParallel(net, device_ids=[self.device.index]
                                                      if self.device.type == "cuda" else None)
        if self.config.optim.compile != "none":
            # Static shapes (drop_last keeps every batch one size): one graph, replayable as a CUDA graph.
            net = torch.compile(net, mode=self.config.optim.compile, fullgraph=True, dynamic=False)
        return net

    # ------------------------------------------------------------------ one iteration

    def batches(self, epoch: int, start: int):
        """The batches of ``epoch`` from its batch ``start`` on, in the run's fixed order, data workers started."""
        return epoch_batches(self.train_set, self.sampler, self.batch_size, epoch, start,
                             self.config.data.num_workers, self.device.type == "cuda", self.config.seed)

    def compute_loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The loss of frames ``pred`` (float32) against ``target``, both (b, t, 3, H, W): Charbonnier with
        ``optim.charbonnier_eps``."""
        return charbonnier(pred, target, self.config.optim.charbonnier_eps)

    def step(self, batch: dict) -> torch.Tensor:
        """One training step on a batch (``lq`` (b, n, 3, h, w), ``gt`` (b, 2n - 1, 3, 4h, 4w)): the forward under
        ``optim.autocast``, :meth:`compute_loss`, :meth:`optimizer_step` and the EMA update.  Returns the loss,
        not read on the host."""
        dev = self.device
        lq, gt = batch["lq"].to(dev, non_blocking=True), batch["gt"].to(dev, non_blocking=True)
        # LMGA's memory frames are drawn here, on the host, and passed in as a device tensor: the same draws
        # as an eager forward makes, and a captured step replays with fresh ones.
        kwargs = {}
        if self.model.lmga is not None:
            frames = self.model.config.num_output_frames
            kwargs["memory_indices"] = self.model.lmga.draw_memory_indices(frames).to(dev, non_blocking=True)
        with torch.autocast(dev.type, dtype=self.amp_dtype, enabled=self.use_amp):
            loss = self.compute_loss(self.net(lq, **kwargs).float(), gt)
        self.optimizer_step(loss)
        if self.ema is not None:
            update_ema(self.ema, self.model, self.config.optim.ema_decay)
        return loss

    def optimizer_step(self, loss: torch.Tensor) -> None:
        """Backward of ``loss`` (scaled), clipping of the gradient norm (``optim.grad_clip``), the Adam step and
        the schedule's."""
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.config.optim.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.config.optim.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()

    def on_step_end(self, iteration: int, loss: torch.Tensor) -> None:
        """Called after every step, with the number of steps made and the step's loss (a device tensor: reading
        it waits for the step); before that iteration's loss line, validation and checkpoint.  Does nothing."""

    # ------------------------------------------------------------------ validation and checkpoints

    def validate(self) -> float:
        """Mean Y-PSNR of the EMA weights (else the model's) over the validation set; back in training mode after."""
        psnr = validate(self.ema or self.model, self.val_set, self.device)
        self.model.train()
        return psnr

    def save(self) -> str | None:
        """Writes ``checkpoints/iter_N.pt`` and ``model/`` and prunes old checkpoints (rank 0; every rank gives its
        RNG state); returns the checkpoint's path (None on other ranks)."""
        return save_checkpoint(self.out.path, self.iteration, self.model, self.optimizer, self.scheduler, self.ema,
                               self.rank, self.world, self.config.logging.keep_checkpoints, self.scaler)

    # ------------------------------------------------------------------ the loop

    def fit(self) -> TrainResult:
        """Runs the iterations from where the run stands to ``optim.iterations`` (or ``stop_at``); returns where it
        ended.  A failure or a signal (``megan_fast.outputs``: SIGTERM raises like Ctrl-C) stops the data workers
        and, when no checkpoint was written yet, takes back what the run wrote (docs/DESIGN.md section 5)."""
        from tqdm import tqdm

        if self.model is None:
            self.setup()
        out_dir = self.out.path
        existed, made = what_exists(out_dir)
        self.writer = bar = batches = None
        try:
            self._write_run_files()
            bar = tqdm(total=self.config.optim.iterations, initial=self.iteration, unit="it",
                       desc=self.config.name, disable=not self.progress or self.rank != 0)
            self.model.train()
            while self.iteration < self._end:
                batches = self.batches(self.iteration // self.per_epoch, self.iteration % self.per_epoch)
                for batch in batches:
                    outputs.raise_if_signalled()
                    loss = self.step(batch)
                    self.iteration += 1
                    bar.update(1)
                    self.on_step_end(self.iteration, loss)
                    self._log(loss, bar)
                    self._validate_and_save()
                    if self.iteration >= self._end or self.iteration % self.per_epoch == 0:
                        break
                with outputs.signals_held():  # ... and are joined here
                    batches = None
        except BaseException:
            with outputs.signals_held():  # stop the data workers now, not whenever the iterator is collected
                del batches
            self._close_writer()
            if self.rank == 0 and not self.resume and latest_checkpoint(out_dir) is None:
                undo_start(out_dir, existed, made)  # a failed start leaves nothing: the same command can run again
            raise
        finally:
            if bar is not None:
                bar.close()
            self._close_writer()
        if self.distributed:
            dist.barrier()
        return TrainResult(self.iteration, self.last_loss, self.checkpoint, self.val_psnr)

    @property
    def _end(self) -> int:
        """The iteration this run stops after: ``optim.iterations``, or ``stop_at`` if earlier."""
        total = self.config.optim.iterations
        return min(total, self.stop_at) if self.stop_at is not None else total

    def _write_run_files(self) -> None:
        """The run's first writes (rank 0): ``checkpoints/``, ``config.yaml`` and the TensorBoard writer."""
        if self.rank != 0:
            return
        os.makedirs(os.path.join(self.out.path, "checkpoints"), exist_ok=True)
        write_config(self.out, self.config)
        self.writer = _tensorboard(self.out.path) if self.config.logging.tensorboard else None

    def _close_writer(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def _log(self, loss: torch.Tensor, bar) -> None:
        """Reads the loss on the host on logging steps and the last one (the loop's only host sync), and shows it
        with the learning rate on the progress bar and in TensorBoard."""
        it, log = self.iteration, self.config.logging
        logging = self.rank == 0 and (it % log.print_every == 0 or it == self.config.optim.iterations)
        if logging or it == self._end:
            self.last_loss = loss.item()
        if logging:
            lr = self.scheduler.get_last_lr()[0]
            bar.set_postfix(loss=f"{self.last_loss:.4f}", lr=f"{lr:.2e}")
            if self.writer is not None:
                self.writer.add_scalar("train/loss", self.last_loss, it)
                self.writer.add_scalar("train/lr", lr, it)

    def _validate_and_save(self) -> None:
        """Validation (rank 0) every ``logging.val_every`` iterations and at the last, a checkpoint every
        ``logging.save_every`` and at the end of this run."""
        it, log = self.iteration, self.config.logging
        if self.val_set is not None and self.rank == 0 and (it % log.val_every == 0
                                                            or it == self.config.optim.iterations):
            self.val_psnr = self.validate()
            if self.writer is not None:
                self.writer.add_scalar("val/psnr_y", self.val_psnr, it)
        if it % log.save_every == 0 or it == self._end:
            self.checkpoint = self.save()


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


def train(cfg: TrainConfig | Mapping, resume: bool = False, device: str | None = None, progress: bool = True,
          stop_at: int | None = None, inputs: list[tuple[str, str | None]] = ()) -> TrainResult:
    """Runs (or resumes) training as configured: ``Trainer(cfg, ...).fit()`` (see :class:`Trainer`)."""
    return Trainer(cfg, resume=resume, device=device, progress=progress, stop_at=stop_at, inputs=inputs).fit()


def main_train(config: str, output_dir: str | None = None, iterations: int | None = None, resume: bool = False,
               device: str | None = None, stop_at: int | None = None, progress: bool = True) -> TrainResult:
    """``megan-fast train``: loads ``config``, applies the overrides, trains (:func:`train`); the config file is an
    input (``output_dir`` may not overlap it)."""
    cfg = load_config(config)
    if output_dir is not None:
        cfg.output_dir = output_dir
    if iterations is not None:
        cfg.optim.iterations = _int("--iterations", iterations, 1)
    if stop_at is not None:
        _int("--stop-at", stop_at, 1)
    return train(cfg, resume=resume, device=device, stop_at=stop_at, progress=progress,
                 inputs=[("--config", config)])
