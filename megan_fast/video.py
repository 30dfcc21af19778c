"""Video and frame-folder I/O for ``megan-fast upscale`` (PyAV for video files, :mod:`megan_fast.images` for frames).

Frames are (3, H, W) float32 RGB tensors in [0, 1], as displayed: a video's
display matrix (a phone's rotation, flips) is applied to the decoded frames,
and the EXIF orientation of image files too.

Reading (:class:`FrameReader`) yields each frame with its presentation time,
so that the writer can follow the input's timestamps (variable frame rate
stays in step with the copied audio), and counts what it decoded: a file that
declares more frames than it holds (a cut download) is reported, not hidden.

Writing (:class:`VideoWriter`, :class:`FrameFolderWriter`) goes to a path the
caller got from :mod:`megan_fast.outputs` (a temporary renamed into place on
success); :func:`check_video_output` tries the container, codec and audio
copy on an in-memory file before any work.
"""

from __future__ import annotations

import dataclasses
import fractions
import io
import os
import struct
from typing import Iterator

import torch
from torch import Tensor

from megan_fast.errors import InputError, OutputError
from megan_fast.images import IMAGE_EXTENSIONS, image_size, list_frames, read_image, to_uint8

# Output extension -> (FFmpeg muxer, video encoder, encoder options).
VIDEO_OUTPUTS: dict[str, tuple[str, str, dict[str, str]]] = {
    ".mp4": ("mp4", "libx264", {"crf": "18"}),
    ".mov": ("mov", "libx264", {"crf": "18"}),
    ".mkv": ("matroska", "libx264", {"crf": "18"}),
    ".webm": ("webm", "libvpx-vp9", {"crf": "20", "b": "0", "row-mt": "1", "cpu-used": "4"}),
}
# Media extensions that are not written (an OUTPUT with one of these is refused, not taken for a folder name).
UNSUPPORTED_OUTPUTS = (".avi", ".gif", ".apng", ".flv", ".f4v", ".wmv", ".asf", ".ts", ".mts", ".m2ts", ".m4v",
                       ".mpg", ".mpeg", ".m2v", ".vob", ".3gp", ".3g2", ".ogv", ".ogg", ".mxf", ".y4m", ".qt", ".rm",
                       ".rmvb", ".divx", ".dv", ".nut", ".mjpeg", ".h264", ".264", ".h265", ".265", ".hevc", ".ivf",
                       ".mp3", ".wav", ".m4a", ".aac", ".flac", ".opus", ".wma", ".ac3") + IMAGE_EXTENSIONS


# The coarsest time base a muxer stores timestamps in, where it rescales whatever it is given.
_STORED_TIME_BASE = {"matroska": fractions.Fraction(1, 1000), "webm": fractions.Fraction(1, 1000)}


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
    return VideoInfo(len(files), fps, size[0], size[1], False, time_base=1 / fps)


def probe(path: str, folder_fps: float = 25.0) -> VideoInfo:
    """Frame count, rate, displayed size and audio of a video file or frame folder; decodes the first frame.

    Raises:
        VideoError: not found, not a video, no video stream, or its first frame cannot be decoded.
    """
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
                             time_base=stream.time_base or 1 / fractions.Fraction(fps))
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
        import av

        size = None
        try:
            container = av.open(self.path)
        except av.error.FFmpegError as exc:
            raise VideoError(f"{self.path}: cannot be read as a video ({exc})") from None
        with container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            self.declared = stream.frames or None
            rate = stream.average_rate or stream.guessed_rate or fractions.Fraction(25)
            self.rate = fractions.Fraction(rate)
            self.duration = _stream_duration(stream, container)
            start = last = None
            frames = container.decode(stream)
            while True:
                try:
                    frame = next(frames)
                except StopIteration:
                    break
                except av.error.FFmpegError as exc:
                    self.error = str(exc)
                    break
                try:
                    rgb = frame.to_ndarray(format="rgb24")
                except (ValueError, av.error.FFmpegError) as exc:
                    raise VideoError(f"{self.path}: cannot convert pixel format {frame.format.name!r} to RGB "
                                     f"({exc})") from None
                orient = _orientation(frame)
                tensor = torch.from_numpy(rgb).permute(2, 0, 1).float().div_(255)
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
            # No frame count (Matroska, WebM): compare with the declared duration instead.
            expected = round(self.duration * float(self.rate))
            shown = float(self.last_time - self.start_time) + 1 / float(self.rate)
            if self.decoded < 0.9 * expected or shown < 0.9 * self.duration:
                out.append(f"{self.path}: decoded {self.decoded} frames ({shown:.2f} s) of a file that declares "
                           f"{self.duration:.2f} s (about {expected} frames; truncated or damaged?); the output "
                           "covers the decoded frames")
        if self.constant_rate_from:  # 0: the stream has no timestamps at all (raw H.264): nothing to tell
            out.append(f"{self.path}: timestamps missing or out of order from frame {self.constant_rate_from}; "
                       "from there on frames are timed at the stream's average rate")
        return out


