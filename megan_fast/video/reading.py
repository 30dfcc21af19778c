"""Reading videos and frame folders: frames as (3, H, W) float32 RGB in [0, 1], as displayed, with their times.

Video files through PyAV; a YUV4MPEG2 stream on standard input (INPUT
``-``: frame rate, size, chroma, bit depth and range from its header);
frame folders through :mod:`megan_fast.images`.  A video's display matrix
(a phone's rotation, flips) is applied to the decoded frames.  Sources of
more than 8 bits (10-, 12-, 16-bit video, 16-bit PNG frames) are read at
full precision (rgb48, never through 8 bits); the YUV to RGB conversion uses
the source's own matrix and range, and :class:`Colour` carries primaries,
transfer, matrix and range to the writer (docs/DESIGN.md section 5).
"""

from __future__ import annotations

import dataclasses
import fractions
import os
import struct
import sys
from typing import Iterator

import torch
from torch import Tensor

from megan_fast.errors import InputError
from megan_fast.images import IMAGE_EXTENSIONS, image_size, list_frames, png_bit_depth, read_image

PIPE = "-"  # INPUT / OUTPUT: standard input / output, YUV4MPEG2


@dataclasses.dataclass(frozen=True)
class Colour:
    """A video's colour description, FFmpeg's codes (2 / 0: unspecified): primaries, transfer, matrix, range."""

    primaries: int = 2
    trc: int = 2
    matrix: int = 2
    range: int = 0

    @classmethod
    def of(cls, frame) -> "Colour":
        return cls(int(frame.color_primaries), int(frame.color_trc), int(frame.colorspace), int(frame.color_range))

    @property
    def specified(self) -> bool:
        return (self.primaries, self.trc, self.matrix, self.range) != (2, 2, 2, 0)


class VideoError(InputError, RuntimeError):
    """An input that cannot be read as a video or frame folder (a ValueError, and a RuntimeError as it used to be)."""


@dataclasses.dataclass
class VideoInfo:
    num_frames: int | None  # frames in a folder, or what a video's container declares (None: not said)
    fps: fractions.Fraction
    width: int  # as displayed (orientation applied)
    height: int
    has_audio: bool
    audio_codec: str | None = None
    orientation: str | None = None  # e.g. "rotated 90 degrees counter-clockwise", None if none
    dropped_streams: int = 0  # subtitle, data and further video streams, which are not copied
    time_base: fractions.Fraction = fractions.Fraction(1, 25)  # of the timestamps FrameReader yields
    bits: int = 8  # bits per sample of the source (8, 10, 12, 16)
    pix_fmt: str | None = None  # a video's pixel format (None: frame folders)
    colour: Colour = Colour()


# --------------------------------------------------------------------------- orientation


@dataclasses.dataclass(frozen=True)
class _Orientation:
    transpose: bool
    flip_x: bool
    flip_y: bool

    def apply(self, frame: Tensor) -> Tensor:
        if self.transpose:
            frame = frame.transpose(-2, -1)
        if self.flip_x:
            frame = frame.flip(-1)
        if self.flip_y:
            frame = frame.flip(-2)
        return frame.contiguous()

    def describe(self) -> str:
        turns = {(True, False, True): "rotated 90 degrees counter-clockwise",
                 (True, True, False): "rotated 90 degrees clockwise",
                 (False, True, True): "rotated 180 degrees",
                 (False, True, False): "mirrored left-right",
                 (False, False, True): "mirrored top-bottom",
                 (True, False, False): "transposed",
                 (True, True, True): "transposed and rotated 180 degrees"}
        return turns[(self.transpose, self.flip_x, self.flip_y)]


