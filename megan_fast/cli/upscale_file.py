"""One input of ``megan-fast upscale``: its checks, then its output in segments (resumable, shared among processes)
or in one pass (pipes, encoders whose segments cannot be joined) (docs/DESIGN.md sections 5 and 8)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fractions
import os
import shutil
import sys
import time
import warnings

from megan_fast import outputs
from megan_fast.cli import _common
from megan_fast.cli._common import compute_dtype
from megan_fast.distributed import World, init_processes
from megan_fast.errors import InputError, OutputError, UsageError
from megan_fast.video import FrameFolderWriter

VIDEO_KIND = outputs.Kind("video file", commands=("upscale",))
FRAMES_KIND = outputs.Kind("folder of PNG frames", folder=True, entries=FrameFolderWriter.NAMES)


@dataclasses.dataclass
class Settings:
    """What every input of one command shares: the arguments, the device, the model (loaded once)."""

    args: argparse.Namespace
    checkpoint: str
    world: World
    device: object
    dtype: object
    overlap: int | None
    _model: object = None
    _model_id: str | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace, checkpoint: str, world: World | None) -> "Settings":
        onnx = _common.is_onnx(checkpoint)
        if onnx:  # ONNX Runtime runs the file: its providers pick the device
            for option, value, default in (("--device", args.device, None), ("--dtype", args.dtype, "float32"),
                                           ("--compile", args.compile, "none")):
                if value != default:
                    raise UsageError(f"{option} applies to PyTorch models; an ONNX --checkpoint runs on its "
                                     "--providers, in the dtype it was exported in")
        overlap = _common.tile_overlap(args)
        if onnx:
            device = _common.resolve_device("cpu")
        else:
            device = _common.resolve_device(args.device) if args.device is not None else None
        if world is None:
            world, found = init_processes(None if device is None else str(device))
            device = device or found
        elif device is None:
            device = init_processes(None)[1]
        return cls(args, checkpoint, world, device, compute_dtype(device, args.dtype), overlap)

    def model(self):
        if self._model is None:
            self._model = _common.load_model(self.checkpoint, self.device, providers=self.args.providers, onnx=True)
        return self._model

    def model_id(self) -> str:
        from megan_fast.jobs import model_identity

        if self._model_id is None:
            self._model_id = model_identity(self.checkpoint)
        return self._model_id

    def say(self, text: str, to_pipe: bool = False) -> None:
        """An informational line (rank 0, not with --quiet; on stderr when standard output is the video)."""
        if self.world.rank == 0 and not self.args.quiet:
            print(text, file=sys.stderr if to_pipe else sys.stdout)


@dataclasses.dataclass
class Result:
    ok: bool
    skipped: bool = False


def upscale_file(st: Settings, src: str, output: str, many: bool, inputs: list[str] = (), index: int = 0) -> Result:
    """Upscales ``src`` into ``output``, checked first; raises :class:`~megan_fast.errors.MeganFastError` (or
    OSError) with one line.  ``many``: one of several inputs (an output megan-fast completed is skipped)."""
    import torch

    from megan_fast import video
    from megan_fast.inference import TooShortError, check_rate, clip_window
    from megan_fast.jobs import SEGMENT_MUXERS

    args = st.args
    fmt = video.output_format(output)
    to_pipe = fmt == video.PIPE
    if st.world.distributed and (to_pipe or src == video.PIPE):
        raise UsageError("- (standard input or output) is one stream: run it in one process, not under torchrun")
    if many and os.path.lexists(output):
        kind = VIDEO_KIND if fmt else FRAMES_KIND
        if kind.foreign(output) is None:
            st.say(f"{output}: already complete (skipped)")
            return Result(True, skipped=True)
    out = None if to_pipe else outputs.check_output(
        output, "OUTPUT", VIDEO_KIND if fmt else FRAMES_KIND,
        inputs=[("INPUT", None if src == video.PIPE else src), ("--checkpoint", st.checkpoint),
                *(("INPUT", s) for s in inputs)], overwrite=args.overwrite)
    if not fmt:
        for option, value in (("--codec", args.codec), ("--crf", args.crf), ("--preset", args.preset),
                              ("--pix-fmt", args.pix_fmt), ("--encoder-option", args.encoder_option)):
            if value is not None and value != []:
                raise UsageError(f"{option} applies to a video OUTPUT; PNG frames are written losslessly (16-bit "
                                 "for inputs of more than 8 bits)")
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
            video.check_video_output(output, out_w, out_h, src if info.has_audio else None, encoder)
    model = st.model()
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
        st.say(f"{src}: the video is shown {info.orientation}; the frames are turned to match", to_pipe)
    if info.dropped_streams and st.world.rank == 0:
        warnings.warn(f"{src}: {info.dropped_streams} subtitle, data or further video stream(s) are not copied "
                      "(the first video stream and every audio stream are)", stacklevel=1)
    if st.device.type == "cpu":
        # Recurrent states of small models decay into denormal floats, which slow CPU arithmetic ~10x.
        torch.set_flush_denormal(True)
    start = time.perf_counter()
    try:
        if to_pipe or src == video.PIPE or args.segment_frames == 0 or (encoder is not None and
                                                                        encoder.codec not in SEGMENT_MUXERS):
            if encoder is not None and not to_pipe and src != video.PIPE and args.segment_frames:
                st.say(f"{output}: {encoder.codec} is written in one pass (its segments cannot be joined): a crash "
                       "loses the work done")
            count = _one_pass(st, reader, info, out, fmt, encoder, src, index) if st.world.mine(index) else 0
        else:
            count = _segmented(st, reader, info, out, fmt, encoder, src, index)
    except TooShortError as exc:  # fewer decodable frames than the model needs
        raise TooShortError(f"{src}: {exc}") from None
    except torch.OutOfMemoryError:
        raise UsageError(f"out of memory on {st.device}; try --tile 128 (or smaller) to process the frames in "
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
    st.say(f"upscaled {reader.decoded} frames ({info.width}x{info.height}, {float(info.fps):g} fps{depth}) -> "
           f"{count} frames ({out_w}x{out_h}, {float(info.fps * args.rate):g} fps) in {elapsed:.1f} s "
           f"({count / max(elapsed, 1e-9):.2f} frames/s); wrote {'standard output' if to_pipe else output}", to_pipe)
    return Result(True)


def _output_time(times: list[fractions.Fraction], j: int, rate: int) -> fractions.Fraction:
    """Time of output frame j: input frame j/rate's, or r/rate of the way to the next for an in-between frame."""
    i, r = divmod(j, rate)
    return times[i] + (times[i + 1] - times[i]) * fractions.Fraction(r, rate) if r else times[i]


