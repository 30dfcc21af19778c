"""One entry point for weights: a model folder of ours, or an official Zooming Slow-Mo or TMNet ``.pth`` file.

The official Zooming Slow-Mo network (Xiang et al., CVPR 2020, ``LunaTokis``
in the authors' code) is ``MEGANConfig.zooming_slowmo()`` of this family, and
TMNet (Xu et al., CVPR 2021, ``TMNet``), which builds on it, is
``MEGANConfig.tmnet()``; their released files are plain state dicts whose
key names are the authors' module names.  This module knows those names
(facts about the released files, docs/DESIGN.md section 3) and renames them
to ours; the arithmetic is the same layer for layer (their ``DCN_sep``
offsets are the first two thirds of ``conv_offset_mask``, in torchvision's
layout, as ours are).
"""

from __future__ import annotations

import os
import pickle
import re
import warnings

import torch
from torch import Tensor

from megan_fast.errors import CheckpointError, ConfigError, MissingCheckpointError
from megan_fast.models.megan import CONFIG_NAME, WEIGHTS_NAME, MEGAN, MEGANConfig, check_memory, check_weights

__all__ = ["load_model", "official_names", "read_state_dict", "from_official_state_dict"]

# The official PCD alignment: suffix _1 aligns the first frame's pyramid to the second's, _2 the reverse.
_PCD_DIRECTIONS = {"1": "align_1to2", "2": "align_2to1"}


def _pcd_names(official: str, ours: str) -> dict[str, str]:
    """Official -> our names of one PCD alignment (prefixes without the trailing dot)."""
    names = {}
    for j, direction in _PCD_DIRECTIONS.items():
        for lvl in ("1", "2", "3"):
            convs = ("1", "2") if lvl == "3" else ("1", "2", "3")
            for k in convs:
                names[f"{official}.L{lvl}_offset_conv{k}_{j}"] = f"{ours}.{direction}.l{lvl}_offset_conv{k}"
            names[f"{official}.L{lvl}_dcnpack_{j}"] = f"{ours}.{direction}.l{lvl}_dcn"
            names[f"{official}.L{lvl}_dcnpack_{j}.conv_offset_mask"] = f"{ours}.{direction}.l{lvl}_dcn.conv_offset"
            if lvl != "3":
                names[f"{official}.L{lvl}_fea_conv_{j}"] = f"{ours}.{direction}.l{lvl}_fea_conv"
    return names


def _pyramid_names(official: str, ours: str) -> dict[str, str]:
    return {f"{official}.fea_L{lvl}_conv{k}" if official else f"fea_L{lvl}_conv{k}": f"{ours}.l{lvl}_conv{k}"
            for lvl in ("2", "3") for k in ("1", "2")}