def _orientation(frame) -> _Orientation | None:
    """The display matrix of a decoded frame as a transpose and flips (None: none, or not a right angle).

    FFmpeg's matrix maps a source pixel (x, y) (y down) to the displayed
    (a x + c y, b x + d y): with a = d = 0 the picture is transposed.
    """
    for side in frame.side_data:
        if getattr(side.type, "name", str(side.type)) != "DISPLAYMATRIX":
            continue
        m = struct.unpack("<9i", bytes(side)[:36])
        a, b, c, d = m[0], m[1], m[3], m[4]
        if a == 0 and d == 0 and b != 0 and c != 0:
            o = _Orientation(True, c < 0, b < 0)
        elif b == 0 and c == 0 and a != 0 and d != 0:
            o = _Orientation(False, a < 0, d < 0)
        else:
            return None
        return o if (o.transpose or o.flip_x or o.flip_y) else None
    return None


# --------------------------------------------------------------------------- reading


def _folder_info(path: str, folder_fps: float) -> VideoInfo:
    files = list_frames(path)
    if not files:
        raise VideoError(f"{path}: the folder holds no image frames ({', '.join(IMAGE_EXTENSIONS)})")
    size = image_size(files[0])
    for f in files[1:]:
        other = image_size(f)
        if other != size:
            raise VideoError(f"{path}: frame {os.path.basename(f)} is {other[0]}x{other[1]} but "
                             f"{os.path.basename(files[0])} is {size[0]}x{size[1]}; the frames of a clip "
                             "must have one size")
    fps = fractions.Fraction(folder_fps).limit_denominator(1001)
    bits = 16 if png_bit_depth(files[0]) == 16 else 8
    return VideoInfo(len(files), fps, size[0], size[1], False, time_base=1 / fps, bits=bits)


def probe(path: str, folder_fps: float = 25.0) -> VideoInfo:
    """Frame count, rate, displayed size and audio of a video file or frame folder; decodes the first frame.

    Raises:
        VideoError: not found, not a video, no video stream, or its first frame cannot be decoded.
    """
    if path == PIPE:
        raise ValueError("probe('-'): standard input can be read once; use FrameReader('-').open_pipe()")
    if os.path.isdir(path):
        return _folder_info(path, folder_fps)
    if not os.path.isfile(path):
        raise VideoError(f"{path}: no such file or folder")
    import av

    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise VideoError(f"{path}: the file has no video stream")
            stream = container.streams.video[0]
            fps = stream.average_rate or stream.guessed_rate or fractions.Fraction(25)
            audio = container.streams.audio[0] if container.streams.audio else None
            first = next(container.decode(stream), None)
            if first is None:
                raise VideoError(f"{path}: no frame of the video stream can be decoded")
            orient = _orientation(first)
            w, h = (first.height, first.width) if orient and orient.transpose else (first.width, first.height)
            dropped = len(container.streams) - 1 - len(container.streams.audio)
            return VideoInfo(stream.frames or None, fractions.Fraction(fps), w, h, audio is not None,
                             audio.codec_context.name if audio is not None else None,
                             orient.describe() if orient else None, dropped_streams=dropped,
                             time_base=stream.time_base or 1 / fractions.Fraction(fps), bits=_bits(first),
                             pix_fmt=first.format.name, colour=Colour.of(first))
    except av.error.FFmpegError as exc:
        raise VideoError(f"{path}: cannot be read as a video ({exc})") from None


def _stream_duration(stream, container) -> float | None:
    """Seconds the video stream declares: its own duration, Matroska's DURATION tag, or (a file with nothing
    but this stream) the container's; None if unknown (an audio track may outlast the video)."""
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    tag = {k.upper(): v for k, v in stream.metadata.items()}.get("DURATION")
    if tag:
        try:
            h, m, sec = tag.split(":")
            return int(h) * 3600 + int(m) * 60 + float(sec)
        except ValueError:
            pass
    if container.duration and len(container.streams) == 1:
        return container.duration / 1e6
    return None