def _frames(st: Settings, reader, need=None):
    """(j, output frame or None, the input times so far) of the whole clip, decoding ahead in a thread."""
    import torch

    from megan_fast.background import prefetch
    from megan_fast.inference import compile_model, iter_upscale

    args = st.args
    times: list[fractions.Fraction] = []

    def frames():
        for t, frame in reader:
            times.append(t)
            yield frame

    feed = prefetch(frames())
    try:
        with torch.autocast(st.device.type, dtype=st.dtype, enabled=st.dtype != torch.float32):
            if args.compile != "none":
                print(f"compiling the model (torch.compile, mode {args.compile}): the first window takes "
                      f"{'minutes on a CPU' if st.device.type == 'cpu' else 'a minute or more'}", file=sys.stderr)
            net = compile_model(st.model(), args.compile)
            for j, frame in enumerate(iter_upscale(net, feed, tile=args.tile, tile_overlap=st.overlap,
                                                   device=st.device, batch=args.batch,
                                                   fixed_shape=args.compile != "none", rate=args.rate, need=need)):
                outputs.raise_if_signalled()
                yield j, frame, times
    finally:
        feed.close()


def _bar(st: Settings, total, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, unit="frame", desc=desc, disable=True if st.args.quiet else None, leave=False)


def _one_pass(st: Settings, reader, info, out, fmt, encoder, src, index) -> int:
    """The whole output through one writer: y4m to standard output, a video of an encoder whose segments cannot
    be joined, or from standard input (read once)."""
    from megan_fast import video
    from megan_fast.background import BackgroundWriter

    args = st.args
    to_pipe = fmt == video.PIPE
    target = contextlib.nullcontext(video.PIPE) if to_pipe else (out.atomic_file() if fmt else out.atomic_folder())
    with target as tmp, _bar(st, None, os.path.basename(src)) as bar:
        if fmt:
            writer = video.VideoWriter(tmp, info.fps * args.rate, 4 * info.width, 4 * info.height,
                                       audio_from=src if info.has_audio and not to_pipe else None,
                                       time_base=info.time_base / args.rate, fmt=fmt, command="upscale",
                                       encoder=encoder, colour=info.colour)
        else:
            writer = video.FrameFolderWriter(tmp, bits=info.bits)
        background = BackgroundWriter(writer.write)
        try:
            for j, frame, times in _frames(st, reader):
                background.write(frame, _output_time(times, j, args.rate))
                bar.update(1)
            background.close()
            if fmt:
                writer.close()
        except BaseException:
            background.abort()
            if fmt:
                writer.abort()
            raise
    return writer.count