def official_names(front_blocks: int = 5, back_blocks: int = 40, tmnet: bool = False) -> dict[str, str]:
    """Every tensor name of an official file -> its name in :class:`MEGAN`.

    Zooming Slow-Mo (``MEGANConfig.zooming_slowmo()``): 416 names for the
    released network (5 front and 40 back residual blocks).  ``tmnet``
    (``MEGANConfig.tmnet()``): 482, its temporal modulation blocks
    (``pcd_align.TMB_A_l1`` .. ``TMB_B_l3``) and its neighbour comparison
    (``layersAtBOffset``, ``layersAtB``, ``layersCtBOffset``, ``layersCtB``,
    ``layersFusion``) added.
    """
    modules = {"conv_first": "features.conv_first", "fusion": "interpolation.fusion",
               "ConvBLSTM.forward_net.cell_list.0.conv": "convlstm.cell", "ConvBLSTM.conv_1x1": "convlstm.fusion",
               "upconv1": "reconstruction.upconv1", "upconv2": "reconstruction.upconv2",
               "HRconv": "reconstruction.conv_hr", "conv_last": "reconstruction.conv_last"}
    for i in range(front_blocks):
        for conv in ("conv1", "conv2"):
            modules[f"feature_extraction.{i}.{conv}"] = f"features.trunk.{i}.{conv}"
    for i in range(back_blocks):
        for conv in ("conv1", "conv2"):
            modules[f"recon_trunk.{i}.{conv}"] = f"reconstruction.trunk.{i}.{conv}"
    modules.update(_pyramid_names("", "features.pyramid"))
    modules.update(_pcd_names("pcd_align", "interpolation"))
    for state in ("h", "c"):
        official, ours = f"ConvBLSTM.forward_net.pcd_{state}", f"convlstm.pcd_{state}"
        modules.update(_pyramid_names(official, f"{ours}.pyramid"))
        modules.update(_pcd_names(f"{official}.pcd_align", f"{ours}.pcd"))
        modules[f"{official}.fusion"] = f"{ours}.pcd.fusion"
    weight_only = {}
    if tmnet:
        # TMB_A modulates the first frame's branch (suffix _1), TMB_B the second's (_2).
        for branch, direction in (("A", "align_1to2"), ("B", "align_2to1")):
            for lvl in ("1", "2", "3"):
                official, ours = f"pcd_align.TMB_{branch}_l{lvl}", f"interpolation.{direction}.l{lvl}_time"
                for i in ("0", "2", "4"):  # the time MLP's 1x1 convs have no bias
                    weight_only[f"{official}.t_process.{i}.weight"] = f"{ours}.time_mlp.{i}.weight"
                for i in ("0", "2"):
                    modules[f"{official}.f_process.{i}"] = f"{ours}.features.{i}"
        for official, side in (("AtB", "prev"), ("CtB", "next")):
            for i in ("0", "2"):
                modules[f"layers{official}Offset.{i}"] = f"comparison.offset_{side}.{i}"
            modules[f"layers{official}"] = f"comparison.dcn_{side}"
            modules[f"layers{official}.conv_offset_mask"] = f"comparison.dcn_{side}.conv_offset"
        for i in ("0", "2", "4", "6"):
            modules[f"layersFusion.{i}"] = f"comparison.fusion.{i}"
    names = {f"{a}.{p}": f"{b}.{p}" for a, b in modules.items() for p in ("weight", "bias")}
    return {**names, **weight_only}


_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def load_plain(path: str, what: str) -> object:
    """``torch.load(path, weights_only=True)``: tensors, numbers, strings, lists and dicts; nothing in it runs.

    The one reader of pickled files (official ``.pth`` weights, training
    checkpoints): any failure on the file's bytes, whatever torch's unpickler
    raises for them, is one :class:`CheckpointError` line, ``PATH: not a WHAT
    (reason)``; a file that would need Python objects (a pickle payload) is
    refused with the object's name only.
    """
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
        lines = [ln.strip() for ln in text.splitlines() if ln.strip() and "weights_only" not in ln]
        if isinstance(exc, EOFError):
            reason = "the file ends early"
        elif isinstance(exc, (RuntimeError, pickle.UnpicklingError, OSError)) and lines:  # torch's own words
            reason = lines[0].split(". ")[0].rstrip(".")[:120]
        else:  # KeyError: 101 and the like say nothing to a user
            reason = "not the bytes torch.save writes"
        raise CheckpointError(f"{path}: not a {what} ({reason})") from None


def read_state_dict(path: str) -> dict[str, Tensor]:
    """A ``.pth`` state dict, read with :func:`load_plain` (``torch.load(weights_only=True)``: nothing in it runs).

    A DataParallel save's ``module.`` prefix is removed.  Anything that is not
    a mapping of names to tensors is a :class:`CheckpointError` naming the file.
    """
    if not os.path.isfile(path):
        raise MissingCheckpointError(f"{path}: no such checkpoint file")
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


def _count_blocks(state: dict[str, Tensor], prefix: str, default: int) -> int:
    """How many residual blocks the file has: the distinct indices present (a stray large index is then an
    unexpected tensor, not a model of that many blocks)."""
    found = {m.group(1) for k in state if (m := re.match(rf"{re.escape(prefix)}\.(\d+)\.", k))}
    return len(found) if found else default


def _check_stored(state: dict[str, Tensor], source: str) -> None:
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


def _listing(names: list[str], what: str) -> str:
    shown = ", ".join(repr(n) for n in names[:3]) + (", ..." if len(names) > 3 else "")
    return f"{len(names)} {what} ({shown})"


