"""The evaluation protocol of space-time video super-resolution papers (docs/DESIGN.md section 4).

For a clip of T ground-truth frames: output windows of 2*n_in - 1 = 7 frames
advance by 6, the last one aligned to the end; the model's inputs are the
window's odd frames (1-based: 1, 3, 5, 7), downscaled x4 (MATLAB bicubic) or
read from a pre-made LR folder.  Outputs are rounded to uint8 and scored on
the Y channel (BT.601) with crop_border 0; every ground-truth frame is scored
exactly once (from the earliest window containing it).  Scores are averaged
per clip, then over clips.

The baseline: bicubic x4 upscaling of each input frame, and for the frames in
between, the average of the two upscaled neighbours (frame blending).

At a frame rate K times the input's (``rate=K``, time-modulated models:
TMNet), the ground truth has K - 1 frames between consecutive inputs: windows
of K(n_in - 1) + 1 ground-truth frames, inputs every K-th frame, the model
asked for the frames at times i/K, the baseline blending at those times; the
report adds averages per time (``per_time``: "0" for the re-made inputs, then
"1/K", ...).
"""

from __future__ import annotations

import dataclasses
import fractions
import os
from typing import Callable, Iterable

import numpy as np
import torch
from torch import Tensor

from megan_fast.inference import TooShortError, check_rate, clip_window, run_window, window_starts
from megan_fast.models.baseline import bicubic_blend
from megan_fast.models.config import output_frames


__all__ = [
    "SAVED_FRAMES", "ClipScore", "bicubic_blend", "evaluate", "format_table", "predict_clip", "run_window",
    "score_clip", "score_frames", "window_starts",
]


@dataclasses.dataclass
class ClipScore:
    psnr_y: float
    ssim_y: float
    frames: int
    per_time: dict | None = None  # rate > 2: {"0" | "1/K" | ...: {"psnr_y", "ssim_y", "frames"}}


def predict_clip(predict: Callable[[Tensor], Tensor], gt: Tensor, lq: Tensor, n_in: int, rate: int = 2,
                 phases: dict[int, int] | None = None) -> dict[int, Tensor]:
    """Runs ``predict`` on every protocol window; returns {gt frame index: predicted frame}.

    Args:
        predict: (n_in, 3, h, w) -> (rate * (n_in - 1) + 1, 3, 4h, 4w).
        gt: (T, 3, H, W) ground truth (only its length is used here).
        lq: (T, 3, H/4, W/4) low-resolution versions of every GT frame.
        rate: ground-truth frames per input frame (the inputs are every rate-th frame of a window).
        phases: filled with {gt frame index: j}, the frame's time j / rate after its window's input.
    """
    t_out = output_frames(n_in, rate - 1)
    preds: dict[int, Tensor] = {}
    for s in window_starts(gt.shape[0], t_out):
        out = predict(lq[s : s + t_out : rate])
        for j in range(t_out):
            if s + j not in preds:
                preds[s + j] = out[j]
                if phases is not None:
                    phases[s + j] = j % rate
    return preds


def _time_label(phase: int, rate: int) -> str:
    return str(fractions.Fraction(phase, rate))


def score_clip(preds: dict[int, Tensor], gt: Tensor, phases: dict[int, int] | None = None,
               rate: int = 2) -> ClipScore:
    """Means of the per-frame Y-PSNR / Y-SSIM; with ``phases`` (rate > 2) also per time."""
    from megan_fast.images import to_uint8
    from megan_fast.metrics import calculate_psnr, calculate_ssim

    psnrs, ssims = [], []
    for i in range(gt.shape[0]):
        a, b = to_uint8(preds[i]), to_uint8(gt[i])
        psnrs.append(calculate_psnr(a, b, crop_border=0, test_y_channel=True))
        ssims.append(calculate_ssim(a, b, crop_border=0, test_y_channel=True))
    per_time = None
    if phases is not None:
        per_time = {}
        for phase in range(rate):
            idx = [i for i in range(gt.shape[0]) if phases[i] == phase]
            if idx:
                per_time[_time_label(phase, rate)] = {"psnr_y": float(np.mean([psnrs[i] for i in idx])),
                                                      "ssim_y": float(np.mean([ssims[i] for i in idx])),
                                                      "frames": len(idx)}
    return ClipScore(float(np.mean(psnrs)), float(np.mean(ssims)), len(psnrs), per_time)


def _as_dict(score: ClipScore) -> dict:
    d = dataclasses.asdict(score)
    if d["per_time"] is None:
        del d["per_time"]
    return d


def score_frames(pred: Tensor, gt: Tensor) -> dict:
    """Y-PSNR / Y-SSIM (uint8-rounded, crop_border 0) of (T, 3, H, W) frames against GT, per frame group.

    Returns:
        {"inputs" | "interpolated" | "all": {"psnr_y", "ssim_y", "frames"},
        "per_frame": {"psnr_y": [...], "ssim_y": [...]}}; averages are means
        of the per-frame values (frames 0, 2, ... re-make inputs, 1, 3, ...
        are interpolated).
    """
    from megan_fast.metrics import psnr_y, ssim_y

    psnr = psnr_y(pred, gt).tolist()
    ssim = ssim_y(pred, gt).tolist()
    groups = {"inputs": range(0, len(psnr), 2), "interpolated": range(1, len(psnr), 2), "all": range(len(psnr))}
    out: dict = {
        name: {
            "psnr_y": sum(psnr[i] for i in idx) / len(idx),
            "ssim_y": sum(ssim[i] for i in idx) / len(idx),
            "frames": len(idx),
        }
        for name, idx in groups.items()
    }
    out["per_frame"] = {"psnr_y": psnr, "ssim_y": ssim}
    return out