def _agree(world: World, error: BaseException | None) -> None:
    """Every process learns whether one of them failed; all raise the first failure's one line."""
    messages = world.gather(None if error is None else " ".join(str(error).split()))
    first = next((m for m in messages if m), None)
    if error is not None:
        raise error
    if first is not None:
        raise OutputError(f"another process of the run failed: {first}")


def _segmented(st: Settings, reader, info, out, fmt, encoder, src, index) -> int:
    """The output in segments kept in a work folder (:class:`megan_fast.jobs.Job`): those missing are made (shared
    among the processes), then joined into the output by one of them."""
    from megan_fast import video
    from megan_fast.jobs import SEGMENT_MUXERS, Job, file_identity
    from megan_fast.models.config import output_frames
    args, world = st.args, st.world
    total = output_frames(video.count_frames(src), args.rate - 1)
    settings = {"input": file_identity(src), "model": st.model_id(), "rate": args.rate, "tile": args.tile,
                "tile_overlap": st.overlap, "batch": args.batch, "compile": args.compile, "dtype": str(st.dtype),
                "device": st.device.type, "fps": str(args.fps) if os.path.isdir(src) else None,
                "output": dataclasses.asdict(encoder) if encoder else f"png{16 if info.bits > 8 else 8}"}
    ext = {"mov": ".mov", "mp4": ".mp4", "matroska": ".mkv"}[SEGMENT_MUXERS[encoder.codec]] if encoder else ""
    job = Job(out.path, total, args.segment_frames, settings, "video" if fmt else "frames", ext)
    error = None
    try:
        if world.rank == 0:
            job.open(create=True)
    except (OutputError, OSError) as exc:
        error = exc
    try:
        _agree(world, error)
        return _run_job(st, reader, info, out, fmt, encoder, src, index, job)
    except BaseException as exc:
        if isinstance(exc, OSError) and exc.strerror and str(exc.filename or "").startswith(job.folder + os.sep):
            # The disk refused a file of the work folder: the user knows the output, not that folder's inside.
            exc = OSError(exc.errno, exc.strerror, out.path)
        if job.started():
            exc.add_note(f"the finished segments are kept in {job.folder}: the same command resumes")
        else:
            job.remove_unstarted()
        raise exc


def _run_job(st: Settings, reader, info, out, fmt, encoder, src, index, job) -> int:
    """Makes the segments missing from ``job`` (shared among the processes), then one process joins them."""
    args, world = st.args, st.world
    made = job.open(create=False)
    if made and not args.quiet and world.rank == 0:
        st.say(f"{out.shown}: resuming: {made} of {job.count} segments were made before")
    world.barrier()  # every process has seen which segments exist before any is written
    mine = [k for k in range(job.count) if not job.done(k) and world.mine(index + k)]
    error = None
    try:
        if mine:
            _make_segments(st, reader, info, job, mine, fmt, encoder, src)
    except (InputError, OutputError, OSError) as exc:
        error = exc
    _agree(world, error)
    error, count = None, 0
    try:
        if world.mine(index):
            count = _join(job, out, fmt, src if info.has_audio else None, info.fps * args.rate)
    except (InputError, OutputError, OSError) as exc:
        error = exc
    _agree(world, error)
    return max(world.gather(count))  # the frames the joining process wrote


