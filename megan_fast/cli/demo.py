"""``megan-fast demo``: MEGAN against the bicubic baseline on a real-texture clip, with pictures and timings.

The clip is a virtual camera moving over one of scikit-image's bundled photos
(:func:`megan_fast.data.photos.make_clip`), by default "chelsea", which the
training configs hold out.  The ground truth (GT) is rounded to 8-bit levels,
as if read from PNG files; the low-resolution, low-frame-rate input is made
exactly as the training data makes it: GT frames 0, 2, 4, ... downscaled x4
with MATLAB's bicubic ``imresize``, clamped and rounded to 8-bit levels.

Outputs (in ``--output``, each written to a temporary file and renamed):
``side_by_side.mp4`` (panels LR | bicubic | MEGAN | GT per output frame, at
twice the input frame rate), ``strip.png`` (one re-made input frame and one
interpolated frame, same panels), ``metrics.json`` (Y-PSNR / Y-SSIM, timings)
and ``frames/megan_NNN.png`` (MEGAN's output frames).
"""

from __future__ import annotations

import argparse
import fractions
import os
import contextlib
import re
import time

from megan_fast import outputs
from megan_fast.cli import _common
from megan_fast.cli._common import DEMO_CHECKPOINT, finite_float, frame_rate, int_at_least, positive_float, \
    resolve_device
from megan_fast.errors import UsageError

VIDEO_NAME = "side_by_side.mp4"
STRIP_NAME = "strip.png"
METRICS_NAME = "metrics.json"
FRAMES_DIR = "frames"
_FRAME_RE = re.compile(r"megan_\d{3,}\.png")
DEMO_KIND = outputs.Kind("demo output folder", folder=True, nested=True,
                         entries=r"side_by_side\.mp4|strip\.png|metrics\.json|megan_\d{3,}\.png")
_FILES = {VIDEO_NAME: outputs.Kind("video file"), STRIP_NAME: outputs.Kind("PNG image"),
          METRICS_NAME: outputs.Kind("JSON file")}
GAP = 4  # pixels between panels (even, so that H.264's 4:2:0 frame size stays even)
PANELS = ("LR (nearest x4)", "bicubic", "MEGAN", "ground truth")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="run MEGAN on a short real-texture clip and compare it with bicubic upscaling",
        description="Renders a short clip over a photo bundled with scikit-image, downscales it x4 and "
        "drops every other frame (as the training data is made), runs MEGAN on it, scores MEGAN and the "
        "bicubic + frame-blending baseline (Y-PSNR / Y-SSIM), writes a side-by-side video, a still strip "
        "and metrics.json into --output, and times one forward pass with the fused kernels against the "
        "stock implementation (torchvision deform_conv2d, SDPA, plain graph aggregation).",
    )
    p.add_argument("--checkpoint", default=None, help=f"{_common.CHECKPOINT_HELP}; "
                   f"default: the bundled demo checkpoint ({DEMO_CHECKPOINT})")
    p.add_argument("--output", default="megan_demo", help="output folder (default: megan_demo)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into --output even if it holds files that are not the demo's (they are left alone)")
    p.add_argument("--photo", default="chelsea", help="scikit-image photo to film (default: chelsea, held out "
                   "from training); e.g. astronaut, coffee, rocket, motorcycle_left")
    p.add_argument("--size", type=_parse_size, default=(128, 192), metavar="HxW",
                   help="ground-truth frame size, multiples of 4 (default 128x192; LR 32x48)")
    p.add_argument("--frames", type=int_at_least(3), default=7,
                   help="ground-truth frames, odd (default 7: 4 LR inputs -> 7 outputs)")
    p.add_argument("--motion", default="pan", choices=("pan", "zoom"), help="camera motion (default pan)")
    p.add_argument("--speed", type=finite_float, default=None,
                   help="pan: GT pixels per GT frame (default 1.5); zoom: zoom factor - 1 per frame (default 0.02)")
    p.add_argument("--seed", type=int_at_least(0), default=0, help="start point and direction of the motion (default 0)")
    p.add_argument("--view-scale", type=positive_float, default=1.0,
                   help="photo pixels per GT pixel (default 1: the photo's own detail)")
    p.add_argument("--fps", type=frame_rate, default=2.0,
                   help="frame rate of the LR input; the video plays at twice this (default 2)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--no-bench", action="store_true", help="skip timing the fused kernels against stock")
    p.add_argument("--bench-runs", type=int_at_least(1), default=1,
                   help="timed forward passes per backend, after one warm-up (default 1; with more, the median is "
                   "reported); the timing takes about twice as long as the network did per run")
    p.set_defaults(func=run)


