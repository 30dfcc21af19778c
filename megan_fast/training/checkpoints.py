"""Training checkpoints: ``checkpoints/iter_N.pt`` of a run folder, plain data only (weights_only loading).

A checkpoint holds the model, optimizer, scheduler, gradient scaler and EMA
states, the iteration and every RNG state (as tensors), so that ``--resume``
continues exactly; it is read with ``torch.load(weights_only=True)``, so a
planted file cannot run code (docs/DESIGN.md section 5).
"""

from __future__ import annotations

import os
import re

import torch
import torch.distributed as dist

from megan_fast import outputs
from megan_fast.errors import CheckpointError
from megan_fast.models.loading import check_stored, load_plain

__all__ = ["CHECKPOINT_PREFIX", "latest_checkpoint", "list_checkpoints", "load_checkpoint", "restore", "save_checkpoint"]


CHECKPOINT_PREFIX = "iter_"

CHECKPOINT_RE = re.compile(r"iter_(\d+)\.pt")

CHECKPOINT_KIND = outputs.Kind("training checkpoint", entries=CHECKPOINT_RE.pattern, by_name=True)


def list_checkpoints(ckpt_dir: str) -> list[tuple[int, str]]:
    """(iteration, path) of the ``iter_N.pt`` files in ``ckpt_dir``, oldest first (other names are ignored)."""
    if not os.path.isdir(ckpt_dir):
        return []
    found = [(int(m.group(1)), n) for n in os.listdir(ckpt_dir) if (m := CHECKPOINT_RE.fullmatch(n))]
    return [(it, os.path.join(ckpt_dir, n)) for it, n in sorted(found)]

def latest_checkpoint(output_dir: str) -> str | None:
    """The path of the newest ``checkpoints/iter_N.pt`` of a run folder, or None."""
    found = list_checkpoints(os.path.join(output_dir, "checkpoints"))
    return found[-1][1] if found else None

_CHECKPOINT_ENTRIES = {"model": dict, "optimizer": dict, "scheduler": dict, "iteration": int, "rng": dict}

def load_checkpoint(path: str) -> dict:
    """Reads a training checkpoint with ``torch.load(weights_only=True)``: tensors, numbers, strings, lists, dicts.

    Raises:
        CheckpointError: unreadable, not a checkpoint (nothing in it is run:
            no unpickling of objects), or missing entries; the path is named.
    """
    state = load_plain(path, "megan-fast training checkpoint")
    tensors = dict(_tensors(state))
    try:
        check_stored(tensors, path)  # views that claim more than the file stores: gigabytes from megabytes
    except CheckpointError as exc:
        raise CheckpointError(f"not a megan-fast training checkpoint: {exc}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a megan-fast training checkpoint (holds a {type(state).__name__})")
    for key, kind in _CHECKPOINT_ENTRIES.items():
        if not isinstance(state.get(key), kind) or isinstance(state.get(key), bool):
            raise CheckpointError(f"{path}: not a megan-fast training checkpoint (entry {key!r} missing or wrong)")
    if state["iteration"] < 0:
        raise CheckpointError(f"{path}: not a megan-fast training checkpoint (iteration {state['iteration']})")
    return state

def _tensors(obj, at: str = ""):
    """(where, tensor) of every tensor in a checkpoint's nested dicts and lists."""
    if isinstance(obj, torch.Tensor):
        yield at or "checkpoint", obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{at}.{k}" if at else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{at}[{i}]")


def _check_optimizer_shapes(saved: dict, optimizer) -> None:
    """The optimizer's saved moments have their parameters' shapes (torch's own load does not check: a wrong one
    fails at the first step, with a traceback)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, entries in (saved.get("state") or {}).items():
        if not isinstance(index, int) or not 0 <= index < len(params) or not isinstance(entries, dict):
            raise CheckpointError(f"optimizer state {index!r} belongs to no parameter of this model")
        for name, value in entries.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != params[index].shape:
                raise CheckpointError(f"optimizer state {index}.{name} has shape {tuple(value.shape)}, its parameter "
                                      f"{tuple(params[index].shape)}")


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
           "lmga": model.lmga.generator.get_state() if getattr(model.lmga, "generator", None) is not None else None}
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
    # Also a ready-to-use model folder (safetensors + config) of the weights to evaluate, replaced whole.
    model_dir = os.path.join(out_dir, "model")
    with outputs.Output(model_dir, "model folder", outputs.MODEL_FOLDER_KIND, True, model_dir).atomic_folder() as tmp:
        (ema or model).save_pretrained(tmp, written_by=outputs.written_by("model"))
    for _, old in list_checkpoints(ckpt_dir)[:-keep] if keep > 0 else []:
        os.remove(old)
    return path

def restore(state: dict, path: str, model, optimizer, scheduler, scaler, ema, rank: int, dev) -> int:
    """Loads a checkpoint's states into the training objects; returns its iteration."""
    try:
        model.load_state_dict(state["model"])
        _check_optimizer_shapes(state["optimizer"], optimizer)
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
        if getattr(model.lmga, "generator", None) is not None and rng.get("lmga") is not None:
            model.lmga.generator.set_state(rng["lmga"])
    except (CheckpointError, ValueError, KeyError, TypeError, RuntimeError, IndexError) as exc:
        raise CheckpointError(f"{path}: does not fit this run's config ({exc})") from None
    return int(state["iteration"])
