"""The official Zooming Slow-Mo and TMNet files: their tensor names, how a file is recognised, and its model.

The official Zooming Slow-Mo network (Xiang et al., CVPR 2020, ``LunaTokis``
in the authors' code) is ``MEGANConfig.zooming_slowmo()`` of this family, and
TMNet (Xu et al., CVPR 2021, ``TMNet``), which builds on it, is
``MEGANConfig.tmnet()``; their released files are plain state dicts whose
key names are the authors' module names.  This module knows those names
(facts about the released files, docs/DESIGN.md section 3) and renames them
to ours; the arithmetic is the same layer for layer (their ``DCN_sep``
offsets are the first two thirds of ``conv_offset_mask``, in torchvision's
layout, as ours are).  A file is recognised by its tensor names and shapes:
it is the network from which it differs in the fewest tensors.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

from megan_fast.errors import CheckpointError, ConfigError
from megan_fast.models.config import MEGANConfig
from megan_fast.models.megan import MEGAN

__all__ = ["OFFICIAL_NETWORKS", "from_official_state_dict", "looks_official", "official_names"]

# (name in messages, preset, TMNet's added tensors) of every official network this package reads.
OFFICIAL_NETWORKS = (("Zooming Slow-Mo", MEGANConfig.zooming_slowmo, False), ("TMNet", MEGANConfig.tmnet, True))

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


def _count_blocks(state: dict[str, Tensor], prefix: str, default: int, nf: int) -> int:
    """How many residual blocks the file has: the distinct indices whose first conv is a block's (nf, nf, 3, 3)
    weight (a stray large index, or thousands of empty tensors under block names, are unexpected tensors, not
    a model of that many blocks)."""
    found = {m.group(1) for k, v in state.items()
             if (m := re.fullmatch(rf"{re.escape(prefix)}\.(\d+)\.conv1\.weight", k)) and tuple(v.shape) == (nf, nf, 3, 3)}
    return len(found) if found else default


def _listing(names: list[str], what: str) -> str:
    shown = ", ".join(repr(n) for n in names[:3]) + (", ..." if len(names) > 3 else "")
    return f"{len(names)} {what} ({shown})"


class _Candidate:
    """One official network at the sizes a file implies: its names, shapes, and how the file differs from it."""

    def __init__(self, network: str, preset, tmnet: bool, state: dict[str, Tensor], nf: int, groups: int,
                 front: int, back: int, source: str) -> None:
        self.network, self.tmnet, self.nf = network, tmnet, nf
        try:
            self.config = preset(nf=nf, deformable_groups=max(groups, 1), front_blocks=front, back_blocks=back)
        except ConfigError as exc:  # e.g. nf not divisible by the deformable groups
            raise CheckpointError(f"{source}: a {network} file of nf = {nf} and {groups} deformable groups, which "
                                  f"this package cannot build ({str(exc).removeprefix('MEGAN: ')}); the released "
                                  "networks have nf = 64 and 8 groups") from None
        try:
            with torch.device("meta"):  # names and shapes only: nothing is allocated
                own = MEGAN(self.config).state_dict()
        except (RuntimeError, OverflowError, MemoryError):  # a nonsensical width: compare with the released one
            self.config, self.nf = preset(), 64
            with torch.device("meta"):
                own = MEGAN(self.config).state_dict()
        self.names = official_names(front, back, tmnet)
        self.missing = [k for k in self.names if k not in state]
        self.unexpected = [k for k in state if k not in self.names]
        self.shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(own[self.names[k]].shape)}" for k in self.names
                       if k in state and tuple(state[k].shape) != tuple(own[self.names[k]].shape)]

    @property
    def differences(self) -> int:
        return len(self.missing) + len(self.unexpected) + len(self.shapes)

    def mismatch(self) -> str:
        parts = []
        if self.missing:
            parts.append(_listing(self.missing, "missing"))
        if self.unexpected:
            parts.append(_listing(self.unexpected, "unexpected"))
        if self.shapes:
            parts.append(f"{len(self.shapes)} of another shape ({'; '.join(self.shapes[:3])}"
                         f"{'; ...' if len(self.shapes) > 3 else ''})")
        return ", ".join(parts)


def recognise(state: dict[str, Tensor], source: str = "state dict") -> _Candidate:
    """The official network a state dict is: the one from which it differs in the fewest tensors (by name and
    shape), at the nf, deformable groups and block counts the file's tensors give.

    Raises:
        CheckpointError: it differs from every official network in more than half of that network's tensors.
    """
    first = state.get("conv_first.weight")
    nf = int(first.shape[0]) if first is not None and first.dim() == 4 else 64
    offsets = state.get("pcd_align.L3_dcnpack_1.conv_offset_mask.weight")
    groups = int(offsets.shape[0]) // 27 if offsets is not None and offsets.shape[0] % 27 == 0 else 8
    front, back = _count_blocks(state, "feature_extraction", 5, nf), _count_blocks(state, "recon_trunk", 40, nf)
    candidates = [_Candidate(network, preset, tmnet, state, nf, groups, front, back, source)
                  for network, preset, tmnet in OFFICIAL_NETWORKS]
    best = min(candidates, key=lambda c: c.differences)
    if 2 * best.differences > len(best.names):
        scores = ", ".join(f"{c.network} in {c.differences} of its {len(c.names)}" for c in candidates)
        raise CheckpointError(f"{source}: not an official Zooming Slow-Mo or TMNet file: its tensors differ, by "
                              f"name or shape, from {scores}")
    return best


def from_official_state_dict(state: dict[str, Tensor], source: str = "state dict") -> MEGAN:
    """The model of an official state dict: Zooming Slow-Mo (``conv_first``, ``pcd_align``, ``ConvBLSTM``, ...)
    or TMNet (the same plus ``pcd_align.TMB_*`` and ``layers*``).

    nf, the deformable groups and the residual block counts are read from
    the tensors, the network is recognised by the tensors' names and shapes
    (:func:`recognise`).  A dict that does not match it exactly gets one
    :class:`CheckpointError` naming the missing and unexpected tensors and
    the shape mismatches (the first few of each, with the official names).
    The size the file implies is checked first, before even a meta model is
    built (:func:`megan_fast.models.loading.check_state_size`).
    """
    from megan_fast.models.loading import check_state_size, check_weights

    check_state_size(state, source)
    found = recognise(state, source)
    if found.differences:
        if found.nf != 64:  # the official code keeps upconv2, HRconv and conv_last 64 wide whatever nf is; ours not
            raise CheckpointError(f"{source}: an official {found.network} file of nf = {found.nf} (conv_first.weight); "
                                  f"only nf = 64 official files, the released networks, are supported (tensors "
                                  f"{found.mismatch()})")
        raise CheckpointError(f"{source}: not the {found.network} network: tensors {found.mismatch()}")
    check_weights(state, source)
    model = MEGAN(found.config)
    model.load_state_dict({found.names[k]: v for k, v in state.items()})
    return model


_OFFICIAL_PREFIXES = ("ConvBLSTM.", "pcd_align.", "recon_trunk.", "feature_extraction.", "conv_first.", "layersAtB",
                      "layersCtB", "layersFusion.")


def looks_official(state: dict[str, Tensor]) -> bool:
    """Whether a state dict uses the official networks' module names at all (a first sorting of files whose
    networks :func:`recognise` then tells apart)."""
    return any(k.startswith(_OFFICIAL_PREFIXES) for k in state)
