"""Whole-clip inference: temporal windows, optional spatial tiles, every output frame once.

A clip of t low-resolution frames at a low frame rate becomes 2t - 1 frames at
4x the resolution.  The model sees n_in frames at a time (4 for MEGAN): windows
of n_in input frames (2*n_in - 1 = 7 output frames) advance by n_in - 1 input
frames (6 output frames), and the last window is aligned to the end of the
clip, as in the evaluation protocol of docs/DESIGN.md section 4.  Output frame 2i
re-makes input frame i.  Where windows overlap, a frame is taken from the
earliest window that makes it.

At a frame rate K times the input's (``rate=K``, time-modulated models only:
TMNet), every pair of inputs gets K - 1 in-between frames at times i/K: t
inputs become K(t - 1) + 1 frames, output frame K*i re-makes input i, and a
window of n_in inputs makes K(n_in - 1) + 1 frames.

Memory is bounded by one window (and one tile), not by the clip: the
streaming form :func:`iter_upscale` holds at most n_in input frames.
"""

from __future__ import annotations

import collections
from typing import Callable, Iterable, Iterator

import torch
from torch import Tensor

from megan_fast.errors import InputError
from megan_fast.models import MEGAN
from megan_fast.models.config import output_frames


class TooShortError(InputError):
    """A clip with fewer frames than the model's window (also a ValueError)."""


def window_starts(num_frames: int, n_in: int) -> list[int]:
    """Input index of the first frame of each window (last window aligned to the end)."""
    if num_frames < n_in:
        raise TooShortError(f"the clip has {num_frames} frames but the model needs at least {n_in}")
    stride = n_in - 1
    starts = list(range(0, num_frames - n_in + 1, stride))
    if starts[-1] != num_frames - n_in:
        starts.append(num_frames - n_in)
    return starts


def clip_window(model: MEGAN, num_frames: int) -> int:
    """Input frames per window for a clip of ``num_frames``: the model's window, or the whole clip when it is
    shorter and the architecture takes any number of frames >= 2 (Zooming Slow-Mo, TMNet: slow motion between
    two frames).

    Raises:
        TooShortError: fewer than 2 frames, or fewer than MEGAN's fixed window.
    """
    cfg = model.config
    n_in = cfg.num_input_frames
    if num_frames >= n_in:
        return n_in
    if num_frames < 2:
        raise TooShortError(f"the clip has {num_frames} frame{'s' if num_frames != 1 else ''}; at least 2 are needed "
                            "(new frames are made between two inputs)")
    if cfg.any_num_frames and not hasattr(model, "frames_in"):  # an exported file fixes its window
        return num_frames
    raise TooShortError(f"the clip has {num_frames} frames; {cfg.family_name} takes windows of exactly {n_in} input "
                        "frames (its progressive fusion is sized for them), so it needs at least "
                        f"{n_in}; Zooming Slow-Mo and TMNet take clips of 2 frames or more")


def _tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    if tile >= size:
        return [0]
    step = tile - overlap
    starts = list(range(0, size - tile + 1, step))
    if starts[-1] != size - tile:
        starts.append(size - tile)
    return starts


def _ramp(length: int, ramp: int, left: bool, right: bool, like: Tensor) -> Tensor:
    """1-D blending weights: linear ramps of ``ramp`` samples on the sides shared with a neighbour."""
    w = torch.ones(length, dtype=torch.float32, device=like.device)
    if ramp > 0:
        r = (torch.arange(ramp, dtype=torch.float32, device=like.device) + 0.5) / ramp
        if left:
            w[:ramp] = torch.minimum(w[:ramp], r)
        if right:
            w[-ramp:] = torch.minimum(w[-ramp:], r.flip(0))
    return w


DEFAULT_TILE_OVERLAP = 16  # input pixels; tiles under 4 x this overlap by a quarter of their size


