"""Reading weights: a model folder of ours, or an official Zooming Slow-Mo or TMNet ``.pth`` file.

One reader of pickled files (:func:`load_plain`, ``torch.load(weights_only=True)``),
one loader of models (:func:`load_model`), and the checks that run before
anything is built: the size a file implies against what it stores and the
memory this process may allocate, the shapes of a folder's weights against
its config (docs/DESIGN.md section 5).  Every failure is one
:class:`~megan_fast.errors.CheckpointError` line naming the file.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import warnings

import torch
from torch import Tensor

from megan_fast.errors import CheckpointError, ConfigError, MissingCheckpointError
from megan_fast.models.config import MEGANConfig
from megan_fast.models.megan import MEGAN
from megan_fast.models.official import from_official_state_dict, looks_official
from megan_fast.models.saving import CONFIG_NAME, WEIGHTS_NAME

__all__ = ["available_memory", "check_memory", "check_state_size", "check_stored", "check_weights", "describe_mismatch",
           "load_folder", "load_model", "load_plain", "read_state_dict"]


_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def load_plain(path: str, what: str) -> object:
    """``torch.load(path, weights_only=True)``: tensors, numbers, strings, lists and dicts; nothing in it runs.

    The one reader of pickled files (official ``.pth`` weights, training
    checkpoints): any failure on the file's bytes, whatever torch's unpickler
    raises for them, is one :class:`CheckpointError` line, ``PATH: not a WHAT
    (reason)``; a file that would need Python objects (a pickle payload) is
    refused with the object's name only.
    """
    _check_archive(path, what)
    try:
        with warnings.catch_warnings():  # torch's notes on the pickle protocol: the error below says what matters
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except MemoryError:
        raise CheckpointError(f"{path}: not a {what} (it asks for more memory than this machine has)") from None
    except Exception as exc:  # noqa: BLE001 - untrusted bytes: any failure of the unpickler is "not readable"
        text = str(exc)
        found = _GLOBAL.search(text) if isinstance(exc, pickle.UnpicklingError) else None
        if found:  # torch names the refused object and how to allowlist it: only the name matters here
            raise CheckpointError(f"{path}: not a {what}: it holds Python objects ({found.group(1)}), which are not "
                                  "loaded (that would run code the file carries)") from None
        raise CheckpointError(f"{path}: not a {what} ({_reason(exc, text)})") from None


def _reason(exc: BaseException, text: str) -> str:
    """A few words on why torch's unpickler refused a file: its own first line, without its advice."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and "weights_only" not in ln
             and "add_safe_globals" not in ln and "allowlist" not in ln]
    if isinstance(exc, EOFError):
        return "the file ends early"
    if "can't allocate memory" in text or "alloc_cpu" in text:
        return "it asks for more memory than this machine has"
    if "Unsupported operand" in text:
        return "a pickle operation the safe loader does not read (save with torch.save's default protocol)"
    if "allowlisted via" in text or "Can only build" in text or "Can only create" in text:
        return "it needs objects the safe loader does not build"
    if isinstance(exc, (RuntimeError, pickle.UnpicklingError, OSError)) and lines:  # torch's own words
        return lines[0].removeprefix("[enforce fail at ").rstrip(".")[:160]
    return "not the bytes torch.save writes"  # KeyError: 101 and the like say nothing to a user