def read_frames(path: str, folder_fps: float = 25.0) -> Iterator[Tensor]:
    """Yields the frames of a video file or frame folder, decoded one at a time (see :class:`FrameReader`)."""
    for _, frame in FrameReader(path, folder_fps):
        yield frame


# --------------------------------------------------------------------------- writing


def output_format(path: str) -> str | None:
    """The output's extension if it is a video :func:`check_video_output` can write, None for a frame folder.

    Raises:
        OutputError: a media extension that is not written (.avi, .gif, images, ...).
    """
    ext = os.path.splitext(path)[1].lower()
    if ext in VIDEO_OUTPUTS:
        return ext
    if ext in UNSUPPORTED_OUTPUTS:
        raise OutputError(f"OUTPUT {path!r}: {ext} is not written; use a video ending in "
                          f"{', '.join(VIDEO_OUTPUTS)}, or a folder path (without an extension) for PNG frames")
    return None


def _audio_stream(container):
    return container.streams.audio[0] if container.streams.audio else None


class VideoWriter:
    """Encodes frames into ``path`` (its extension picks the format, :data:`VIDEO_OUTPUTS`), copying audio.

    Frames are written at the times given (the input's timestamps; None: a
    constant ``fps``).  The audio of ``audio_from`` is copied packet for
    packet, interleaved with the video as it is written.  The container's
    comment carries megan-fast's mark.  Call :meth:`close` when done (or
    :meth:`abort` to drop the file's encoder state after an error).
    """

    def __init__(self, path: str, fps: fractions.Fraction, width: int, height: int,
                 audio_from: str | None = None, time_base: fractions.Fraction | None = None,
                 fmt: str | None = None, command: str | None = None) -> None:
        import av

        from megan_fast.outputs import written_by

        muxer, codec, options = VIDEO_OUTPUTS[fmt or os.path.splitext(path)[1].lower()]
        self.fps = fractions.Fraction(fps)
        # Timestamps are made strictly increasing in the time base the container stores (Matroska and WebM:
        # milliseconds), so frames closer than that are moved apart rather than given one timestamp.
        self.time_base = max(time_base or 1 / self.fps, _STORED_TIME_BASE.get(muxer, fractions.Fraction(0)))
        self.container = av.open(path, mode="w", format=muxer)
        self._audio_src = None
        try:
            self.container.metadata["comment"] = written_by(command)
            self.stream = self.container.add_stream(codec, rate=self.fps)
            self.stream.width, self.stream.height = width, height
            self.stream.pix_fmt = "yuv420p"
            self.stream.codec_context.time_base = self.time_base
            self.stream.time_base = self.time_base
            self.stream.options = dict(options)
            # Every stream must exist before the first packet is written.
            self.out_audio: dict[int, object] = {}  # input stream index -> output stream
            if audio_from is not None:
                self._audio_src = av.open(audio_from)
                sources = list(self._audio_src.streams.audio)
                for src in sources:
                    self.out_audio[src.index] = self.container.add_stream_from_template(src)
                if sources:
                    self._audio_packets = self._audio_src.demux(*sources)
                    self._pending = None
        except BaseException:
            self.abort()
            raise
        self.count = 0
        self._last_pts = None

    def _mux_audio(self, until: float | None) -> None:
        """Copies audio packets (of every audio stream, in file order) up to ``until`` seconds (None: the rest)."""
        if not self.out_audio:
            return
        while True:
            packet = self._pending
            if packet is None:
                packet = next(self._audio_packets, None)
                if packet is None:
                    self.out_audio = {}
                    return
            if packet.dts is None:  # the demuxer's end-of-stream marker
                self._pending = None
                continue
            if until is not None and packet.pts is not None and float(packet.pts * packet.time_base) > until:
                self._pending = packet
                return
            self._pending = None
            packet.stream = self.out_audio[packet.stream.index]
            self.container.mux(packet)

    def write(self, frame: Tensor, time: fractions.Fraction | None = None) -> None:
        import av

        vf = av.VideoFrame.from_ndarray(to_uint8(frame), format="rgb24")
        pts = round(time / self.time_base) if time is not None else round(self.count / self.fps / self.time_base)
        if self._last_pts is not None and pts <= self._last_pts:
            pts = self._last_pts + 1
        vf.pts, vf.time_base = pts, self.time_base
        self._last_pts = pts
        self._mux_audio(float(pts * self.time_base))
        for packet in self.stream.encode(vf):
            self.container.mux(packet)
        self.count += 1

    def close(self) -> None:
        for packet in self.stream.encode():
            self.container.mux(packet)
        self._mux_audio(None)
        self.container.close()
        if self._audio_src is not None:
            self._audio_src.close()

    def abort(self) -> None:
        for c in (self.container, self._audio_src):
            try:
                if c is not None:
                    c.close()
            except Exception:  # the container may be unusable after an error
                pass