def _parse_size(text: str) -> tuple[int, int]:
    h, w = _common.frame_size(text)
    if h % 4 or w % 4 or h < 16 or w < 16:
        raise argparse.ArgumentTypeError(f"H and W must be multiples of 4 and at least 16 (LR 4x4), got {h}x{w}")
    return h, w


def check_output(path: str, overwrite: bool, inputs=()) -> outputs.Output:
    """The checked ``--output`` folder; raises OutputError if the demo may not write into it.

    A folder that holds only the demo's own files is rewritten without
    ``--overwrite``; with it, other files may sit beside them (they are left
    alone).  A file of one of the demo's names that megan-fast did not write
    is never replaced.
    """
    out = outputs.check_output(path, "--output", DEMO_KIND, inputs=inputs, overwrite=overwrite, existing="fill")
    for name, kind in _FILES.items():
        out.child(name, kind).check_existing()
    frames = os.path.join(out.path, FRAMES_DIR)
    if os.path.lexists(frames):
        if os.path.islink(frames) or not os.path.isdir(frames):
            raise outputs.OutputError(f"--output {path!r}: {FRAMES_DIR!r} in it is not a folder; choose another folder")
        for name in sorted(os.listdir(frames)):  # frames the demo would replace or prune must be its own
            if _FRAME_RE.fullmatch(name) and not outputs.is_ours(os.path.join(frames, name)):
                raise outputs.OutputError(f"--output {path!r}: {FRAMES_DIR}/{name} was not written by megan-fast; "
                                          "choose another folder")
    return out


def make_demo_clip(photo: str, frames: int, size: tuple[int, int], motion: str = "pan",
                   speed: float | None = None, seed: int = 0, view_scale: float = 1.0):
    """The demo's ground truth and low-resolution input.

    Returns:
        gt: (frames, 3, h, w) float32 on 8-bit levels (as read from PNG files).
        lq: ((frames + 1) / 2, 3, h/4, w/4) float32: GT frames 0, 2, 4, ...,
            MATLAB-bicubic x4 downscaled, clamped to [0, 1], rounded to 8-bit
            levels, exactly as the training data sets make LR frames.
    """
    import torch

    from megan_fast.data.items import make_lq
    from megan_fast.data.photos import make_clip

    clip = make_clip(photo, frames, size, motion=motion, speed=speed, seed=seed, view_scale=view_scale)
    gt = clip.clamp(0, 1).mul(255).round().to(torch.uint8).float().div_(255)
    return gt, make_lq(gt[0::2], 4, quantize=True)


def _hcat(panels, gap: int):
    """(3, H, W_i) panels side by side with ``gap`` white columns between them."""
    import torch

    sep = panels[0].new_ones(3, panels[0].shape[1], gap)
    parts = []
    for i, p in enumerate(panels):
        parts += [sep, p] if i else [p]
    return torch.cat(parts, -1)