def _check_archive(path: str, what: str) -> None:
    """A zip file (torch.save's format) is read only if its members are stored as torch.save stores them
    (uncompressed: a deflated member could expand to gigabytes inside torch.load), their CRCs hold (torch does
    not check them: flipped bytes would load silently), and what they declare fits in memory."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return  # the legacy format, or not an archive: torch.load decides
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
            packed = [m.filename for m in members if m.compress_type != zipfile.ZIP_STORED]
            if packed:
                raise CheckpointError(f"{path}: not a {what} (member {packed[0]!r} is compressed; torch.save stores "
                                      "its members uncompressed)")
            total = sum(m.file_size for m in members)
            free = available_memory()
            if free is not None and total > free:
                raise CheckpointError(f"{path}: not a {what} (its members declare {total / 2**30:.1f} GiB; this "
                                      f"machine has {free / 2**30:.1f} GiB available)")
            bad = archive.testzip()
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, RuntimeError) as exc:
        reason = str(exc).splitlines()[0][:120] if str(exc) else "a damaged archive"
        raise CheckpointError(f"{path}: not a {what} ({reason})") from None
    if bad is not None:
        raise CheckpointError(f"{path}: not a {what} (CRC mismatch in {bad}: the file is damaged)")


def read_state_dict(path: str) -> dict[str, Tensor]:
    """A ``.pth`` state dict, read with :func:`load_plain` (``torch.load(weights_only=True)``: nothing in it runs).

    A DataParallel save's ``module.`` prefix is removed.  Anything that is not
    a mapping of names to tensors is a :class:`CheckpointError` naming the file.
    """
    if not os.path.exists(path):
        raise MissingCheckpointError(f"{path}: no such checkpoint file")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: not a regular file (a device, a pipe or a folder); give the .pth file itself")
    if path.endswith(".safetensors"):
        raise CheckpointError(f"{path}: a safetensors file; give the folder that holds it with its {CONFIG_NAME}")
    state = load_plain(path, "readable PyTorch weights file")
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a state dict (names -> tensors), got a {type(state).__name__}")
    keys = [k for k in state if not isinstance(k, str)]
    if keys:
        raise CheckpointError(f"{path}: expected a state dict (names -> tensors); key {keys[0]!r} is a "
                              f"{type(keys[0]).__name__}, not a name")
    bad = [k for k, v in state.items() if not isinstance(v, Tensor)]
    if bad:
        hint = " (a training checkpoint? save the state dict itself)" if isinstance(state[bad[0]], dict) else ""
        raise CheckpointError(f"{path}: expected a state dict of tensors; entry {bad[0]!r} is a "
                              f"{type(state[bad[0]]).__name__}{hint}")
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def check_stored(state: dict[str, Tensor], source: str) -> None:
    """Refuses tensors that claim more values than the file stores (views of one small storage, expanded with
    stride 0): such a file is a few megabytes on disk and gigabytes once a model is built from it."""
    plain = [v for v in state.values() if v.layout == torch.strided and not v.is_meta]  # others: check_weights
    claimed = sum(v.numel() * v.element_size() for v in plain)
    storages = {}
    for v in plain:
        storage = v.untyped_storage()
        storages[(storage.data_ptr(), storage.nbytes())] = storage.nbytes()
    stored = sum(storages.values())
    if claimed > stored:
        raise CheckpointError(f"{source}: its tensors claim {claimed / 2**20:,.1f} MiB of values but the file stores "
                              f"{stored / 2**20:,.1f} MiB (views of shared or expanded storage); expected plain "
                              "weights, one tensor each")


def check_state_size(state: dict[str, Tensor], source: str) -> None:
    """Refuses a state dict of tensors a model cannot hold (:func:`check_tensor_kinds`), whose tensors claim
    more values than the file stores, or more parameters than fit in this process's memory: checked on the
    names and shapes, before anything is built."""
    check_tensor_kinds(state, source)
    check_stored(state, source)
    check_memory(sum(v.numel() for v in state.values()), 0, source)


def _min_tensors(cfg: MEGANConfig) -> int:
    """A lower bound of the tensors a config's model has (4 per residual block, 6 per PFRDB)."""
    return 4 * (cfg.front_blocks + cfg.back_blocks) + 6 * cfg.num_pfrdb + (5 * cfg.graph_layers if cfg.lmga else 0)


def _header_shapes(weights_path: str) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of a safetensors file, from its header (no tensor is read)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(weights_path, "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{weights_path}: not a readable safetensors file ({exc})") from None


