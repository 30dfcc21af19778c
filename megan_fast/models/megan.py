"""MEGAN: Memory Enhanced Graph Attention Network for space-time video super-resolution."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megan_fast.models.baseline import bicubic_blend
from megan_fast.models.blocks import (
    PCDAlign,
    DeformableConvLSTM,
    FeaturePyramid,
    PFRDB,
    Reconstruction,
    lrelu,
    make_residual_trunk,
)
from megan_fast._checks import check_bool, check_float, check_int
from megan_fast.errors import CheckpointError, ConfigError, MissingCheckpointError
from megan_fast.nn import LMGA, NonLocalBlock

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclasses.dataclass
class MEGANConfig:
    """Hyper-parameters of :class:`MEGAN` (defaults: the paper's 10.66 M-parameter model)."""

    num_input_frames: int = 4
    nf: int = 64
    front_blocks: int = 5
    back_blocks: int = 20
    num_pfrdb: int = 5
    deformable_groups: int = 8
    nonlocal_inner: int = 32
    nonlocal_scale: float = 1.0
    tau: int = 4
    graph_layers: int = 2
    graph_hidden: int = 16
    graph_slope: float = 0.2
    memory_seed: int | None = None
    global_skip: bool = False
    nonlocal_blocks: bool = True
    lmga: bool = True
    pad_mode: str = "replicate"

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _FIELD_CHECKS[f.name](f"MEGAN: {f.name}", getattr(self, f.name))
        if self.nf % self.deformable_groups != 0:
            raise ConfigError(f"MEGAN: nf ({self.nf}) must be divisible by deformable_groups ({self.deformable_groups})")

    @classmethod
    def zooming_slowmo(cls, **overrides: Any) -> "MEGANConfig":
        """Zooming Slow-Mo (Xiang et al., CVPR 2020), MEGAN's backbone, as a config of this family.

        No non-local blocks, no LMGA, no progressive fusion, 40 reconstruction
        blocks, zero padding to a multiple of 4 (the official test script's):
        11,102,771 parameters, the official checkpoint's (docs/DESIGN.md
        section 3).  Without progressive fusion the model takes any number of
        input frames >= 2; ``num_input_frames`` is the window the inference
        and evaluation tools use.
        """
        return cls(**{**PRESETS["zooming_slowmo"], **overrides})

    @property
    def any_num_frames(self) -> bool:
        """Whether the network takes any number of input frames >= 2 (no progressive fusion, whose 1x1 conv is
        sized for 2 * num_input_frames - 1 frames)."""
        return self.num_pfrdb == 0

    @classmethod
    def from_dict(cls, values: dict, source: str = "MEGAN config") -> "MEGANConfig":
        """A config from a plain dict (config.json, a YAML ``model:`` entry); unknown keys are an error."""
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: expected a mapping of config fields, got {type(values).__name__}")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(f"{source}: unknown field {unknown[0]!r}; known fields: {', '.join(known)}")
        try:
            return cls(**values)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {str(exc).removeprefix('MEGAN: ')}") from None

    @property
    def num_output_frames(self) -> int:
        return 2 * self.num_input_frames - 1


# Named configs of the family: MEGAN (the defaults) and Zooming Slow-Mo.
PRESETS: dict[str, dict[str, Any]] = {
    "megan": {},
    "zooming_slowmo": {"nonlocal_blocks": False, "lmga": False, "num_pfrdb": 0, "back_blocks": 40,
                       "pad_mode": "zeros"},
}


def _pad_mode(where: str, value: Any) -> None:
    if value not in ("replicate", "zeros"):
        raise ConfigError(f"{where} must be 'replicate' or 'zeros', got {value!r}")


# Every field's check (MEGANConfig.__post_init__); messages start with "MEGAN: ", which from_dict replaces.
_FIELD_CHECKS: dict[str, Any] = {
    "num_input_frames": lambda w, v: check_int(w, v, 2), "nf": lambda w, v: check_int(w, v, 1),
    "front_blocks": lambda w, v: check_int(w, v, 0), "back_blocks": lambda w, v: check_int(w, v, 0),
    "num_pfrdb": lambda w, v: check_int(w, v, 0), "deformable_groups": lambda w, v: check_int(w, v, 1),
    "nonlocal_inner": lambda w, v: check_int(w, v, 1), "nonlocal_scale": lambda w, v: check_float(w, v, 0, lo_open=True),
    "tau": lambda w, v: check_int(w, v, 1), "graph_layers": lambda w, v: check_int(w, v, 0),
    "graph_hidden": lambda w, v: check_int(w, v, 1), "graph_slope": check_float,
    "memory_seed": lambda w, v: None if v is None else check_int(w, v, 0), "global_skip": check_bool,
    "nonlocal_blocks": check_bool, "lmga": check_bool, "pad_mode": _pad_mode,
}


class FeatureExtractor(nn.Module):
    """conv_first + lrelu, non-local block, residual blocks, non-local block, 3-level pyramid.

    ``nonlocal_blocks=False`` (Zooming Slow-Mo): no non-local blocks.
    """

    def __init__(self, cfg: MEGANConfig) -> None:
        super().__init__()
        nf = cfg.nf
        self.conv_first = nn.Conv2d(3, nf, 3, 1, 1)
        self.nonlocal_in = NonLocalBlock(nf, cfg.nonlocal_inner, cfg.nonlocal_scale) if cfg.nonlocal_blocks else None
        self.trunk = make_residual_trunk(nf, cfg.front_blocks)
        self.nonlocal_out = NonLocalBlock(nf, cfg.nonlocal_inner, cfg.nonlocal_scale) if cfg.nonlocal_blocks else None
        self.pyramid = FeaturePyramid(nf)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x = lrelu(self.conv_first(x))
        if self.nonlocal_in is not None:
            x = self.nonlocal_in(x)
        x = self.trunk(x)
        if self.nonlocal_out is not None:
            x = self.nonlocal_out(x)
        return self.pyramid(x)


class MEGAN(nn.Module):
    """Space-time video super-resolution: n_in frames -> 2*n_in - 1 frames at 4x resolution.

    Sub-modules, in order: ``features`` (shared per-frame feature extraction
    with non-local blocks and a 3-level pyramid), ``interpolation`` (PCD
    alignment synthesising the feature of each in-between frame),
    ``convlstm`` (bidirectional deformable ConvLSTM), ``lmga`` (long-range
    memory graph aggregation), ``pfrdbs`` (progressive fusion) and
    ``reconstruction`` (residual trunk + PixelShuffle x4), docs/DESIGN.md section 3.

    Args:
        config: a :class:`MEGANConfig`, or None; keyword arguments override its fields.

    Shape:
        (b, n_in, 3, H, W) -> (b, 2*n_in - 1, 3, 4H, 4W) for any H, W (padded
        to a multiple of 4 inside, cropped back).  Output frame 2i re-makes
        input frame i; frame 2i+1 lies between inputs i and i+1.

    The same class builds Zooming Slow-Mo, MEGAN's backbone:
    ``MEGAN(MEGANConfig.zooming_slowmo())`` (no non-local blocks, LMGA or
    progressive fusion; any number of input frames >= 2), which
    :func:`megan_fast.models.load_model` fills with the official weights.

    ``MEGANConfig(global_skip=True)`` (not in the paper; off by default) adds
    the evaluation baseline (:func:`megan_fast.models.baseline.bicubic_blend`:
    bicubic x4, in-between frames blended) to the output and zero-initialises
    the last convolution, so the network learns a residual over it: useful for
    short training runs such as the demo checkpoint's.
    """

    def __init__(self, config: MEGANConfig | dict | None = None, **overrides: Any) -> None:
        super().__init__()
        if isinstance(config, dict):
            config = MEGANConfig.from_dict(config)
        if overrides:
            config = MEGANConfig.from_dict({**dataclasses.asdict(config or MEGANConfig()), **overrides})
        cfg = config or MEGANConfig()
        self.config = cfg
        nf, t_out = cfg.nf, cfg.num_output_frames
        self.features = FeatureExtractor(cfg)
        self.interpolation = PCDAlign(nf, cfg.deformable_groups)
        self.convlstm = DeformableConvLSTM(nf, cfg.deformable_groups)
        self.lmga = (LMGA(nf, cfg.tau, cfg.graph_layers, cfg.graph_hidden, cfg.graph_slope, seed=cfg.memory_seed)
                     if cfg.lmga else None)
        self.pfrdbs = nn.ModuleList(PFRDB(nf, t_out) for _ in range(cfg.num_pfrdb))
        self.reconstruction = Reconstruction(nf, cfg.back_blocks)
        if cfg.global_skip:
            # The network then learns a residual over the baseline: starting from zero
            # output makes the untrained model exactly "bicubic x4 + frame blending".
            nn.init.zeros_(self.reconstruction.conv_last.weight)
            nn.init.zeros_(self.reconstruction.conv_last.bias)

    # ------------------------------------------------------------------ config

    def config_dict(self) -> dict:
        """The config as a plain dict: ``MEGAN(model.config_dict())`` builds the same architecture."""
        return dataclasses.asdict(self.config)

    # ------------------------------------------------------------------ forward

    def forward(self, x: Tensor, memory_indices: list[int] | Tensor | None = None) -> Tensor:
        cfg = self.config
        frames_ok = x.dim() == 5 and (x.shape[1] >= 2 if cfg.any_num_frames else x.shape[1] == cfg.num_input_frames)
        if not frames_ok or x.shape[2] != 3:
            n_in = "n >= 2" if cfg.any_num_frames else cfg.num_input_frames
            raise ValueError(f"MEGAN: input must have shape (b, {n_in}, 3, H, W), got {tuple(x.shape)}")
        b, n, _, h, w = x.shape
        pad_h, pad_w = (-h) % 4, (-w) % 4
        frames = x.reshape(b * n, 3, h, w)
        if pad_h or pad_w:
            frames = F.pad(frames, (0, pad_w, 0, pad_h), mode="replicate" if cfg.pad_mode == "replicate" else "constant")
        hp, wp = h + pad_h, w + pad_w
        nf = cfg.nf

        l1, l2, l3 = self.features(frames)
        levels = [lvl.reshape(b, n, nf, *lvl.shape[-2:]) for lvl in (l1, l2, l3)]

        # In-between features for all neighbouring pairs at once.
        first = tuple(lvl[:, :-1].reshape(b * (n - 1), nf, *lvl.shape[-2:]) for lvl in levels)
        second = tuple(lvl[:, 1:].reshape(b * (n - 1), nf, *lvl.shape[-2:]) for lvl in levels)
        between = self.interpolation(first, second).reshape(b, n - 1, nf, hp, wp)
        # Sequence F1, I12, F2, I23, ..., Fn.
        t = 2 * n - 1
        pairs = torch.stack((levels[0][:, :-1], between), 2).reshape(b, t - 1, nf, hp, wp)  # F1, I12, ..., I(n-1)n
        seq = torch.cat((pairs, levels[0][:, -1:]), 1)

        feats = self.convlstm(seq)
        if self.lmga is not None:
            feats = self.lmga(feats, memory_indices)
        for block in self.pfrdbs:
            feats = block(feats)
        out = self.reconstruction(feats.reshape(b * t, nf, hp, wp))
        out = out.reshape(b, t, 3, 4 * hp, 4 * wp)[..., : 4 * h, : 4 * w]
        if cfg.global_skip:
            out = out + bicubic_blend(x)
        return out

    # ------------------------------------------------------------------ weights I/O

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Writes ``config.json`` and ``model.safetensors`` into ``directory`` (created if needed), each atomically."""
        from safetensors.torch import save_file

        from megan_fast.outputs import Kind, Output, written_by

        os.makedirs(directory, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        meta = {"format": "pt", "written_by": written_by("model")}
        for name, write in ((WEIGHTS_NAME, lambda path: save_file(state, path, meta)),
                            (CONFIG_NAME, lambda path: _write_text(path, json.dumps(
                                {**self.config_dict(), "written_by": meta["written_by"]}, indent=2)))):
            kind = Kind(name, entries=re.escape(name), by_name=True)  # a model folder's files are replaced by name
            out = Output(os.path.join(os.path.abspath(directory), name), "file", kind, True, name)
            with out.atomic_file() as tmp:
                write(tmp)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> "MEGAN":
        """Builds the model from ``config.json`` and loads ``model.safetensors`` from ``directory``.

        Raises:
            MissingCheckpointError: no such folder or file (also a FileNotFoundError).
            CheckpointError: an unreadable, corrupt or mistyped file, or weights
                that do not fit the config (one line, naming the file).
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
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{config_path}: not a readable JSON file ({exc})") from None
        if isinstance(config, dict):
            config.pop("written_by", None)  # save_pretrained's mark (megan_fast.outputs), not a config field
        try:
            cfg = MEGANConfig.from_dict(config, source=config_path)
        except ConfigError as exc:
            raise CheckpointError(str(exc)) from None
        _check_fits(cfg, config_path, weights_path)
        try:
            model = cls(cfg)
        except ConfigError as exc:
            raise CheckpointError(str(exc)) from None
        except (RuntimeError, MemoryError) as exc:  # a config too large for this machine's memory
            raise CheckpointError(f"{config_path}: cannot build this model here ({str(exc).splitlines()[0]})") from None
        try:
            state = load_file(weights_path, device=str(map_location))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{weights_path}: not a readable safetensors file ({exc})") from None
        check_weights(state, weights_path)
        try:
            model.load_state_dict(state)
        except CheckpointError as exc:
            raise CheckpointError(f"{weights_path}: {exc}") from None
        return model

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """As ``nn.Module.load_state_dict``; a mismatch is one :class:`CheckpointError` line saying what differs."""
        own = self.state_dict()
        bad = [
            f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
            for k, v in state_dict.items()
            if k in own and hasattr(v, "shape") and tuple(v.shape) != tuple(own[k].shape)
        ]
        if bad:
            raise CheckpointError(
                f"the weights do not fit this model's config: {len(bad)} tensor(s) of another shape ("
                + "; ".join(bad[:3]) + ("; ..." if len(bad) > 3 else "") + ")"
            )
        if strict:
            missing = [k for k in own if k not in state_dict]
            unexpected = [k for k in state_dict if k not in own]
            if missing or unexpected:
                parts = []
                if missing:
                    parts.append(f"{len(missing)} missing (e.g. {missing[0]!r})")
                if unexpected:
                    parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]!r})")
                raise CheckpointError(f"the weights do not fit this model's config: tensors {' and '.join(parts)}")
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def _min_tensors(cfg: MEGANConfig) -> int:
    """A lower bound of the tensors a config's model has (4 per residual block, 6 per PFRDB)."""
    return 4 * (cfg.front_blocks + cfg.back_blocks) + 6 * cfg.num_pfrdb + (5 * cfg.graph_layers if cfg.lmga else 0)