def tile_overlap_for(tile: int, overlap: int | None = None) -> int:
    """The overlap of ``tile``-pixel tiles: ``overlap`` if given, else 16, or ``tile // 4`` for tiles under 64."""
    return min(DEFAULT_TILE_OVERLAP, tile // 4) if overlap is None else overlap


def _tiled(tile: int | None, h: int, w: int) -> bool:
    return tile is not None and (tile < h or tile < w)


MAX_RATE = 64  # frames per input frame: a whole window's in-between frames go through the model at once


def rate_times(rate: int) -> list[float] | None:
    """The in-between times of a frame rate ``rate`` x the input's: [1/rate, ..., (rate-1)/rate]; None for 2
    (the model's default, the halfway frame).  ``rate``: an integer in [2, MAX_RATE]."""
    check_rate_value(rate)
    return None if rate == 2 else [i / rate for i in range(1, rate)]


def check_rate_value(rate, what: str = "rate") -> None:
    """Refuses (ValueError naming ``what``) a rate that is not an integer in [2, MAX_RATE]."""
    if not isinstance(rate, int) or isinstance(rate, bool) or not 2 <= rate <= MAX_RATE:
        raise ValueError(f"{what} must be an integer from 2 to {MAX_RATE}, got {rate!r}")


def check_rate(model: MEGAN, rate: int, what: str = "rate") -> list[float] | None:
    """:func:`rate_times`, refusing a rate other than 2 for a model that makes only the halfway frame (the
    message names the argument ``what``)."""
    check_rate_value(rate, what)
    if rate != 2 and not model.config.any_times:
        raise ValueError(f"{what} {rate} needs a model that makes frames at any time (TMNet); this "
                         f"{model.config.family_name} model makes only the halfway frame (rate 2)")
    times = rate_times(rate)
    cannot = model.can_make(times) if hasattr(model, "can_make") else None  # an exported file fixes its times
    if cannot:
        raise ValueError(f"{what} {rate}: {cannot}")
    return times


def run_window(model: MEGAN, window: Tensor, tile: int | None = None, tile_overlap: int | None = None,
               batch: int = 1, fixed_shape: bool = False, times: list[float] | None = None) -> Tensor:
    """Runs the model on one window, in spatial tiles if ``tile`` is given.

    Args:
        window: (b, n_in, 3, H, W) low-resolution input frames.
        tile: tile size in input pixels (None or >= H and W: one tile).
        tile_overlap: overlap of neighbouring tiles in input pixels; the
            outputs are blended with linear ramps across the overlap (None:
            :func:`tile_overlap_for`'s default, 16 or a quarter of a small tile).
        batch: tiles per forward.
        fixed_shape: pad the last, partial batch of tiles (repeating its last
            tile) so that every forward has one shape: one compiled or graphed
            model (:func:`compile_model`) then serves every call; the result
            never aliases the model's output buffers.
        times: the model's in-between times (None: its default, the halfway frame).

    Returns:
        (b, n_in + (n_in - 1) * k, 3, 4H, 4W) for k times (k = 1: 2*n_in - 1).
    """
    b, n, c, h, w = window.shape
    kwargs = {} if times is None else {"times": times}
    if not _tiled(tile, h, w):
        out = model(window, **kwargs)
        # A CUDA-graph replay (compile_model's "reduce-overhead") reuses its output buffers on the next call.
        return out.clone() if fixed_shape else out
    if tile < 4:
        raise ValueError(f"tile must be at least 4 input pixels, got {tile}")
    tile_overlap = tile_overlap_for(tile, tile_overlap)
    if not 0 <= tile_overlap < tile:
        raise ValueError(f"tile_overlap must be in [0, tile), got {tile_overlap} with tile={tile}")
    th, tw = min(tile, h), min(tile, w)
    corners = [(y, x) for y in _tile_starts(h, th, tile_overlap) for x in _tile_starts(w, tw, tile_overlap)]
    out = None
    weight = None
    for first in range(0, len(corners), batch):
        chunk = corners[first : first + batch]
        crops = [window[..., y : y + th, x : x + tw] for y, x in chunk]
        if fixed_shape:
            crops += crops[-1:] * (batch - len(crops))
        pieces = model(torch.cat(crops, 0), **kwargs).float()
        for k, (y, x) in enumerate(chunk):
            piece = pieces[k * b : (k + 1) * b]
            if out is None:
                out = piece.new_zeros(b, piece.shape[1], c, 4 * h, 4 * w)
                weight = piece.new_zeros(4 * h, 4 * w)
            wy = _ramp(4 * th, 4 * tile_overlap, y > 0, y + th < h, piece)
            wx = _ramp(4 * tw, 4 * tile_overlap, x > 0, x + tw < w, piece)
            wgt = wy[:, None] * wx[None, :]
            out[..., 4 * y : 4 * (y + th), 4 * x : 4 * (x + tw)] += piece * wgt
            weight[4 * y : 4 * (y + th), 4 * x : 4 * (x + tw)] += wgt
    return (out / weight).to(window.dtype)


def iter_upscale(
    model: MEGAN,
    frames: Iterable[Tensor],
    tile: int | None = None,
    tile_overlap: int | None = None,
    device: torch.device | str | None = None,
    batch: int = 1,
    fixed_shape: bool = False,
    rate: int = 2,
    need: Callable[[int, int], bool] | None = None,
) -> Iterator[Tensor | None]:
    """Streams output frames of a clip given as an iterable of (3, H, W) input frames.

    Yields (3, 4H, 4W) frames in order, rate * (t - 1) + 1 of them (2t - 1 at
    the default rate 2), holding at most n_in + (batch - 1) * (n_in - 1) input
    frames at a time.  Raises ValueError if the clip has fewer than n_in
    frames, or for a rate other than 2 with a model that makes only the
    halfway frame (:func:`check_rate`).  A clip shorter than n_in frames is one
    window of all its frames where the architecture allows (:func:`clip_window`).

    ``batch`` windows go through the model in one forward (with a ``tile``
    smaller than the frames: ``batch`` tiles of one window).  The frames
    equal those of ``batch=1`` to float rounding: the convolution libraries
    pick another algorithm for a batch of one (oneDNN on CPU: differences of
    about 1e-7).  ``fixed_shape`` pads the last, partial batch so that every
    forward has one shape (for :func:`compile_model`); then every ``batch``
    of two or more gives identical frames.

    ``need(j0, j1)``: whether any of the output frames j0 .. j1 - 1 is wanted
    (resuming, or sharing a clip among processes); a forward whose frames are
    all unwanted is not run and yields None for each of them.  The windows
    and their grouping into forwards do not depend on it, so every frame that
    is made equals the one a run of the whole clip makes, bit for bit.
    """
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise ValueError(f"batch must be an integer >= 1, got {batch!r}")
    times = check_rate(model, rate)
    n_in = model.config.num_input_frames
    stride = n_in - 1
    device = torch.device(device) if device is not None else next(model.parameters()).device
    windows_per_call = batch  # set from the first frame: 1 when the frames are cut into tiles
    buffer: collections.deque[Tensor] = collections.deque()
    emitted = 0  # output frames yielded so far
    seen = 0
    pending: list[int] = []  # starts of complete windows not yet run

    def run(starts: list[int]) -> Iterator[Tensor]:
        nonlocal emitted
        first = seen - len(buffer)  # input index of buffer[0]
        frames_ = list(buffer)
        per_window = output_frames(n_in, rate - 1)
        end = max(rate * s + per_window for s in starts)
        if need is not None and not need(emitted, end):
            for _ in range(emitted, end):
                emitted += 1
                yield None
            return
        padded = starts + starts[-1:] * (windows_per_call - len(starts)) if fixed_shape else starts
        windows = torch.stack([torch.stack(frames_[s - first : s - first + n_in], 0) for s in padded], 0)
        with torch.no_grad():
            outs = run_window(model, windows.to(device), tile, tile_overlap, batch, fixed_shape, times)
        for s, out in zip(starts, outs):
            for j in range(out.shape[0]):
                if rate * s + j >= emitted:
                    yield out[j]
                    emitted += 1

    next_start = 0
    for frame in frames:
        if seen == 0:
            windows_per_call = 1 if _tiled(tile, frame.shape[-2], frame.shape[-1]) else batch
            buffer = collections.deque(maxlen=n_in + (windows_per_call - 1) * stride)
        buffer.append(frame)
        seen += 1
        if seen == next_start + n_in:  # window [next_start, next_start + n_in) is complete
            pending.append(next_start)
            next_start += stride
            if len(pending) == windows_per_call:
                yield from run(pending)
                pending = []
    if seen < n_in:  # a short clip: one window of all of it, where the architecture allows (clip_window)
        clip_window(model, seen)
        with torch.no_grad():
            out = run_window(model, torch.stack(list(buffer), 0)[None].to(device), tile, tile_overlap, batch,
                             fixed_shape, times)
        yield from out[0].unbind(0)
        return
    # output frames made once pending runs
    covered = rate * pending[-1] + output_frames(n_in, rate - 1) if pending else emitted
    if covered < output_frames(seen, rate - 1):
        pending.append(seen - n_in)  # the last window, aligned to the end
    if pending:
        yield from run(pending)


COMPILE_MODES = ("none", "default", "reduce-overhead")


def compile_model(model: MEGAN, mode: str = "reduce-overhead"):
    """``torch.compile(model, mode=mode, fullgraph=True, dynamic=False)`` for inference (``"none"``: the model).

    The result keeps the model's attributes (``config``, ``parameters()``),
    so it goes wherever a :class:`MEGAN` does here.  Every forward of one
    shape reuses one compiled graph ("reduce-overhead": one CUDA graph on a
    GPU); run with ``fixed_shape=True`` so that the last window or tile
    batch has that shape too.
    """
    if mode not in COMPILE_MODES:
        raise ValueError(f"mode must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")
    if mode == "none":
        return model
    return torch.compile(model, mode=mode, fullgraph=True, dynamic=False)


def upscale_frames(
    model: MEGAN,
    frames: Tensor,
    tile: int | None = None,
    tile_overlap: int | None = None,
    window: int | None = None,
    batch: int = 1,
    rate: int = 2,
) -> Tensor:
    """Upscales a whole clip: (t, 3, H, W) -> (rate * (t - 1) + 1, 3, 4H, 4W), every output frame exactly once.

    Args:
        model: a :class:`MEGAN` (put it in eval mode first).
        frames: (t, 3, H, W) input frames, t >= n_in, values in [0, 1].
        tile: spatial tile size in input pixels, or None for whole frames.
            A tile covering the frame gives exactly the untiled result.
        tile_overlap: tile overlap in input pixels (blended linearly; None: 16, or a quarter of a tile under 64).
        window: output frames per temporal window; must be rate * (n_in - 1) + 1
            (the only size the model supports; default).
        batch: windows (with ``tile``: tiles) per forward; same frames as 1.
        rate: output frame rate / input frame rate (K - 1 in-between frames
            per pair of inputs at times i/K; other than 2: TMNet only).

    Returns:
        (rate * (t - 1) + 1, 3, 4H, 4W) on ``frames``' device.
    """
    n_in = model.config.num_input_frames
    rate_times(rate)
    per_window = output_frames(n_in, rate - 1)
    if window is not None and window != per_window:
        raise ValueError(f"window must be {per_window} output frames for a model with {n_in} input frames")
    if frames.dim() != 4 or frames.shape[1] != 3:
        raise ValueError(f"frames must have shape (t, 3, H, W), got {tuple(frames.shape)}")
    outs = list(iter_upscale(model, frames.unbind(0), tile, tile_overlap, batch=batch, rate=rate))
    return torch.stack(outs, 0).to(frames.device)