def _check_fits(cfg: MEGANConfig, config_path: str, weights_path: str, header: dict[str, tuple[int, ...]]) -> None:
    """Refuses a config with more blocks than the weights file has tensors, or more parameters in its residual
    blocks alone than the file holds values, before building even a meta model of it (``back_blocks:
    100000000``, or 20,000 blocks beside as many empty tensors, would take minutes and gigabytes to fail)."""
    name = os.path.basename(weights_path)
    if _min_tensors(cfg) > len(header):
        raise CheckpointError(f"{config_path}: the config has more blocks than {name} has tensors "
                              f"({len(header)}); the weights do not fit this config")
    values = sum(math.prod(shape) for shape in header.values())
    if 2 * (cfg.front_blocks + cfg.back_blocks) * 9 * cfg.nf * cfg.nf > values:
        raise CheckpointError(f"{config_path}: the config's residual blocks alone have more parameters than {name} "
                              f"holds values ({values:,}); the weights do not fit this config")


def describe_mismatch(own: dict[str, tuple[int, ...]], given: dict[str, tuple[int, ...]],
                      strict: bool = True) -> str | None:
    """What differs between a model's tensor shapes and those of some weights, in a few words; None if they fit."""
    bad = [f"{k}: checkpoint {v} vs model {own[k]}" for k, v in given.items() if k in own and v != own[k]]
    if bad:
        return (f"{len(bad)} tensor(s) of another shape (" + "; ".join(bad[:3]) + ("; ..." if len(bad) > 3 else "")
                + ")")
    if strict:
        missing = [k for k in own if k not in given]
        unexpected = [k for k in given if k not in own]
        parts = ([f"{len(missing)} missing (e.g. {missing[0]!r})"] if missing else []) + (
            [f"{len(unexpected)} unexpected (e.g. {unexpected[0]!r})"] if unexpected else [])
        if parts:
            return "tensors " + " and ".join(parts)
    return None


def available_memory() -> int | None:
    """Bytes this process may still allocate: the system's available memory, and the address-space limit
    (``ulimit -v``) less what the process maps already; None where neither can be read (not Linux)."""
    import resource

    limits = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    limits.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    soft = resource.getrlimit(resource.RLIMIT_AS)[0]
    if soft != resource.RLIM_INFINITY:
        try:
            with open("/proc/self/status") as f:
                mapped = next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmSize:"))
            limits.append(max(soft - mapped, 0))
        except (OSError, ValueError, IndexError, StopIteration):
            limits.append(soft)
    return min(limits) if limits else None


def check_memory(params: int, extra_bytes: int, source: str) -> None:
    """Refuses, before anything is built, a model of ``params`` float32 parameters (plus ``extra_bytes`` of
    weights read beside it) that does not fit in this machine's available memory."""
    need = 4 * params + extra_bytes
    free = available_memory()
    if free is not None and need > free:
        raise CheckpointError(f"{source}: the model has {params:,} parameters and needs about {need / 2**30:.1f} GiB "
                              f"to load; this machine has {free / 2**30:.1f} GiB available")


def check_tensor_kinds(state: dict, source: str) -> None:
    """Refuses tensors a model cannot hold: not dense (sparse, nested, meta) or not of a floating dtype it runs."""
    for k, v in state.items():
        if not isinstance(v, torch.Tensor) or v.is_nested or v.layout != torch.strided or v.is_meta:
            kind = ("a meta tensor (shapes without values)" if getattr(v, "is_meta", False) else
                    "a nested tensor" if getattr(v, "is_nested", False) else
                    f"a {getattr(v, 'layout', type(v).__name__)} tensor")
            raise CheckpointError(f"{source}: tensor {k!r} is {kind}; expected plain dense weights")
        if v.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            what = "which is not supported" if v.is_floating_point() else "not floating point"
            raise CheckpointError(f"{source}: tensor {k!r} has dtype {str(v.dtype).removeprefix('torch.')}, {what}; "
                                  "expected float16, bfloat16, float32 or float64 weights")


def check_weights(state: dict, source: str) -> None:
    """Refuses weights a model cannot use: :func:`check_tensor_kinds`, or NaN/infinite values in float32."""
    check_tensor_kinds(state, source)
    broken = [k for k, v in state.items() if not bool(torch.isfinite(v.float()).all())]
    if broken:
        raise CheckpointError(f"{source}: {len(broken)} tensor(s) hold NaN or infinite weights (e.g. {broken[0]!r}) "
                              "in float32; the model would give garbage")


