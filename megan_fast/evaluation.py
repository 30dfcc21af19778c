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
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Iterable

import numpy as np
import torch
from torch import Tensor

from megan_fast.inference import run_window, window_starts
from megan_fast.models.baseline import bicubic_blend


__all__ = [
    "SAVED_FRAMES", "ClipScore", "bicubic_blend", "evaluate", "format_table", "predict_clip", "run_window",
    "score_clip", "score_frames", "window_starts",
]


@dataclasses.dataclass
class ClipScore:
    psnr_y: float
    ssim_y: float
    frames: int


def predict_clip(predict: Callable[[Tensor], Tensor], gt: Tensor, lq: Tensor, n_in: int) -> dict[int, Tensor]:
    """Runs ``predict`` on every protocol window; returns {gt frame index: predicted frame}.

    Args:
        predict: (n_in, 3, h, w) -> (2*n_in - 1, 3, 4h, 4w).
        gt: (T, 3, H, W) ground truth (only its length is used here).
        lq: (T, 3, H/4, W/4) low-resolution versions of every GT frame.
    """
    t_out = 2 * n_in - 1
    preds: dict[int, Tensor] = {}
    for s in window_starts(gt.shape[0], t_out):
        out = predict(lq[s : s + t_out : 2])
        for j in range(t_out):
            preds.setdefault(s + j, out[j])
    return preds


def score_clip(preds: dict[int, Tensor], gt: Tensor) -> ClipScore:
    from megan_fast.images import to_uint8
    from megan_fast.metrics import calculate_psnr, calculate_ssim

    psnrs, ssims = [], []
    for i in range(gt.shape[0]):
        a, b = to_uint8(preds[i]), to_uint8(gt[i])
        psnrs.append(calculate_psnr(a, b, crop_border=0, test_y_channel=True))
        ssims.append(calculate_ssim(a, b, crop_border=0, test_y_channel=True))
    return ClipScore(float(np.mean(psnrs)), float(np.mean(ssims)), len(psnrs))


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
    save_dir: str | None = None,
    baselines: bool = True,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Scores ``model`` on (name, gt (T, 3, H, W), lq or None) clips; returns the JSON-ready report."""
    from megan_fast.data.imresize import imresize

    n_in = model.config.num_input_frames
    model.eval()

    def predict(lq: Tensor) -> Tensor:
        with torch.no_grad():
            return run_window(model, lq.unsqueeze(0).to(device), tile)[0].float().cpu()

    report: dict = {"clips": {}, "average": {}}
    base: dict = {"clips": {}, "average": {}}
    for name, gt, lq in clips:
        if gt.shape[0] < 2 * n_in - 1:
            raise ValueError(f"clip {name!r} has {gt.shape[0]} frames; the protocol needs at least {2 * n_in - 1}")
        if lq is None:
            lq = imresize(gt, scale=0.25)
        preds = predict_clip(predict, gt, lq, n_in)
        report["clips"][name] = dataclasses.asdict(score_clip(preds, gt))
        if save_dir is not None:
            _save_frames(preds, os.path.join(save_dir, name))
        if baselines:
            base["clips"][name] = dataclasses.asdict(score_clip(predict_clip(bicubic_blend, gt, lq, n_in), gt))
        if progress is not None:
            s = report["clips"][name]
            progress(f"{name}: {s['psnr_y']:.2f} dB / {s['ssim_y']:.4f} over {s['frames']} frames")
    for rep in (report, base):
        if rep["clips"]:
            rep["average"] = {
                "psnr_y": float(np.mean([c["psnr_y"] for c in rep["clips"].values()])),
                "ssim_y": float(np.mean([c["ssim_y"] for c in rep["clips"].values()])),
                "frames": int(sum(c["frames"] for c in rep["clips"].values())),
            }
    if baselines:
        report["baselines"] = {"bicubic_blend": base}
    return report


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
    return "\n".join(rows)
