"""``megan-fast upscale INPUT [INPUT ...] OUTPUT``: clips at K x the frame rate (default 2) and 4x the resolution.

Everything is checked before the model runs (each OUTPUT's path and format,
the inputs, the device, the checkpoint, that it can make the rate asked for,
that the container takes the audio and the encoder its settings).  One input
gives OUTPUT; several (or a folder of videos) give one output each in the
OUTPUT folder, a failed input is one line and the others go on, and one
already complete is skipped.  A long output is made in segments kept beside
it (:mod:`megan_fast.jobs`): the same command resumes after a crash, and
under ``torchrun`` the processes share the segments.  Output frame K*i is
shown at input frame i's time and frame K*i + j at j/K of the way to the
next, so a variable frame rate stays in step with the copied audio.
"""

from __future__ import annotations

import argparse
import os
import sys

from megan_fast import outputs
from megan_fast.cli import _common
from megan_fast.cli._common import DEMO_CHECKPOINT, frame_rate, int_at_least
from megan_fast.errors import MeganFastError, UsageError, one_line
from megan_fast.video import parse_option as video_parse_option

# Extensions of the videos a folder of inputs is searched for (frame folders inside it are taken too).
VIDEO_INPUTS = (".mp4", ".mkv", ".mov", ".webm", ".avi", ".m4v", ".mpg", ".mpeg", ".ts", ".mts", ".m2ts", ".wmv",
                ".flv", ".3gp", ".ogv", ".y4m", ".mxf", ".dv", ".nut", ".ivf", ".264", ".h264", ".265", ".hevc")


def add_parser(sub) -> None:
    from megan_fast.inference import COMPILE_MODES
    from megan_fast.video import VIDEO_OUTPUTS

    p = sub.add_parser(
        "upscale",
        help="upscale a video file or frame folder (2x or, with --rate K, Kx frame rate; 4x resolution)",
        description="Reads a video file (any format FFmpeg reads), a folder of frames or y4m on standard input and "
        "writes a video (H.264 in .mp4/.mov/.mkv, VP9 in .webm, or --codec), a folder of PNG frames (an OUTPUT "
        "without an extension) or y4m on standard output, with twice (--rate K: K times) the frame rate and four "
        "times the resolution, carrying the audio over unchanged. Several inputs (or a folder of videos) give one "
        "output each in the OUTPUT folder. A long output is made in segments kept beside it, so that the same "
        "command resumes after a crash; the output is renamed into place when complete.",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="a video file, a folder of frames, a folder of videos (or of frame folders), or - for a "
                   "YUV4MPEG2 stream on standard input")
    p.add_argument("output", metavar="OUTPUT",
                   help=f"a video ({', '.join(VIDEO_OUTPUTS)}), a folder for PNG frames, or - for YUV4MPEG2 on "
                   "standard output; with several inputs or a folder of videos, the folder that gets one output "
                   "per input")
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
    many = p.add_argument_group("many inputs, resume, several processes (torchrun --nproc-per-node N -m megan_fast "
                                "upscale ...)")
    many.add_argument("--container", default=".mp4", help="with several inputs: the outputs' format, .mp4, .mov, "
                      ".mkv, .webm, or png for folders of PNG frames (default .mp4)")
    many.add_argument("--segment-frames", type=int_at_least(0), default=256,
                      help="output frames per segment of a long output, each kept as soon as it is made so that "
                      "the same command resumes after a crash (default 256); 0: one pass, no work folder and no "
                      "resume")
    many.add_argument("--quiet", action="store_true", help="no progress bars or per-file lines (errors still show)")
    p.set_defaults(func=run)


def _inputs(paths: list[str]) -> tuple[list[str], bool]:
    """The inputs (folders of videos expanded, in natural order) and whether there are many (OUTPUT a folder)."""
    from megan_fast.images import list_frames, natural_key

    found, many = [], len(paths) > 1
    for path in paths:
        if not path or not path.strip():
            raise UsageError("INPUT is empty; give a video file, a folder of frames or - (standard input)")
        if path != "-" and os.path.isdir(path) and not list_frames(path):  # a folder of videos (or frame folders)
            entries = sorted(os.listdir(path), key=natural_key)
            inner = [os.path.join(path, n) for n in entries if not n.startswith(".") and (
                (os.path.isfile(os.path.join(path, n)) and n.lower().endswith(VIDEO_INPUTS))
                or (os.path.isdir(os.path.join(path, n)) and list_frames(os.path.join(path, n))))]
            if not inner:
                raise UsageError(f"INPUT {path!r}: a folder with no frames, videos or frame folders in it")
            found += inner
            many = True
        else:
            found.append(path)
    if many and "-" in found:
        raise UsageError("INPUT -: standard input is one input; give it alone")
    return found, many


def _output_name(src: str, container: str) -> str:
    stem = os.path.basename(os.path.normpath(src))
    stem = os.path.splitext(stem)[0] if os.path.isfile(src) else stem
    return stem if container == "png" else stem + container


def run(args: argparse.Namespace) -> int:
    from megan_fast.cli.upscale_file import Settings, upscale_file
    from megan_fast.distributed import init_processes
    from megan_fast.inference import check_rate_value

    sources, many = _inputs(args.inputs)
    output = args.output
    try:
        check_rate_value(args.rate, "--rate")  # before reading anything; the model is asked once loaded
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    checkpoint = DEMO_CHECKPOINT if args.checkpoint is None else args.checkpoint
    if not many:
        settings = Settings.from_args(args, checkpoint, None)
        return 0 if upscale_file(settings, sources[0], output, many=False).ok else 1
    container = args.container.lower()
    if container not in (".mp4", ".mov", ".mkv", ".webm", "png"):
        raise UsageError(f"--container {args.container!r}: expected .mp4, .mov, .mkv, .webm or png")
    if output == "-" or os.path.splitext(output)[1].lower() in (".mp4", ".mov", ".mkv", ".webm"):
        raise UsageError(f"OUTPUT {output!r}: with several inputs OUTPUT is the folder that gets one output each "
                         f"(named after its input, --container {args.container})")
    names = [_output_name(s, container) for s in sources]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UsageError(f"two inputs would both be written to {twice[0]!r} in OUTPUT; rename one of them")
    out_dir = outputs.check_output(output, "OUTPUT", outputs.Kind("folder of outputs", folder=True),
                                   inputs=[("INPUT", s) for s in dict.fromkeys([*args.inputs, *sources]) if s != "-"]
                                   + [("--checkpoint", checkpoint)],
                                   existing="keep", make_parents=False)
    world, _ = init_processes(None if args.device is None else str(args.device))
    if world.rank == 0:
        os.makedirs(out_dir.path, exist_ok=True)
    world.barrier()
    settings = Settings.from_args(args, checkpoint, world)
    done = skipped = 0
    failed = []
    for i, src in enumerate(sources):
        target = os.path.join(output, names[i])
        try:
            result = upscale_file(settings, src, target, many=True, inputs=sources, index=i)
        except (MeganFastError, OSError) as exc:
            text = one_line(exc)
            print(f"megan-fast upscale: error: {text if text.startswith(src) else f'{src}: {text}'}", file=sys.stderr)
            failed.append(src)
            continue
        done += result.ok and not result.skipped
        skipped += result.skipped
    if world.rank == 0 and not args.quiet or failed:
        print(f"{len(sources)} inputs: {done} upscaled, {skipped} already complete (skipped), {len(failed)} failed"
              + (f" ({', '.join(map(os.path.basename, failed))})" if failed else ""), file=sys.stderr)
    return 1 if failed else 0