def load_folder(directory: str | os.PathLike, map_location: str | torch.device = "cpu", cls: type = MEGAN) -> MEGAN:
    """The model of a folder with ``config.json`` and ``model.safetensors`` (:meth:`MEGAN.from_pretrained`).

    The config is checked and built on the meta device first: its shapes are
    compared with the safetensors header and its size with the available
    memory before any tensor is allocated or read.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = os.fspath(directory)
    config_path = os.path.join(directory, CONFIG_NAME)
    weights_path = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isdir(directory):
        raise MissingCheckpointError(f"{directory}: no such checkpoint folder (expected {CONFIG_NAME} and "
                                     f"{WEIGHTS_NAME})")
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise MissingCheckpointError(f"{path} not found (a checkpoint folder holds {CONFIG_NAME} and "
                                         f"{WEIGHTS_NAME})")
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:  # ValueError: also 5000-digit ints
        raise CheckpointError(f"{config_path}: not a readable JSON file ({str(exc)[:120]})") from None
    if isinstance(config, dict):
        config.pop("written_by", None)  # save_pretrained's mark (a command's), not a config field
    try:
        cfg = MEGANConfig.from_dict(config, source=config_path)
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None
    header = _header_shapes(weights_path)
    _check_fits(cfg, config_path, weights_path, header)
    try:
        with torch.device("meta"):  # shapes and size first: nothing is allocated
            plan = cls(cfg)
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None
    except (RuntimeError, OverflowError, TypeError, ValueError, MemoryError) as exc:  # sizes torch cannot hold
        raise CheckpointError(f"{config_path}: a config this package cannot build "
                              f"({str(exc).splitlines()[0][:120]})") from None
    mismatch = describe_mismatch({k: tuple(v.shape) for k, v in plan.state_dict().items()}, header)
    if mismatch:
        raise CheckpointError(f"{weights_path}: the weights do not fit this model's config ({CONFIG_NAME}): "
                              f"{mismatch}")
    check_memory(sum(p.numel() for p in plan.parameters()), os.path.getsize(weights_path), config_path)
    try:
        model = cls(cfg)
    except (RuntimeError, MemoryError) as exc:  # the estimate above was short of what the allocator wanted
        raise CheckpointError(f"{config_path}: cannot build this model here ({str(exc).splitlines()[0]})") from None
    try:
        state = load_file(weights_path, device=str(map_location))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{weights_path}: not a readable safetensors file ({exc})") from None
    check_weights(state, weights_path)
    model.load_state_dict(state)  # the shapes and names were compared with the header above
    return model


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> MEGAN:
    """A ready model (eval mode) from a folder of ours or an official Zooming Slow-Mo or TMNet ``.pth`` file.

    Args:
        path: a folder with ``config.json`` and ``model.safetensors``
            (:meth:`MEGAN.save_pretrained`, ``megan-fast train``, ``megan-fast
            convert``), or a ``.pth`` file holding an official network's state
            dict (Zooming Slow-Mo's, or either of TMNet's two released files;
            plain, or a DataParallel save with ``module.``).
        map_location: the device the model is put on.

    Raises:
        MissingCheckpointError: no such folder or file.
        CheckpointError: anything else that is wrong with it, in one line
            naming the file (a ``.pth`` is read with ``weights_only=True``:
            a pickle carrying objects other than tensors is refused, never run).
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        model = MEGAN.from_pretrained(path, map_location=map_location)
    elif not os.path.exists(path):
        raise MissingCheckpointError(f"{path}: no such checkpoint (expected a folder with {CONFIG_NAME} and "
                                     f"{WEIGHTS_NAME}, or an official Zooming Slow-Mo or TMNet .pth file)")
    else:
        state = read_state_dict(path)
        if not looks_official(state) and any(k.startswith(("features.", "convlstm.", "reconstruction.")) for k in state):
            raise CheckpointError(f"{path}: a state dict of this package's own names without its {CONFIG_NAME}; "
                                  "save models with MEGAN.save_pretrained (a folder) to load them here")
        model = from_official_state_dict(state, source=path).to(map_location)
    return model.eval()
