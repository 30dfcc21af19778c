"""``megan-fast upscale INPUT OUTPUT``: a clip at 2x the frame rate and 4x the resolution."""

from __future__ import annotations

import argparse
import os
import sys
import time

DEMO_CHECKPOINT = os.path.join(os.path.dirname(os.path.dirname(__file__)), "checkpoints", "demo")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "upscale",
        help="upscale a video file or frame folder (2x frame rate, 4x resolution)",
        description="Reads a video file (any format FFmpeg reads) or a folder of frames and writes an H.264 "
        "video (or, for an OUTPUT without a video extension, a folder of PNG frames) with twice the frame rate "
        "and four times the resolution, carrying the audio over unchanged. The output is written to a temporary "
        "file and renamed on success.",
    )
    p.add_argument("input", help="video file or folder of frames")
    p.add_argument("output", help="output video (.mp4, .mkv, .mov) or folder for PNG frames")
    p.add_argument("--checkpoint", default=None, help="model folder (config.json + model.safetensors); "
                   "default: the bundled demo checkpoint")
    p.add_argument("--tile", type=int, default=None, help="spatial tile size in input pixels (saves memory)")
    p.add_argument("--tile-overlap", type=int, default=16, help="tile overlap in input pixels (default 16)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="compute dtype: bfloat16/float16 use autocast on the GPU")
    p.add_argument("--fps", type=float, default=25.0, help="frame rate of a frame-folder input (default 25)")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists (never the input)")
    p.set_defaults(func=run)


VIDEO_EXTENSIONS = (".mp4", ".mkv", ".mov", ".avi", ".webm")


def _fail(msg: str) -> int:
    print(f"megan-fast upscale: error: {msg}", file=sys.stderr)
    return 2


def _same_path(a: str, b: str) -> bool:
    if os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)
    return os.path.realpath(a) == os.path.realpath(b)


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from megan_fast import video
    from megan_fast.inference import iter_upscale
    from megan_fast.models import MEGAN

    src, dst = args.input, args.output
    if _same_path(src, dst) or os.path.realpath(dst).startswith(os.path.realpath(src) + os.sep):
        return _fail(f"OUTPUT {dst!r} would overwrite the input {src!r}; choose another path")
    if os.path.exists(dst) and not args.overwrite:
        return _fail(f"OUTPUT {dst!r} exists; pass --overwrite to replace it")
    checkpoint = args.checkpoint or DEMO_CHECKPOINT
    if not os.path.isfile(os.path.join(checkpoint, "config.json")):
        return _fail(f"no checkpoint at {checkpoint!r} (expected config.json and model.safetensors)")
    try:
        info = video.probe(src, folder_fps=args.fps)
    except video.VideoError as exc:
        return _fail(str(exc))

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        return _fail("--device cuda but no CUDA device is available")
    model = MEGAN.from_pretrained(checkpoint).to(device).eval()
    n_in = model.config.num_input_frames
    if info.num_frames is not None and info.num_frames < n_in:
        return _fail(f"{src}: the clip has {info.num_frames} frames; the model needs at least {n_in}")
    dtype = getattr(torch, args.dtype)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    torch.set_flush_denormal(True)

    out_w, out_h = 4 * info.width, 4 * info.height
    as_video = os.path.splitext(dst)[1].lower() in VIDEO_EXTENSIONS
    writer = (
        video.VideoWriter(dst, info.fps * 2, out_w, out_h, audio_from=src if info.has_audio else None)
        if as_video
        else video.FrameFolderWriter(dst)
    )
    total = 2 * info.num_frames - 1 if info.num_frames else None
    start = time.perf_counter()
    frames_in = 0

    def counted():
        nonlocal frames_in
        for frame in video.read_frames(src):
            frames_in += 1
            yield frame

    try:
        with tqdm(total=total, unit="frame", desc="upscale", disable=None) as bar, autocast:
            for frame in iter_upscale(model, counted(), tile=args.tile, tile_overlap=args.tile_overlap, device=device):
                writer.write(frame)
                bar.update(1)
        writer.commit()
    except (video.VideoError, ValueError) as exc:
        writer.abort()
        return _fail(str(exc))
    except torch.OutOfMemoryError:
        writer.abort()
        return _fail(f"out of memory on {device}; try --tile 128 (or smaller) to process the frames in tiles")
    except BaseException:
        writer.abort()
        raise
    elapsed = time.perf_counter() - start
    print(
        f"upscaled {frames_in} frames ({info.width}x{info.height}, {float(info.fps):.3g} fps) -> "
        f"{writer.count} frames ({out_w}x{out_h}, {float(info.fps * 2):.3g} fps) in {elapsed:.1f} s "
        f"({writer.count / elapsed:.2f} frames/s); wrote {dst}"
    )
    return 0
