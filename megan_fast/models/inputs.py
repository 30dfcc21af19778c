"""What a forward of the network checks on the host before any work: the frames and the in-between times.

One-line ``ValueError``s naming the argument and what was expected; nothing
here reads a tensor on the device (docs/DESIGN.md section 3).
"""

from __future__ import annotations

import numbers
from typing import Any

import torch
from torch import Tensor

from megan_fast.models.config import MEGANConfig

__all__ = ["check_input", "check_times"]


def check_input(x: Any, cfg: MEGANConfig, dtype: torch.dtype) -> None:
    """One ValueError naming the shape and dtype expected, for anything else than frames the model can run:
    a dense (b, n, 3, H, W) tensor with H, W >= 1, of the weights' dtype (under autocast: float32 or the
    autocast dtype)."""
    n_in = "n >= 2" if cfg.any_num_frames else cfg.num_input_frames
    want = f"a (b, {n_in}, 3, H, W) {str(dtype).removeprefix('torch.')} tensor of RGB frames in [0, 1]"
    if not isinstance(x, Tensor):
        shape = f" of shape {tuple(x.shape)} {x.dtype}" if hasattr(x, "shape") and hasattr(x, "dtype") else ""
        raise ValueError(f"MEGAN: input must be {want}, got a {type(x).__module__}.{type(x).__name__}{shape} "
                         "(torch.from_numpy converts an array)")
    if x.is_nested or x.layout != torch.strided:
        raise ValueError(f"MEGAN: input must be {want}, got a {'nested' if x.is_nested else x.layout} tensor")
    frames_ok = x.dim() == 5 and (x.shape[1] >= 2 if cfg.any_num_frames else x.shape[1] == cfg.num_input_frames)
    # Under autocast the convolutions cast float32 (and the autocast dtype itself), nothing else.
    dtype_ok = x.dtype == dtype or (torch.is_autocast_enabled(x.device.type) and x.dtype in (
        torch.float32, torch.get_autocast_dtype(x.device.type)))
    if not frames_ok or x.shape[2] != 3 or not dtype_ok or x.shape[3] < 1 or x.shape[4] < 1:
        hint = " (8-bit frames: divide by 255 as floats)" if x.dtype == torch.uint8 else ""
        raise ValueError(f"MEGAN: input must be {want}, got shape {tuple(x.shape)} {str(x.dtype).removeprefix('torch.')}"
                         f"{hint}")


_HALFWAY_ONLY = ("MEGAN: this model makes only the frame halfway between two inputs (times=[0.5]); "
                 "a time-modulated model (MEGANConfig.tmnet(), TMNet's weights) makes frames at other times")


def check_times(times, b: int, modulated: bool, like: Tensor) -> tuple[int, Tensor | None]:
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
        if not (torch.compiler.is_compiling() or torch.compiler.is_exporting()):  # values: on the host only
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
    if not torch.compiler.is_compiling():  # constants, checked once on the host, outside any graph
        _check_time_rows([torch.tensor(values, dtype=like.dtype).tolist()], like.dtype)  # as the dtype holds them
    if not modulated:
        if values != [0.5]:
            raise ValueError(_HALFWAY_ONLY)
        return 1, None
    # One fill per time (no host-to-device copy: capturable in a CUDA graph), then a row per sample.
    row = torch.cat([like.new_full((1,), v) for v in values])
    return len(times), row.unsqueeze(0).expand(b, len(times))


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