class FrameReader:
    """Iterates ``(time, frame)`` over a video file or frame folder, in presentation order.

    ``time`` is a :class:`fractions.Fraction` of seconds: the frame's
    presentation timestamp (frame folders: ``i / fps``).  After iteration,
    ``decoded`` is the number of frames read, ``declared`` what the container
    declared (None if it did not say), and :meth:`warnings` says when fewer
    frames were decoded than declared, decoding stopped on an error (the
    frames before it are kept), or timestamps were missing or out of order
    (from there on, frames are timed at the stream's average rate).

    Raises (while iterating):
        VideoError: a frame of another size than the first one (a resolution
            change mid-stream), or an image that cannot be read.
    """

    def __init__(self, path: str, folder_fps: float = 25.0) -> None:
        self.path = path
        self.folder_fps = fractions.Fraction(folder_fps).limit_denominator(1001)
        self.decoded = 0
        self.declared: int | None = None
        self.duration: float | None = None  # seconds the container declares (when it declares no frame count)
        self.start_time: fractions.Fraction | None = None  # of the first decoded frame
        self.last_time: fractions.Fraction | None = None
        self.rate: fractions.Fraction | None = None
        self.error: str | None = None
        self.constant_rate_from: int | None = None  # first frame timed at the average rate
        self._pipe = None  # standard input: (container, stream, its first decoded frame), from open_pipe

    def open_pipe(self) -> VideoInfo:
        """INPUT ``-``: opens the YUV4MPEG2 stream on standard input, decodes its first frame (kept for the
        iteration) and returns what :func:`probe` returns for a file (no audio: y4m has none).

        Raises:
            VideoError: not a y4m stream, or no frame in it.
        """
        import av

        try:
            container = av.open(sys.stdin.buffer, format="yuv4mpegpipe")
            stream = container.streams.video[0]
            first = next(container.decode(stream), None)
        except (av.error.FFmpegError, IndexError, OSError) as exc:
            raise VideoError(f"INPUT -: standard input is not a YUV4MPEG2 stream ({exc}); pipe y4m in, e.g. "
                             "vspipe -c y4m or ffmpeg -f yuv4mpegpipe") from None
        if first is None:
            raise VideoError("INPUT -: the YUV4MPEG2 stream on standard input holds no frame")
        self._pipe = (container, stream, first)
        fps = fractions.Fraction(stream.average_rate or stream.guessed_rate or 25)
        return VideoInfo(None, fps, first.width, first.height, False, time_base=stream.time_base or 1 / fps,
                         bits=_bits(first), pix_fmt=first.format.name, colour=Colour.of(first))

    def _check_size(self, frame: Tensor, size: tuple[int, int] | None) -> tuple[int, int]:
        here = (frame.shape[-1], frame.shape[-2])
        if size is not None and here != size:
            raise VideoError(f"{self.path}: frame {self.decoded} is {here[0]}x{here[1]} but the clip started at "
                             f"{size[0]}x{size[1]}; a resolution change mid-stream is not supported")
        return here

    def __iter__(self) -> Iterator[tuple[fractions.Fraction, Tensor]]:
        if os.path.isdir(self.path):
            files = list_frames(self.path)
            self.declared = len(files)
            size = None
            for i, f in enumerate(files):
                frame = read_image(f)
                size = self._check_size(frame, size)
                self.decoded += 1
                yield fractions.Fraction(i) / self.folder_fps, frame
            return
        yield from self._decode()

    def _decode(self) -> Iterator[tuple[fractions.Fraction, Tensor]]:
        import itertools

        import av

        size = None
        if self._pipe is not None:
            container, stream, first = self._pipe
        else:
            try:
                container = av.open(self.path)
            except av.error.FFmpegError as exc:
                raise VideoError(f"{self.path}: cannot be read as a video ({exc})") from None
            stream, first = container.streams.video[0], None
        with container:
            if first is None:  # (a pipe's decoder is open already: it decoded the first frame)
                stream.thread_type = "AUTO"
            self.declared = stream.frames or None
            rate = stream.average_rate or stream.guessed_rate or fractions.Fraction(25)
            self.rate = fractions.Fraction(rate)
            self.duration = _stream_duration(stream, container)
            start = last = None
            frames = container.decode(stream)
            if first is not None:
                frames = itertools.chain([first], frames)
            while True:
                try:
                    frame = next(frames)
                except StopIteration:
                    break
                except av.error.FFmpegError as exc:
                    self.error = str(exc)
                    break
                tensor = _to_tensor(frame, self.path)
                orient = _orientation(frame)
                if orient is not None:
                    tensor = orient.apply(tensor)
                size = self._check_size(tensor, size)
                t = frame.pts * frame.time_base if frame.pts is not None and frame.time_base else None
                if start is None:
                    start = t if t is not None else fractions.Fraction(0)
                if t is None or (last is not None and t <= last) or self.constant_rate_from is not None:
                    if self.constant_rate_from is None:
                        self.constant_rate_from = self.decoded
                    t = start + fractions.Fraction(self.decoded) / rate
                last = self.last_time = t
                self.start_time = start
                self.decoded += 1
                yield t, tensor

    def warnings(self) -> list[str]:
        """One line per thing the user should know: frames lost (truncated or damaged file), timestamps replaced."""
        out = []
        if self.error is not None:
            out.append(f"{self.path}: decoding stopped after {self.decoded} frames ({self.error}); "
                       "the output covers the frames decoded before it")
        elif self.declared is not None and self.decoded < self.declared:
            out.append(f"{self.path}: decoded {self.decoded} of the {self.declared} frames the file declares "
                       "(truncated or damaged?); the output covers the decoded frames")
        elif self.declared is None and self.duration and self.rate and self.decoded:
            # No frame count (Matroska, WebM): compare the time the decoded frames span with the declared
            # duration (not their number with duration x rate, which a variable frame rate makes wrong).
            expected = round(self.duration * float(self.rate))
            shown = float(self.last_time - self.start_time) + 1 / float(self.rate)
            if shown < 0.9 * self.duration:
                out.append(f"{self.path}: decoded {self.decoded} frames ({shown:.2f} s) of a file that declares "
                           f"{self.duration:.2f} s (about {expected} frames; truncated or damaged?); the output "
                           "covers the decoded frames")
        if self.constant_rate_from:  # 0: the stream has no timestamps at all (raw H.264): nothing to tell
            out.append(f"{self.path}: timestamps missing or out of order from frame {self.constant_rate_from}; "
                       "from there on frames are timed at the stream's average rate")
        return out