def panel_row(t: int, lq, bicubic, megan, gt, gap: int = GAP):
    """Output frame ``t`` as [LR (nearest x4; for an interpolated frame the previous LR frame) | bicubic |
    MEGAN | GT]: (3, H, 4W + 3 * gap)."""
    lr = lq[t // 2].repeat_interleave(4, -2).repeat_interleave(4, -1)
    return _hcat([lr, bicubic[t], megan[t], gt[t]], gap).clamp(0, 1)


def _write_frames(frames, folder: str) -> None:
    """MEGAN's frames as ``folder/megan_NNN.png``; earlier demo frames beyond this run's count are removed."""
    from megan_fast.images import write_png

    os.makedirs(folder, exist_ok=True)
    names = {f"megan_{i:03d}.png" for i in range(frames.shape[0])}
    for i, frame in enumerate(frames):
        write_png(frame, os.path.join(folder, f"megan_{i:03d}.png"))
    for n in os.listdir(folder):  # frames of an earlier, longer run (only megan-fast's own)
        path = os.path.join(folder, n)
        if _FRAME_RE.fullmatch(n) and n not in names and outputs.is_ours(path):
            os.remove(path)


def _remove_own(folder: str) -> None:
    """Removes the demo's own files from ``folder``, then the folder if that emptied it (nothing else is touched)."""
    frames = os.path.join(folder, FRAMES_DIR)
    for path in [os.path.join(folder, n) for n in _FILES] + [
            os.path.join(frames, n) for n in (os.listdir(frames) if os.path.isdir(frames) else [])]:
        if os.path.isfile(path) and outputs.is_ours(path):
            os.remove(path)
    for path in (frames, folder):
        with contextlib.suppress(OSError):
            os.rmdir(path)


def _write_video(rows: list, out: outputs.Output, fps: fractions.Fraction) -> None:
    """(3, H, W) frames -> H.264 video at ``out``, written atomically."""
    from megan_fast import video

    with out.atomic_file() as tmp:
        writer = video.VideoWriter(tmp, fps, rows[0].shape[-1], rows[0].shape[-2], command="demo")
        try:
            for row in rows:
                writer.write(row)
            writer.close()
        except BaseException:
            writer.abort()
            raise


def format_table(scores: dict) -> str:
    """The MEGAN vs bicubic table printed by the demo."""
    m, b = scores["megan"], scores["bicubic"]
    lines = [f"{'':<22}{'Y-PSNR (dB)':>20}{'Y-SSIM':>20}",
             f"{'frames':<22}{'bicubic':>10}{'MEGAN':>10}{'bicubic':>10}{'MEGAN':>10}"]
    for key, label in (("inputs", "re-made inputs"), ("interpolated", "interpolated"), ("all", "all")):
        lines.append(f"{label + ' (' + str(m[key]['frames']) + ')':<22}{b[key]['psnr_y']:>10.2f}"
                     f"{m[key]['psnr_y']:>10.2f}{b[key]['ssim_y']:>10.4f}{m[key]['ssim_y']:>10.4f}")
    return "\n".join(lines)


def _checkpoint(args: argparse.Namespace) -> str:
    """The checkpoint folder (or .pth file) to use; raises UsageError if a folder's files are missing."""
    checkpoint = DEMO_CHECKPOINT if args.checkpoint is None else args.checkpoint
    if not checkpoint.strip():
        raise UsageError("--checkpoint is empty; give a model folder or a .pth file")
    if args.checkpoint is not None and os.path.isfile(checkpoint):
        return checkpoint  # an official .pth file: load_model checks it
    missing = [n for n in ("config.json", "model.safetensors") if not os.path.isfile(os.path.join(checkpoint, n))]
    if missing:
        what = "the bundled demo checkpoint" if args.checkpoint is None else "--checkpoint"
        raise UsageError(f"{what} is missing: no {' or '.join(missing)} in {checkpoint!r}; pass --checkpoint DIR "
                         "with a model folder (config.json + model.safetensors, as written by megan-fast train)")
    return checkpoint


def _strip(rows: list):
    """One re-made input frame above the middle interpolated frame; returns (picture, [frame numbers])."""
    import torch

    t = len(rows)
    interp = t // 2 if (t // 2) % 2 else t // 2 - 1  # middle interpolated frame
    frames = [interp - 1, interp]
    gap = rows[0].new_ones(3, GAP, rows[0].shape[-1])
    return torch.cat([rows[frames[0]], gap, rows[frames[1]]], -2), frames


def _write_outputs(out: outputs.Output, rows: list, strip, megan, fps: fractions.Fraction, make_report) -> None:
    """Video, strip, frames, then metrics.json (``make_report()`` may run the benchmark); a first run that
    fails leaves no folder behind."""
    from megan_fast.images import save_png

    created = not os.path.exists(out.path)
    os.makedirs(out.path, exist_ok=True)
    try:
        _write_video(rows, out.child(VIDEO_NAME, _FILES[VIDEO_NAME]), fps * 2)
        with out.child(STRIP_NAME, _FILES[STRIP_NAME]).atomic_file() as tmp:
            save_png(strip, tmp)
        _write_frames(megan, os.path.join(out.path, FRAMES_DIR))
        outputs.write_json(make_report(), out.child(METRICS_NAME, _FILES[METRICS_NAME]), "demo")
    except BaseException:
        if created:
            _remove_own(out.path)
        raise


def _bench(args: argparse.Namespace, model, lq, device):
    """The auto-vs-stock timing of one forward pass, or None with --no-bench."""
    from megan_fast.benchmarking import bench_forward

    if args.no_bench:
        return None
    n_in = model.config.num_input_frames
    print(f"timing one forward pass on the {n_in}-frame input window ({lq.shape[-2]}x{lq.shape[-1]}), "
          f"backends auto and stock, {args.bench_runs} run(s) each after a warm-up ...")
    bench = bench_forward(model, lq[:n_in].unsqueeze(0).to(device), args.bench_runs)
    print(f"forward: fused (auto) {bench['auto_s'] * 1e3:.0f} ms, stock {bench['stock_s'] * 1e3:.0f} ms "
          f"-> {bench['speedup']:.2f}x")
    return bench


def run(args: argparse.Namespace) -> int:
    start_all = time.perf_counter()
    if args.frames % 2 == 0:
        raise UsageError(f"--frames must be odd and at least 3, got {args.frames}")
    checkpoint = _checkpoint(args)
    out = check_output(args.output, args.overwrite, inputs=[("--checkpoint", checkpoint)])

    import torch

    from megan_fast.evaluation import score_frames
    from megan_fast.inference import TooShortError, clip_window, upscale_frames
    from megan_fast.models.baseline import bicubic_blend

    device = resolve_device(args.device)
    if device.type == "cpu":
        # Recurrent states of small models decay into denormal floats, which slow CPU arithmetic ~10x.
        torch.set_flush_denormal(True)
    model = _common.load_model(checkpoint, device)
    try:
        clip_window(model, (args.frames + 1) // 2)
    except TooShortError as exc:
        raise UsageError(f"--frames {args.frames} gives {(args.frames + 1) // 2} LR frames: {exc}") from None
    h, w = args.size
    try:
        gt, lq = make_demo_clip(args.photo, args.frames, (h, w), args.motion, args.speed, args.seed, args.view_scale)
    except ValueError as exc:
        raise UsageError(f"--photo/--motion/--speed: {exc}") from None
    params = sum(p.numel() for p in model.parameters())
    print(f"clip: {args.photo!r}, {args.motion}, {args.frames} GT frames {h}x{w}; "
          f"MEGAN input: {lq.shape[0]} LR frames {h // 4}x{w // 4}")
    print(f"model: {checkpoint} ({params / 1e6:.2f} M parameters) on {device}")

    t0 = time.perf_counter()
    megan = upscale_frames(model, lq).float().clamp(0, 1)
    upscale_s = time.perf_counter() - t0
    bicubic = bicubic_blend(lq).clamp(0, 1)
    scores = {"megan": score_frames(megan, gt), "bicubic": score_frames(bicubic, gt)}
    print(f"MEGAN: {megan.shape[0]} frames {h}x{w} in {upscale_s:.2f} s")
    print()
    print(format_table(scores))
    print()

    rows = [panel_row(t, lq, bicubic, megan, gt) for t in range(gt.shape[0])]
    strip, strip_frames = _strip(rows)
    fps = fractions.Fraction(args.fps).limit_denominator(1001)
    bench = None

    def report() -> dict:
        nonlocal bench
        bench = _bench(args, model, lq, device)
        return {
            "clip": {"photo": args.photo, "motion": args.motion, "speed": args.speed, "seed": args.seed,
                     "view_scale": args.view_scale, "gt_frames": gt.shape[0], "gt_size": [h, w],
                     "lr_frames": lq.shape[0], "lr_size": [h // 4, w // 4], "fps_in": float(fps),
                     "fps_out": float(fps * 2)},
            "model": {"checkpoint": os.path.abspath(checkpoint), "parameters": params, "config": model.config_dict()},
            "device": str(device),
            "protocol": "Y channel (BT.601), frames rounded to uint8, crop_border 0, mean over frames; "
                        "inputs = frames 0, 2, ...; interpolated = frames 1, 3, ...",
            "metrics": scores,
            "upscale_seconds": upscale_s,
            "bench": bench,
            "panels": list(PANELS),
            "strip_frames": strip_frames,
            "files": {"video": VIDEO_NAME, "strip": STRIP_NAME, "frames": FRAMES_DIR},
        }

    _write_outputs(out, rows, strip, megan, fps, report)

    m, b = scores["megan"]["all"], scores["bicubic"]["all"]
    print(f"done in {time.perf_counter() - start_all:.1f} s; wrote {os.path.join(out.shown, '')}:")
    print(f"  {VIDEO_NAME}  panels {' | '.join(PANELS)}, {gt.shape[0]} frames at {float(fps * 2):.3g} fps")
    print(f"  {STRIP_NAME}  rows: re-made input frame {strip_frames[0]}, interpolated frame {strip_frames[1]}")
    print(f"  {METRICS_NAME}, {FRAMES_DIR}/ (MEGAN's output frames)")
    summary = (f"MEGAN {m['psnr_y']:.2f} dB / {m['ssim_y']:.4f} vs bicubic {b['psnr_y']:.2f} dB / "
               f"{b['ssim_y']:.4f} (Y-PSNR / Y-SSIM, all frames)")
    if bench is not None:
        summary += f"; fused kernels {bench['speedup']:.2f}x faster than stock"
    print(summary)
    return 0