def _make_segments(st: Settings, reader, info, job, mine: list[int], fmt, encoder, src) -> None:
    """Makes segments ``mine`` of ``job`` in one pass over the clip (the model runs only for their frames)."""
    from megan_fast.background import BackgroundWriter
    from megan_fast.video.writing import _STORED_TIME_BASE

    args = st.args
    wanted = set(mine)
    seg = job.segment_frames
    tb = max(info.time_base / args.rate, _STORED_TIME_BASE.get(encoder.muxer, fractions.Fraction(0))) if encoder \
        else None

    def need(j0: int, j1: int) -> bool:
        return any(k in wanted for k in range(j0 // seg, (j1 - 1) // seg + 1))

    segments = _Segments(job, info, args, encoder, tb)
    last_pts = None
    with _bar(st, sum(min(seg, job.total - k * seg) for k in mine), os.path.basename(src)) as bar:
        background = BackgroundWriter(segments.write)  # encoding beside the model, as in one pass
        try:
            for j, frame, times in _frames(st, reader, need):
                pts = None
                if encoder is not None:  # numbered over the whole output: strictly increasing in the stored base
                    pts = round(_output_time(times, j, args.rate) / tb)
                    pts = pts if last_pts is None else max(pts, last_pts + 1)
                    last_pts = pts
                k = j // seg
                if frame is None or k not in wanted:
                    continue
                background.write(k, frame, pts)
                bar.update(1)
            background.close()
            segments.finish()  # the last segment, or the input ended inside one (a cut file)
        except BaseException as exc:
            background.abort()
            segments.abandon(exc)
            raise
    for k in mine:
        if not job.done(k):  # the input ended before it
            job.mark_empty(k)


class _Segments:
    """The segments being written, one at a time, in order: each a temporary file (or folder) in the work
    folder, renamed when its last frame is written."""

    def __init__(self, job, info, args, encoder, tb) -> None:
        self.job, self.info, self.args, self.encoder, self.tb = job, info, args, encoder, tb
        self.k, self.context, self.writer = None, None, None

    def write(self, k: int, frame, pts) -> None:
        if k != self.k:
            self.finish()
            self._open(k)
        self.writer.write(frame, pts=pts)

    def _open(self, k: int) -> None:
        from megan_fast import video
        from megan_fast.jobs import SEGMENT_MUXERS
        from megan_fast.video.encoders import Encoder

        path = self.job.segment_path(k)
        target = outputs.Output(path, "segment", outputs.Kind("segment", by_name=True, entries=r".*"), True, path)
        context = target.atomic_file() if self.encoder else target.atomic_folder()
        tmp = context.__enter__()
        self.k, self.context, self.writer = k, context, None  # abandon() now removes the temporary
        if self.encoder:
            enc = self.encoder
            self.writer = video.VideoWriter(tmp, self.info.fps * self.args.rate, 4 * self.info.width,
                                            4 * self.info.height, time_base=self.tb, colour=self.info.colour,
                                            encoder=Encoder(SEGMENT_MUXERS[enc.codec], enc.codec, enc.options,
                                                            enc.pix_fmt))
        else:
            self.writer = FrameFolderWriter(tmp, bits=self.info.bits, start=k * self.job.segment_frames)

    def finish(self) -> None:
        """The segment being written is closed and renamed into place."""
        if self.context is None:
            return
        context, self.context = self.context, None
        if hasattr(self.writer, "close"):
            self.writer.close()
        context.__exit__(None, None, None)

    def abandon(self, exc: BaseException) -> None:
        """After a failure (a signal included): the encoder stopped and the temporary removed."""
        if self.context is None:
            return
        context, self.context = self.context, None
        if self.writer is not None and hasattr(self.writer, "abort"):
            self.writer.abort()
        with contextlib.suppress(BaseException):
            context.__exit__(type(exc), exc, exc.__traceback__)


def _join(job, out, fmt, audio_from, fps) -> int:
    """The segments into the output (renamed into place), then the work folder removed; returns its frames."""
    from megan_fast import video

    segments = job.segments()
    if fmt:
        with out.atomic_file() as tmp:
            count = video.join_segments(segments, tmp, fmt, fps, audio_from, command="upscale")
    else:
        count = 0
        with out.atomic_folder() as tmp:
            for folder in segments:
                for name in sorted(os.listdir(folder)):
                    try:  # the work folder lies beside the output: the same file system
                        os.link(os.path.join(folder, name), os.path.join(tmp, name))
                    except OSError:  # one without hard links (FAT, some network shares)
                        shutil.copyfile(os.path.join(folder, name), os.path.join(tmp, name))
                    count += 1
    job.remove()
    return count