def _check_fits(cfg: MEGANConfig, config_path: str, weights_path: str) -> None:
    """Refuses a config with more blocks than the weights file has tensors, before building it (a config with
    ``back_blocks: 100000000`` would otherwise take minutes and gigabytes to fail)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(weights_path, "pt") as f:  # the header only
            count = len(list(f.keys()))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{weights_path}: not a readable safetensors file ({exc})") from None
    if _min_tensors(cfg) > count:
        raise CheckpointError(f"{config_path}: the config has more blocks than {os.path.basename(weights_path)} "
                              f"has tensors ({count}); the weights do not fit this config")


def check_weights(state: dict, source: str) -> None:
    """Refuses weights a model cannot use: not dense floating-point tensors, or NaN/infinite in float32."""
    for k, v in state.items():
        if not isinstance(v, torch.Tensor) or v.layout != torch.strided or v.is_meta:
            raise CheckpointError(f"{source}: tensor {k!r} is not a dense tensor with values "
                                  f"({getattr(v, 'layout', type(v).__name__)}); expected plain weights")
        if v.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise CheckpointError(f"{source}: tensor {k!r} has dtype {v.dtype}; expected floating-point weights")
    broken = [k for k, v in state.items() if not bool(torch.isfinite(v.float()).all())]
    if broken:
        raise CheckpointError(f"{source}: {len(broken)} tensor(s) hold NaN or infinite weights (e.g. {broken[0]!r}) "
                              "in float32; the model would give garbage")


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text + "\n")