def count_frames(path: str) -> int:
    """The frames of a video file (its video packets, counted without decoding) or frame folder."""
    if os.path.isdir(path):
        return len(list_frames(path))
    import av

    try:
        with av.open(path) as container:
            return sum(1 for p in container.demux(container.streams.video[0]) if p.size)
    except (av.error.FFmpegError, IndexError) as exc:
        raise VideoError(f"{path}: cannot be read as a video ({exc})") from None


def read_frames(path: str, folder_fps: float = 25.0) -> Iterator[Tensor]:
    """Yields the frames of a video file or frame folder, decoded one at a time (see :class:`FrameReader`)."""
    for _, frame in FrameReader(path, folder_fps):
        yield frame


def _bits(frame) -> int:
    """Bits per sample of a decoded frame's pixel format (8 for anything FFmpeg does not say)."""
    try:
        return max(int(c.bits) for c in frame.format.components) or 8
    except (AttributeError, ValueError):
        return 8


def _to_tensor(frame, path: str) -> Tensor:
    """A decoded frame as (3, H, W) float32 RGB in [0, 1]: through 16-bit RGB for sources of more than 8 bits,
    with the frame's own matrix and range (swscale's default would take limited-range BT.601)."""
    import av

    deep = _bits(frame) > 8
    try:
        rgb = frame.to_ndarray(format="rgb48le" if deep else "rgb24",
                               src_color_range=int(frame.color_range) or None)
    except (ValueError, av.error.FFmpegError) as exc:
        raise VideoError(f"{path}: cannot convert pixel format {frame.format.name!r} to RGB ({exc})") from None
    return torch.from_numpy(rgb.astype("float32")).permute(2, 0, 1).div_(65535 if deep else 255)
