"""The network family's hyper-parameters: :class:`MEGANConfig`, its checks and the named presets."""

from __future__ import annotations

import dataclasses
from typing import Any

from megan_fast._checks import check_bool, check_float, check_int
from megan_fast.errors import ConfigError

__all__ = ["MEGANConfig", "PRESETS", "output_frames"]


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
    "memory_seed": lambda w, v: None if v is None else check_int(w, v, 0, 2**63 - 1), "global_skip": check_bool,
    "nonlocal_blocks": check_bool, "lmga": check_bool, "pad_mode": _pad_mode,
    "time_modulation": check_bool, "neighbour_comparison": check_bool, "reconstruction_skip": check_bool,
}
