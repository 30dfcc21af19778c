"""A training run's folder (``output_dir``): what may be written there, and taking back a failed start.

``output_dir/config.yaml`` (the resolved config, marked as megan-fast's),
``checkpoints/iter_N.pt``, ``model/`` (the weights to evaluate) and
``tensorboard/``.  A fresh run needs a new or empty folder, ``--resume`` a
run; links among the run's own entries are refused; a run that fails before
its first checkpoint removes what it wrote (docs/DESIGN.md section 5).
"""

from __future__ import annotations

import contextlib
import os

import yaml

from megan_fast import outputs
from megan_fast.errors import CheckpointError
from megan_fast.training.checkpoints import latest_checkpoint, list_checkpoints
from megan_fast.training.config import TrainConfig

__all__ = ["CONFIG_KIND", "CONFIG_NAME", "RUN_ENTRIES", "RUN_KIND", "check_output_dir", "undo_start", "what_exists",
           "write_config"]


CONFIG_NAME = "config.yaml"

RUN_KIND = outputs.Kind("training run folder", folder=True)

CONFIG_KIND = outputs.Kind("run config")


def _data_inputs(config: TrainConfig) -> list[tuple[str, str | None]]:
    """The folders and files a config reads, as (entry, path): outputs may not overlap them."""
    found = []
    for part in ("train", "val"):
        spec = getattr(config.data, part) or {}
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

def check_output_dir(config: TrainConfig, resume: bool, inputs: list[tuple[str, str | None]] = ()) -> outputs.Output:
    """Checks ``output_dir`` before anything is written: a fresh run needs a new or empty folder, ``resume`` a run.

    Raises:
        OutputError: empty path, a file, overlapping an input, or not writable;
            a fresh run into a folder that holds files.
        CheckpointError: ``resume`` and no checkpoint in the folder.
    """
    own_config = os.path.join(os.path.abspath(str(config.output_dir or ".")), CONFIG_NAME)
    if resume:  # continuing a run from the config it saved: that file is read, then rewritten the same
        inputs = [(n, p) for n, p in inputs if not (p and os.path.realpath(p) == os.path.realpath(own_config))]
    out = outputs.check_output(config.output_dir, "output_dir", RUN_KIND, inputs=[*_data_inputs(config), *inputs],
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
    mine = [path for _, path in list_checkpoints(ckpt_dir)]
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

def what_exists(out_dir: str) -> tuple[set[str] | None, list[str]]:
    """Before a run writes into ``out_dir``: the names in it (None: no such folder) and its missing parent folders,
    innermost first (the run creates them); :func:`undo_start` takes back what the run adds."""
    existed = set(os.listdir(out_dir)) if os.path.isdir(out_dir) else None
    made, parent = [], os.path.dirname(out_dir)
    while parent and not os.path.exists(parent):
        made.append(parent)
        parent = os.path.dirname(parent)
    return existed, made


def undo_start(out_dir: str, existed: set[str] | None, made: list[str] = ()) -> None:
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


def write_config(out: outputs.Output, config: TrainConfig) -> None:
    """``output_dir/config.yaml``: the resolved config, marked as megan-fast's (replaced only if it is)."""
    config_out = out.child(CONFIG_NAME, CONFIG_KIND)
    config_out.check_existing()
    with config_out.atomic_file() as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(f"# {outputs.written_by('train')}: the resolved config of this run\n")
        yaml.safe_dump(config.to_dict(), f, sort_keys=False)
