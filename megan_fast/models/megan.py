"""MEGAN: Memory Enhanced Graph Attention Network for space-time video super-resolution."""

from __future__ import annotations

import dataclasses
import json
import numbers
import os
import re
import struct
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megan_fast.models.baseline import bicubic_blend
from megan_fast.models.blocks import (
    PCDAlign,
    DeformableConvLSTM,
    FeaturePyramid,
    NeighbourComparison,
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
    time_modulation: bool = False
    neighbour_comparison: bool = False
    reconstruction_skip: bool = False

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

    @classmethod
    def tmnet(cls, **overrides: Any) -> "MEGANConfig":
        """TMNet (Xu et al., CVPR 2021): Zooming Slow-Mo with temporal modulation, as a config of this family.

        Zooming Slow-Mo plus three switches: ``time_modulation`` (a temporal
        modulation block at each level of both directions of the frame
        interpolation's PCD alignment: in-between frames at any time in
        (0, 1), ``MEGAN.forward(x, times=...)``), ``neighbour_comparison``
        (each frame feature aligned with its neighbours and fused before the
        ConvLSTM) and ``reconstruction_skip`` (the pre-ConvLSTM features
        added back before the upsampling): 12,263,523 parameters, the
        official checkpoints' (docs/DESIGN.md section 3).
        """
        return cls(**{**PRESETS["tmnet"], **overrides})

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

    @property
    def family_name(self) -> str:
        """The published network this config builds: "TMNet", "Zooming Slow-Mo" or "MEGAN" (closest match)."""
        if self.time_modulation:
            return "TMNet"
        return "Zooming Slow-Mo" if not (self.lmga or self.nonlocal_blocks or self.num_pfrdb) else "MEGAN"

    @property
    def any_times(self) -> bool:
        """Whether the network makes in-between frames at any times (time modulation), not only halfway."""
        return self.time_modulation


def output_frames(n_in: int, k: int = 1) -> int:
    """Frames out for n_in frames in and k in-between frames per pair: the inputs and (n_in - 1) * k new ones."""
    return n_in + (n_in - 1) * k


# Named configs of the family: MEGAN (the defaults) and Zooming Slow-Mo.
PRESETS: dict[str, dict[str, Any]] = {
    "megan": {},
    "zooming_slowmo": {"nonlocal_blocks": False, "lmga": False, "num_pfrdb": 0, "back_blocks": 40,
                       "pad_mode": "zeros"},
}
PRESETS["tmnet"] = {**PRESETS["zooming_slowmo"], "time_modulation": True, "neighbour_comparison": True,
                    "reconstruction_skip": True}


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
    "time_modulation": check_bool, "neighbour_comparison": check_bool, "reconstruction_skip": check_bool,
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
        input frame i; frame 2i+1 lies between inputs i and i+1.  With k
        times: (b, n_in + (n_in - 1) * k, 3, 4H, 4W) in time order (input
        frame, its k in-between frames, next input frame, ...).

    The same class builds Zooming Slow-Mo, MEGAN's backbone:
    ``MEGAN(MEGANConfig.zooming_slowmo())`` (no non-local blocks, LMGA or
    progressive fusion; any number of input frames >= 2), which
    :func:`megan_fast.models.load_model` fills with the official weights; and
    TMNet, ``MEGAN(MEGANConfig.tmnet())``, Zooming Slow-Mo with temporal
    modulation: ``model(x, times=[t1, ..., tk])`` makes k in-between frames
    per pair of inputs, at those times in (0, 1).

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
        self.interpolation = PCDAlign(nf, cfg.deformable_groups, cfg.time_modulation)
        self.comparison = NeighbourComparison(nf, cfg.deformable_groups) if cfg.neighbour_comparison else None
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

    def forward(self, x: Tensor, memory_indices: list[int] | Tensor | None = None,
                times: list[float] | tuple[float, ...] | Tensor | None = None) -> Tensor:
        """x (b, n_in, 3, H, W) -> frames at 4x (see the class docstring).

        Args:
            memory_indices: LMGA's memory frames (training; see :class:`megan_fast.nn.LMGA`).
            times: the in-between frames to make per pair of inputs: increasing
                floats in (0, 1), or a (b, k) tensor of them (a row per
                sample).  Default [0.5].  Only time-modulated models
                (``MEGANConfig.tmnet()``) take other times than [0.5].
        """
        cfg = self.config
        _check_input(x, cfg, self.conv_dtype())
        b, n, _, h, w = x.shape
        k, t_values = _check_times(times, b, cfg.time_modulation, x)
        pad_h, pad_w = (-h) % 4, (-w) % 4
        frames = x.reshape(b * n, 3, h, w)
        if pad_h or pad_w:
            frames = F.pad(frames, (0, pad_w, 0, pad_h), mode="replicate" if cfg.pad_mode == "replicate" else "constant")
        hp, wp = h + pad_h, w + pad_w
        nf = cfg.nf

        l1, l2, l3 = self.features(frames)
        levels = [lvl.reshape(b, n, nf, *lvl.shape[-2:]) for lvl in (l1, l2, l3)]

        # In-between features for all neighbouring pairs (and all k times) at once: batch (b, n - 1, k).
        def pairs(lvl: Tensor, sl: slice) -> Tensor:
            part = lvl[:, sl]
            if k > 1:
                part = part.unsqueeze(2).expand(b, n - 1, k, *part.shape[2:])
            return part.reshape(b * (n - 1) * k, *lvl.shape[2:])

        first = tuple(pairs(lvl, slice(None, -1)) for lvl in levels)
        second = tuple(pairs(lvl, slice(1, None)) for lvl in levels)
        t_batch = None
        if t_values is not None:
            t_batch = t_values.reshape(b, 1, k).expand(b, n - 1, k).reshape(b * (n - 1) * k, 1, 1, 1)
        between = self.interpolation(first, second, t_batch).reshape(b, n - 1, k, nf, hp, wp)
        # Sequence F1, I1_1 .. I1_k, F2, ..., Fn.
        t = output_frames(n, k)
        seq = torch.cat((levels[0][:, :-1].unsqueeze(2), between), 2).reshape(b, t - 1, nf, hp, wp)
        seq = torch.cat((seq, levels[0][:, -1:]), 1)

        lstm_in = seq if self.comparison is None else self.comparison(seq)
        feats = self.convlstm(lstm_in)
        if self.lmga is not None:
            feats = self.lmga(feats, memory_indices)
        for block in self.pfrdbs:
            feats = block(feats)
        skip = seq.reshape(b * t, nf, hp, wp) if cfg.reconstruction_skip else None
        out = self.reconstruction(feats.reshape(b * t, nf, hp, wp), skip)
        out = out.reshape(b, t, 3, 4 * hp, 4 * wp)[..., : 4 * h, : 4 * w]
        if cfg.global_skip:
            out = out + bicubic_blend(x, t_values)
        return out

    def conv_dtype(self) -> torch.dtype:
        """The dtype of the model's weights, which an input must have (outside autocast)."""
        return self.features.conv_first.weight.dtype

    # ------------------------------------------------------------------ weights I/O

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Writes ``config.json`` and ``model.safetensors`` into ``directory`` (created if needed), each atomically."""
        from megan_fast.outputs import Kind, Output, written_by

        os.makedirs(directory, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        meta = {"format": "pt", "written_by": written_by("model")}
        for name, write in ((WEIGHTS_NAME, lambda path: _save_safetensors(state, path, meta)),
                            (CONFIG_NAME, lambda path: _write_text(path, json.dumps(
                                {**self.config_dict(), "written_by": meta["written_by"]}, indent=2)))):
            kind = Kind(name, entries=re.escape(name), by_name=True)  # a model folder's files are replaced by name
            out = Output(os.path.join(os.path.abspath(directory), name), "file", kind, True, os.path.join(directory, name))
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
        header = _header_shapes(weights_path)
        _check_fits(cfg, config_path, weights_path, len(header))
        try:
            with torch.device("meta"):  # shapes and size first: nothing is allocated
                plan = cls(cfg)
        except ConfigError as exc:
            raise CheckpointError(str(exc)) from None
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
        try:
            model.load_state_dict(state)
        except CheckpointError as exc:
            raise CheckpointError(f"{weights_path}: {exc}") from None
        return model

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """As ``nn.Module.load_state_dict``; a mismatch is one :class:`CheckpointError` line saying what differs."""
        given = {k: tuple(v.shape) for k, v in state_dict.items() if hasattr(v, "shape")}
        mismatch = describe_mismatch({k: tuple(v.shape) for k, v in self.state_dict().items()}, given, strict)
        if mismatch:
            raise CheckpointError(f"the weights do not fit this model's config: {mismatch}")
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def _check_input(x: Any, cfg: MEGANConfig, dtype: torch.dtype) -> None:
    """One ValueError naming the shape and dtype expected, for anything else than frames the model can run:
    a (b, n, 3, H, W) tensor of the weights' dtype (under autocast: float32 or the autocast dtype)."""
    n_in = "n >= 2" if cfg.any_num_frames else cfg.num_input_frames
    want = f"a (b, {n_in}, 3, H, W) {str(dtype).removeprefix('torch.')} tensor of RGB frames in [0, 1]"
    if not isinstance(x, Tensor):
        raise ValueError(f"MEGAN: input must be {want}, got a {type(x).__module__}.{type(x).__name__} "
                         "(torch.from_numpy(array).float() / 255 converts 8-bit frames)")
    frames_ok = x.dim() == 5 and (x.shape[1] >= 2 if cfg.any_num_frames else x.shape[1] == cfg.num_input_frames)
    # Under autocast the convolutions cast float32 (and the autocast dtype itself), nothing else.
    dtype_ok = x.dtype == dtype or (torch.is_autocast_enabled(x.device.type) and x.dtype in (
        torch.float32, torch.get_autocast_dtype(x.device.type)))
    if not frames_ok or x.shape[2] != 3 or not dtype_ok:
        hint = " (8-bit frames: divide by 255 as floats)" if not x.is_floating_point() else ""
        raise ValueError(f"MEGAN: input must be {want}, got shape {tuple(x.shape)} {str(x.dtype).removeprefix('torch.')}"
                         f"{hint}")


_HALFWAY_ONLY = ("MEGAN: this model makes only the frame halfway between two inputs (times=[0.5]); "
                 "a time-modulated model (MEGANConfig.tmnet(), TMNet's weights) makes frames at other times")


def _check_times(times, b: int, modulated: bool, like: Tensor) -> tuple[int, Tensor | None]:
    """(k, the times as a (b, k) tensor on like's device and dtype, or None when the model is not
    time-modulated).  The values are checked in that dtype (0.999 is 1.0 in bfloat16).  Errors name
    ``times`` and what was expected, in one line."""
    if times is None:
        times = [0.5]
    if isinstance(times, Tensor):
        if times.layout != torch.strided or times.is_meta:
            raise ValueError(f"MEGAN: times must be a dense tensor of values, got a {times.layout} tensor on "
                             f"{times.device}")
        if times.dim() != 2 or times.shape[0] != b or times.shape[1] < 1 or not times.is_floating_point():
            raise ValueError(f"MEGAN: times as a tensor must be floating point of shape (b, k) = ({b}, k >= 1), "
                             f"got {tuple(times.shape)} {times.dtype}")
        cast = times.to(device=like.device, dtype=like.dtype)
        _check_time_rows(cast.detach().tolist(), like.dtype, " along each row")
        if not modulated:
            if times.shape[1] != 1 or not bool((cast == 0.5).all()):
                raise ValueError(_HALFWAY_ONLY)
            return 1, None
        return times.shape[1], cast
    if not isinstance(times, (list, tuple)) or not times:
        shown = repr(times) if isinstance(times, (list, tuple, str, int, float)) else f"a {type(times).__name__}"
        raise ValueError(f"MEGAN: times must be a non-empty list of floats in (0, 1) or a (b, k) tensor, got "
                         f"{shown[:80]}")
    for v in times:
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0 < float(v) < 1:
            raise ValueError(f"MEGAN: times must be floats strictly between 0 and 1, got {repr(v)[:40]}")
    values = [float(v) for v in times]
    if not torch.compiler.is_compiling():  # plain Python on constants: checked once, outside any graph
        _check_time_rows([[_round_to(v, like.dtype) for v in values]], like.dtype)
    if not modulated:
        if values != [0.5]:
            raise ValueError(_HALFWAY_ONLY)
        return 1, None
    # One fill per time (no host-to-device copy: capturable in a CUDA graph), then a row per sample.
    row = torch.cat([like.new_full((1,), v) for v in values])
    return len(times), row.unsqueeze(0).expand(b, len(times))


def _round_to(v: float, dtype: torch.dtype) -> float:
    """A Python float rounded to ``dtype`` as a tensor of it would hold it (round to nearest even)."""
    if dtype == torch.float32:
        return struct.unpack("f", struct.pack("f", v))[0]
    if dtype == torch.float16:
        return struct.unpack("e", struct.pack("e", v))[0]
    if dtype == torch.bfloat16:
        bits = struct.unpack("I", struct.pack("f", v))[0]
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return struct.unpack("f", struct.pack("I", bits))[0]
    return v


def _check_time_rows(rows: list[list[float]], dtype: torch.dtype, along: str = "") -> None:
    """Times as the compute dtype holds them, a row per sample: strictly inside (0, 1), increasing."""
    where = "" if dtype == torch.float32 else f" in {str(dtype).removeprefix('torch.')}, the input's dtype"
    for row in rows:
        if not all(0 < v < 1 for v in row):  # False for NaN too
            raise ValueError(f"MEGAN: times must lie strictly between 0 and 1{where} (0 and 1 are the input frames)")
        for a, b in zip(row, row[1:]):
            if not b > a:
                raise ValueError(f"MEGAN: times must increase{along}{where} (the frames come out in time order), "
                                 f"got {a:g} then {b:g}")


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


def _check_fits(cfg: MEGANConfig, config_path: str, weights_path: str, count: int) -> None:
    """Refuses a config with more blocks than the weights file has tensors (``count``), before building even a
    meta model of it (``back_blocks: 100000000`` would otherwise take minutes and gigabytes to fail)."""
    if _min_tensors(cfg) > count:
        raise CheckpointError(f"{config_path}: the config has more blocks than {os.path.basename(weights_path)} "
                              f"has tensors ({count}); the weights do not fit this config")


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


def check_weights(state: dict, source: str) -> None:
    """Refuses weights a model cannot use: not dense floating-point tensors, or NaN/infinite in float32."""
    for k, v in state.items():
        if not isinstance(v, torch.Tensor) or v.layout != torch.strided or v.is_meta:
            raise CheckpointError(f"{source}: tensor {k!r} is not a dense tensor with values "
                                  f"({getattr(v, 'layout', type(v).__name__)}); expected plain weights")
        if v.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            what = "which is not supported" if v.is_floating_point() else "not floating point"
            raise CheckpointError(f"{source}: tensor {k!r} has dtype {str(v.dtype).removeprefix('torch.')}, {what}; "
                                  "expected float16, bfloat16, float32 or float64 weights")
    broken = [k for k, v in state.items() if not bool(torch.isfinite(v.float()).all())]
    if broken:
        raise CheckpointError(f"{source}: {len(broken)} tensor(s) hold NaN or infinite weights (e.g. {broken[0]!r}) "
                              "in float32; the model would give garbage")


def _save_safetensors(state: dict[str, Tensor], path: str, metadata: dict[str, str]) -> None:
    """safetensors' ``save_file``; a failed write (a full disk) is the OSError it is, not a SafetensorError."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(state, path, metadata)
    except SafetensorError as exc:
        code = re.search(r"os error (\d+)", str(exc))
        if code is None:
            raise
        errno_ = int(code.group(1))
        raise OSError(errno_, os.strerror(errno_), path) from None


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text + "\n")