def evaluate(
    model,
    clips: Iterable[tuple[str, Tensor, Tensor | None]],
    device: torch.device | str = "cpu",
    tile: int | None = None,
    tile_overlap: int | None = None,
    save_dir: str | None = None,
    baselines: bool = True,
    progress: Callable[[str], None] | None = None,
    rate: int = 2,
    world=None,
) -> dict:
    """Scores ``model`` on (name, gt (T, 3, H, W), lq or None) clips; returns the JSON-ready report.

    ``rate``: ground-truth frames per input frame (2: the protocol above; more: TMNet's in-between frames
    at times i/rate, scored per time too).  ``world`` (:class:`megan_fast.distributed.World`, several
    processes): ``clips`` are this process's share (the clips' indices as given to it), their scores are
    gathered and every process returns the report one process would make, clips in the same order.
    """
    from megan_fast.data.imresize import imresize

    n_in = model.config.num_input_frames
    times = check_rate(model, rate)
    t_out = output_frames(n_in, rate - 1)
    model.eval()

    def predict(lq: Tensor) -> Tensor:
        with torch.no_grad():
            return run_window(model, lq.unsqueeze(0).to(device), tile, tile_overlap, times=times)[0].float().cpu()

    records = []  # (index, name, score, baseline score or None)
    for index, (name, gt, lq) in clips if world is not None else enumerate(clips):
        n_clip = n_in  # a clip shorter than one window: the inputs it has, where the architecture allows
        if gt.shape[0] < t_out:
            try:
                n_clip = clip_window(model, (gt.shape[0] - 1) // rate + 1)
            except TooShortError as exc:
                raise TooShortError(f"clip {name!r} has {gt.shape[0]} ground-truth frames, so "
                                    f"{(gt.shape[0] - 1) // rate + 1} input(s) at rate {rate}: {exc}") from None
        if lq is None:
            lq = imresize(gt, scale=0.25)
        phases: dict[int, int] | None = {} if rate > 2 else None
        preds = predict_clip(predict, gt, lq, n_clip, rate, phases)
        score = _as_dict(score_clip(preds, gt, phases, rate))
        if save_dir is not None:
            _save_frames(preds, os.path.join(save_dir, name))
        blend_score = None
        if baselines:
            blend = predict_clip(lambda w: bicubic_blend(w, times), gt, lq, n_clip, rate)
            blend_score = _as_dict(score_clip(blend, gt, phases, rate))
        records.append((index, name, score, blend_score))
        if progress is not None:
            progress(f"{name}: {score['psnr_y']:.2f} dB / {score['ssim_y']:.4f} over {score['frames']} frames")
    if world is not None:  # every process's clips, in the order one process scores them
        records = sorted(r for part in world.gather(records) for r in part)
    report: dict = {"clips": {name: score for _, name, score, _ in records}, "average": {}}
    base: dict = {"clips": {name: b for _, name, _, b in records if b is not None}, "average": {}}
    for rep in (report, base):
        if rep["clips"]:
            rep["average"] = _average(list(rep["clips"].values()))
            if rate > 2:
                labels = [_time_label(p, rate) for p in range(rate)]
                rep["average"]["per_time"] = {
                    label: _average([c["per_time"][label] for c in rep["clips"].values() if label in c["per_time"]])
                    for label in labels if any(label in c["per_time"] for c in rep["clips"].values())
                }
    if rate > 2:
        report["rate"] = rate
    if baselines:
        report["baselines"] = {"bicubic_blend": base}
    return report


def _average(scores: list[dict]) -> dict:
    """Means over clips of their scores (frames: the total)."""
    return {
        "psnr_y": float(np.mean([c["psnr_y"] for c in scores])),
        "ssim_y": float(np.mean([c["ssim_y"] for c in scores])),
        "frames": int(sum(c["frames"] for c in scores)),
    }


SAVED_FRAMES = r"\d{5}\.png"  # names of the frames written under save_dir/<clip>/


def _save_frames(preds: dict[int, Tensor], folder: str) -> None:
    """Marked PNGs ``00000.png``, ... into ``folder`` (inside the caller's temporary output folder)."""
    from megan_fast.images import save_png

    os.makedirs(folder, exist_ok=True)
    for i in sorted(preds):
        save_png(preds[i], os.path.join(folder, f"{i:05d}.png"))


def format_table(report: dict) -> str:
    rows = [f"{'clip':<24} {'PSNR-Y':>8} {'SSIM-Y':>8} {'frames':>7}"]
    base = report.get("baselines", {}).get("bicubic_blend", {}).get("clips", {})
    if base:
        rows[0] += f"   {'bicubic+blend PSNR-Y':>21} {'SSIM-Y':>8}"
    for name, s in list(report["clips"].items()) + [("average", report["average"])]:
        line = f"{name:<24} {s['psnr_y']:>8.2f} {s['ssim_y']:>8.4f} {s['frames']:>7d}"
        b = base.get(name) if name != "average" else report.get("baselines", {}).get("bicubic_blend", {}).get("average")
        if b:
            line += f"   {b['psnr_y']:>21.2f} {b['ssim_y']:>8.4f}"
        rows.append(line)
    base_avg = report.get("baselines", {}).get("bicubic_blend", {}).get("average", {}).get("per_time", {})
    for label, s in report["average"].get("per_time", {}).items():
        line = f"{'  t = ' + label:<24} {s['psnr_y']:>8.2f} {s['ssim_y']:>8.4f} {s['frames']:>7d}"
        if label in base_avg:
            line += f"   {base_avg[label]['psnr_y']:>21.2f} {base_avg[label]['ssim_y']:>8.4f}"
        rows.append(line)
    return "\n".join(rows)