def check_video_output(path: str, width: int, height: int, audio_from: str | None) -> None:
    """Tries the container, encoder and audio copy of a video OUTPUT on an in-memory file, before any work.

    Raises:
        OutputError: the encoder is not in this PyAV build, or the input's
            audio cannot be stored in this container unchanged.
    """
    import av

    ext = os.path.splitext(path)[1].lower()
    muxer, codec, _ = VIDEO_OUTPUTS[ext]
    if codec not in av.codecs_available:
        raise OutputError(f"OUTPUT {path!r}: this PyAV build has no {codec} encoder for {ext}; use .mp4 or .mkv")
    if width % 2 or height % 2:
        raise OutputError(f"OUTPUT {path!r}: {width}x{height} frames cannot be encoded in 4:2:0 (odd size)")
    audio_codec = None
    writer = None
    try:
        writer = VideoWriter(io.BytesIO(), fractions.Fraction(25), 64, 64, audio_from, fmt=ext)  # type: ignore[arg-type]
        if writer.out_audio:
            audio_codec = ", ".join(sorted({a.codec_context.name for a in writer.out_audio.values()}))
        # One frame and the first audio packets write the header, where a container refuses a codec.
        writer.write(torch.zeros(3, 64, 64))
        for packet in writer.stream.encode():
            writer.container.mux(packet)
        writer._mux_audio(0.1)
    except (av.error.FFmpegError, ValueError) as exc:
        what = f"the input's {audio_codec} audio" if audio_codec else "this output"
        if audio_from is not None and audio_codec is None:
            with av.open(audio_from) as src:
                a = _audio_stream(src)
                what = f"the input's {a.codec_context.name} audio" if a is not None else what
        raise OutputError(f"OUTPUT {path!r}: {what} cannot be stored in {ext} ({exc}); "
                          "use .mkv, which holds any audio") from None
    finally:
        if writer is not None:
            writer.abort()


class FrameFolderWriter:
    """Writes marked PNG frames ``000000.png``, ``000001.png``, ... into ``folder`` (a temporary of the caller's)."""

    NAMES = r"\d{6}\.png"

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.count = 0

    def write(self, frame: Tensor, time: fractions.Fraction | None = None) -> None:
        from megan_fast.images import save_png

        save_png(frame, os.path.join(self.folder, f"{self.count:06d}.png"))
        self.count += 1
