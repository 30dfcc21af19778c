"""``megan-fast upscale INPUT OUTPUT``: a clip at K x the frame rate (default 2) and 4x the resolution.

Everything is checked before the model runs (OUTPUT's path and format, the
input, the device, the checkpoint, that it can make the rate asked for, that
the container takes the audio); the output is written to a temporary beside
OUTPUT and renamed into place when complete (:mod:`megan_fast.outputs`).
Output frame K*i is shown at input frame i's time and frame K*i + j at j/K of
the way to the next, so a variable frame rate stays in step with the copied
audio.
"""

from __future__ import annotations

import argparse
import contextlib
import fractions
import functools
import sys
import time
import warnings

from megan_fast import outputs
from megan_fast.cli import _common
from megan_fast.cli._common import DEMO_CHECKPOINT, compute_dtype, frame_rate, int_at_least, resolve_device
from megan_fast.errors import UsageError
from megan_fast.video import FrameFolderWriter
from megan_fast.video import parse_option as video_parse_option

VIDEO_KIND = outputs.Kind("video file")
FRAMES_KIND = outputs.Kind("folder of PNG frames", folder=True, entries=FrameFolderWriter.NAMES)


def add_parser(sub) -> None:
    from megan_fast.inference import COMPILE_MODES
    from megan_fast.video import VIDEO_OUTPUTS

    p = sub.add_parser(
        "upscale",
        help="upscale a video file or frame folder (2x or, with --rate K, Kx frame rate; 4x resolution)",
        description="Reads a video file (any format FFmpeg reads) or a folder of frames and writes a video "
        "(H.264 in .mp4/.mov/.mkv, VP9 in .webm) or, for an OUTPUT without an extension, a folder of PNG frames, "
        "with twice (--rate K: K times) the frame rate and four times the resolution, carrying the audio over "
        "unchanged. The output is written to a temporary file and renamed on success.",
    )
    p.add_argument("input", help="video file, folder of frames, or - for a YUV4MPEG2 stream on standard input")
    p.add_argument("output", help=f"output video ({', '.join(VIDEO_OUTPUTS)}), folder for PNG frames, or - for "
                   "YUV4MPEG2 on standard output")
    p.add_argument("--checkpoint", default=None, help=f"{_common.CHECKPOINT_HELP}; default: the bundled "
                   "demo checkpoint")
    _common.add_tile_arguments(p)
    p.add_argument("--batch", type=int_at_least(1), default=1,
                   help="windows per forward (with --tile: tiles per forward), >= 1 (default 1); the frames equal "
                   "those of --batch 1 to float rounding")
    p.add_argument("--compile", default="none", choices=COMPILE_MODES,
                   help="torch.compile the model (reduce-overhead: CUDA graphs on a GPU); every forward has one "
                   "shape, so it compiles once (minutes on a CPU) (default none)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    _common.add_providers_argument(p)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="compute dtype on CUDA devices: bfloat16/float16 use autocast (a CPU runs float32)")
    _common.add_rate_argument(p, "output frame rate / input frame rate")
    p.add_argument("--fps", type=frame_rate, default=25.0, help="frame rate of a frame-folder input (default 25)")
    enc = p.add_argument_group("encoder (video files; default: H.264 CRF 18, VP9 CRF 20 in .webm, 4:2:0 at the "
                               "input's bit depth)")
    enc.add_argument("--codec", default=None,
                     help="video encoder: libx264, libx265, libsvtav1, libvpx-vp9, ffv1, prores_ks, h264_nvenc, ... "
                     "(as this PyAV build has them)")
    enc.add_argument("--crf", type=_common.finite_float, default=None,
                     help="constant quality (the encoder's crf; cq for NVENC): lower is better")
    enc.add_argument("--preset", default=None, help="the encoder's speed preset (x264/x265: slow, medium, ...; "
                     "SVT-AV1: 0-13; NVENC: p1-p7)")
    enc.add_argument("--pix-fmt", default=None, help="pixel format: yuv420p, yuv420p10le, yuv444p10le, ... "
                     "(default: 4:2:0 at the input's bit depth)")
    enc.add_argument("--encoder-option", action="append", default=[], type=video_parse_option, metavar="KEY=VALUE",
                     help="an option of the encoder, as FFmpeg names it (repeatable), e.g. tune=grain")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUTPUT if it is an earlier megan-fast output (never anything else)")
    p.set_defaults(func=run)


def _output_times(times: list[fractions.Fraction], j: int, rate: int) -> fractions.Fraction:
    """Time of output frame j: input frame j/rate's, or r/rate of the way to the next for an in-between frame."""
    i, r = divmod(j, rate)
    return times[i] + (times[i + 1] - times[i]) * fractions.Fraction(r, rate) if r else times[i]


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from megan_fast import video
    from megan_fast.inference import TooShortError, check_rate, check_rate_value, clip_window

    src = args.input
    if not src or not src.strip():
        raise UsageError("INPUT is empty; give a video file, a folder of frames or - (standard input)")
    checkpoint = DEMO_CHECKPOINT if args.checkpoint is None else args.checkpoint
    fmt = video.output_format(args.output) if args.output else None
    to_pipe = fmt == video.PIPE
    say = functools.partial(print, file=sys.stderr if to_pipe else sys.stdout)  # standard output: the stream only
    out = None if to_pipe else outputs.check_output(
        args.output, "OUTPUT", VIDEO_KIND if fmt else FRAMES_KIND,
        inputs=[("INPUT", None if src == video.PIPE else src), ("--checkpoint", checkpoint)], overwrite=args.overwrite)
    overlap = _common.tile_overlap(args)
    if _common.is_onnx(checkpoint):  # ONNX Runtime runs the file: its providers pick the device
        for option, value, default in (("--device", args.device, None), ("--dtype", args.dtype, "float32"),
                                       ("--compile", args.compile, "none")):
            if value != default:
                raise UsageError(f"{option} applies to PyTorch models; an ONNX --checkpoint runs on its "
                                 "--providers, in the dtype it was exported in")
    if not fmt:
        for option, value in (("--codec", args.codec), ("--crf", args.crf), ("--preset", args.preset),
                              ("--pix-fmt", args.pix_fmt), ("--encoder-option", args.encoder_option)):
            if value is not None and value != []:
                raise UsageError(f"{option} applies to a video OUTPUT; PNG frames are written losslessly (16-bit "
                                 "for inputs of more than 8 bits)")
    device = resolve_device("cpu" if _common.is_onnx(checkpoint) else args.device)
    dtype = compute_dtype(device, args.dtype)
    try:
        check_rate_value(args.rate, "--rate")  # before reading the input; the model is asked once loaded
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    reader = video.FrameReader(src, folder_fps=args.fps)
    info = reader.open_pipe() if src == video.PIPE else video.probe(src, folder_fps=args.fps)
    out_w, out_h = 4 * info.width, 4 * info.height
    encoder = None
    if fmt:
        if fmt in (".mkv", ".webm") and info.fps * args.rate > 1000:
            raise UsageError(f"--rate {args.rate}: {float(info.fps * args.rate):g} fps needs timestamps finer than "
                             f"the millisecond that {fmt} stores; write .mp4 or .mov")
        encoder = video.choose_encoder(fmt, args.codec, args.crf, args.preset, args.pix_fmt, args.encoder_option,
                                       bits=info.bits, source_pix_fmt=info.pix_fmt)
        if to_pipe:
            if info.has_audio:
                warnings.warn(f"{src}: its audio is not written: a YUV4MPEG2 stream holds video only (mux the "
                              "input's audio downstream, e.g. ffmpeg -i - -i INPUT -map 0:v -map 1:a)", stacklevel=1)
        else:
            video.check_video_output(args.output, out_w, out_h, src if info.has_audio else None, encoder)
    model = _common.load_model(checkpoint, device, providers=args.providers, onnx=True)
    try:
        check_rate(model, args.rate, "--rate")
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if info.num_frames is not None:
        try:
            clip_window(model, info.num_frames)
        except TooShortError as exc:
            raise TooShortError(f"{src}: {exc}") from None
    if info.orientation:
        say(f"{src}: the video is shown {info.orientation}; the frames are turned to match")
    if info.dropped_streams:
        warnings.warn(f"{src}: {info.dropped_streams} subtitle, data or further video stream(s) are not copied "
                      "(the first video stream and every audio stream are)", stacklevel=1)
    if device.type == "cpu":
        # Recurrent states of small models decay into denormal floats, which slow CPU arithmetic ~10x.
        torch.set_flush_denormal(True)
    start = time.perf_counter()
    try:
        with contextlib.nullcontext(video.PIPE) if to_pipe else (out.atomic_file() if fmt else out.atomic_folder()) \
                as tmp, tqdm(unit="frame", desc="upscale", disable=None) as bar:
            if fmt:
                writer = video.VideoWriter(tmp, info.fps * args.rate, out_w, out_h,
                                           audio_from=src if info.has_audio and not to_pipe else None,
                                           time_base=info.time_base / args.rate, fmt=fmt, command="upscale",
                                           encoder=encoder, colour=info.colour)
            else:
                writer = video.FrameFolderWriter(tmp, bits=info.bits)
            _upscale(args, model, reader, writer, info, device, dtype, overlap, bar)
    except TooShortError as exc:  # fewer decodable frames than the model needs
        raise TooShortError(f"{src}: {exc}") from None
    except torch.OutOfMemoryError:
        raise UsageError(f"out of memory on {device}; try --tile 128 (or smaller) to process the frames in "
                         "tiles") from None
    except RuntimeError as exc:
        if "can't allocate memory" not in str(exc) and "DefaultCPUAllocator" not in str(exc):
            raise
        raise UsageError("out of memory on the CPU; try --tile 128 (or smaller) to process the frames in "
                         "tiles") from None
    for message in reader.warnings():
        warnings.warn(message, stacklevel=1)
    elapsed = time.perf_counter() - start
    depth = "" if info.bits <= 8 else f", {info.bits}-bit"
    say(f"upscaled {reader.decoded} frames ({info.width}x{info.height}, {float(info.fps):g} fps{depth}) -> "
        f"{writer.count} frames ({out_w}x{out_h}, {float(info.fps * args.rate):g} fps) in {elapsed:.1f} s "
        f"({writer.count / elapsed:.2f} frames/s); wrote {'standard output' if to_pipe else args.output}")
    return 0


def _upscale(args, model, reader, writer, info, device, dtype, overlap, bar) -> None:
    """Decodes ahead of the model and encodes behind it, each in its own thread (megan_fast/background.py)."""
    import torch

    from megan_fast.background import BackgroundWriter, prefetch
    from megan_fast.inference import compile_model, iter_upscale
    from megan_fast.models.config import output_frames

    times: list[fractions.Fraction] = []

    def frames():
        for t, frame in reader:
            times.append(t)
            yield frame

    rate = args.rate
    bar.total = output_frames(info.num_frames, rate - 1) if info.num_frames else None
    feed = prefetch(frames())
    background = BackgroundWriter(writer.write)
    closes = hasattr(writer, "close")  # a video's encoder and container (a frame folder has nothing to close)
    try:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            if args.compile != "none":
                print(f"compiling the model (torch.compile, mode {args.compile}): the first window takes "
                      f"{'minutes on a CPU' if device.type == 'cpu' else 'a minute or more'}", file=sys.stderr)
            net = compile_model(model, args.compile)
            for j, frame in enumerate(iter_upscale(net, feed, tile=args.tile, tile_overlap=overlap, device=device,
                                                   batch=args.batch, fixed_shape=args.compile != "none", rate=rate)):
                outputs.raise_if_signalled()
                background.write(frame, _output_times(times, j, rate))
                bar.update(1)
        background.close()
        if closes:
            writer.close()
    except BaseException:
        background.abort()
        if closes:
            writer.abort()
        raise
    finally:
        feed.close()