_TMNET_PREFIXES = ("pcd_align.TMB_", "layersAtB", "layersCtB", "layersFusion.")


def from_official_state_dict(state: dict[str, Tensor], source: str = "state dict") -> MEGAN:
    """The model of an official state dict: Zooming Slow-Mo (``conv_first``, ``pcd_align``, ``ConvBLSTM``, ...)
    or TMNet (the same plus ``pcd_align.TMB_*`` and ``layers*``).

    nf, the deformable groups and the residual block counts are read from
    the tensors.  A dict that does not match gets one :class:`CheckpointError`
    naming the missing and unexpected tensors and the shape mismatches (the
    first few of each, with the official names).
    """
    _check_stored(state, source)
    check_memory(sum(v.numel() for v in state.values()), 0, source)
    # TMNet when it has at least half of TMNet's own tensors (a stray one is an unexpected tensor of the other)
    own_tmnet = len(official_names(0, 0, tmnet=True)) - len(official_names(0, 0))
    tmnet = 2 * sum(k.startswith(_TMNET_PREFIXES) for k in state) >= own_tmnet
    preset, network = (MEGANConfig.tmnet, "TMNet") if tmnet else (MEGANConfig.zooming_slowmo, "Zooming Slow-Mo")
    first = state.get("conv_first.weight")
    nf = int(first.shape[0]) if first is not None and first.dim() == 4 else 64
    offsets = state.get("pcd_align.L3_dcnpack_1.conv_offset_mask.weight")
    groups = int(offsets.shape[0]) // 27 if offsets is not None and offsets.shape[0] % 27 == 0 else 8
    front, back = _count_blocks(state, "feature_extraction", 5), _count_blocks(state, "recon_trunk", 40)
    try:
        config = preset(nf=nf, deformable_groups=max(groups, 1), front_blocks=front, back_blocks=back)
    except ConfigError as exc:  # e.g. nf not divisible by the deformable groups
        raise CheckpointError(f"{source}: a {network} file of nf = {nf} and {groups} deformable groups, which this "
                              f"package cannot build ({str(exc).removeprefix('MEGAN: ')}); the released networks "
                              "have nf = 64 and 8 groups") from None
    try:
        with torch.device("meta"):
            model = MEGAN(config)
    except (RuntimeError, OverflowError, MemoryError):  # a nonsensical width: compare with the released network
        config, nf = preset(), 64
        with torch.device("meta"):
            model = MEGAN(config)
    names = official_names(front, back, tmnet)
    own = model.state_dict()
    missing = [k for k in names if k not in state]
    unexpected = [k for k in state if k not in names]
    shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(own[names[k]].shape)}" for k in names
              if k in state and tuple(state[k].shape) != tuple(own[names[k]].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(_listing(missing, "missing"))
        if unexpected:
            parts.append(_listing(unexpected, "unexpected"))
        if shapes:
            parts.append(f"{len(shapes)} of another shape ({'; '.join(shapes[:3])}{'; ...' if len(shapes) > 3 else ''})")
        if nf != 64:  # the official code keeps upconv2, HRconv and conv_last 64 wide whatever nf is; ours does not
            raise CheckpointError(f"{source}: an official {network} file of nf = {nf} (conv_first.weight); only "
                                  f"nf = 64 official files, the released networks, are supported (tensors "
                                  f"{', '.join(parts)})")
        raise CheckpointError(f"{source}: not the {network} network: tensors {', '.join(parts)}")
    check_weights(state, source)
    model = MEGAN(config)
    model.load_state_dict({names[k]: v for k, v in state.items()})
    return model


def _looks_official(state: dict[str, Tensor]) -> bool:
    return any(k.startswith(("ConvBLSTM.", "pcd_align.", "recon_trunk.", "feature_extraction.", *_TMNET_PREFIXES))
               for k in state)


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
        if not _looks_official(state) and any(k.startswith(("features.", "convlstm.", "reconstruction.")) for k in state):
            raise CheckpointError(f"{path}: a state dict of this package's own names without its {CONFIG_NAME}; "
                                  "save models with MEGAN.save_pretrained (a folder) to load them here")
        model = from_official_state_dict(state, source=path).to(map_location)
    return model.eval()
