"""Writing videos, YUV4MPEG2 to standard output, and frame folders (docs/DESIGN.md section 5).

A video goes to a path the caller got from :mod:`megan_fast.outputs` (a
temporary renamed into place on success); OUTPUT ``-`` writes a YUV4MPEG2
stream to standard output, nothing else.  Frames are written in the
encoder's pixel format (:mod:`megan_fast.video.encoders`) at the input's bit
depth, converted from RGB with the input's matrix and range and tagged with
its primaries, transfer, matrix and range: coded values (HDR's PQ or HLG
included) pass through as the network saw them.
:func:`check_video_output` tries the container, encoder and audio copy on
an in-memory file before any work.
"""

from __future__ import annotations

import fractions
import io
import os
import sys

from torch import Tensor

from megan_fast.errors import OutputError, UsageError
from megan_fast.images import IMAGE_EXTENSIONS, to_uint8, to_uint16
from megan_fast.video.encoders import VIDEO_OUTPUTS, Encoder, choose_encoder, containers_for
from megan_fast.video.reading import PIPE, Colour

# Media extensions that are not written (an OUTPUT with one of these is refused, not taken for a folder name).
UNSUPPORTED_OUTPUTS = (".avi", ".gif", ".apng", ".flv", ".f4v", ".wmv", ".asf", ".ts", ".mts", ".m2ts", ".m4v",
                       ".mpg", ".mpeg", ".m2v", ".vob", ".3gp", ".3g2", ".ogv", ".ogg", ".mxf", ".y4m", ".qt", ".rm",
                       ".rmvb", ".divx", ".dv", ".nut", ".mjpeg", ".h264", ".264", ".h265", ".265", ".hevc", ".ivf",
                       ".mp3", ".wav", ".m4a", ".aac", ".flac", ".opus", ".wma", ".ac3") + IMAGE_EXTENSIONS
# The coarsest time base a muxer stores timestamps in, where it rescales whatever it is given.
_STORED_TIME_BASE = {"matroska": fractions.Fraction(1, 1000), "webm": fractions.Fraction(1, 1000)}


def output_format(path: str) -> str | None:
    """The output's kind: its extension if it is a video :func:`check_video_output` can write, ``"-"`` for
    standard output (YUV4MPEG2), None for a frame folder.

    Raises:
        OutputError: a media extension that is not written (.avi, .gif, images, ...).
    """
    if path == PIPE:
        return PIPE
    ext = os.path.splitext(path)[1].lower()
    if ext in VIDEO_OUTPUTS:
        return ext
    if ext in UNSUPPORTED_OUTPUTS:
        raise OutputError(f"OUTPUT {path!r}: {ext} is not written; use a video ending in "
                          f"{', '.join(VIDEO_OUTPUTS)}, - (YUV4MPEG2 to standard output), or a folder path "
                          "(without an extension) for PNG frames")
    return None


def _audio_stream(container):
    return container.streams.audio[0] if container.streams.audio else None


class VideoWriter:
    """Encodes frames into ``path`` (``"-"``: YUV4MPEG2 to standard output), copying audio into files.

    Frames are written at the times given (the input's timestamps; None: a
    constant ``fps``; y4m stores the rate only).  The audio of
    ``audio_from`` is copied packet for packet, interleaved with the video as
    it is written.  The container's comment carries megan-fast's mark.
    Call :meth:`close` when done (or :meth:`abort` to drop the encoder state
    after an error).

    Args:
        encoder: what writes the frames (default: the container's default, :func:`choose_encoder`).
        colour: the input's colour description, carried to the output (the RGB -> YUV conversion uses its
            matrix and range).
    """

    def __init__(self, path, fps: fractions.Fraction, width: int, height: int,
                 audio_from: str | None = None, time_base: fractions.Fraction | None = None,
                 fmt: str | None = None, command: str | None = None, encoder: Encoder | None = None,
                 colour: Colour | None = None) -> None:
        import av

        from megan_fast.outputs import written_by

        fmt = fmt or (PIPE if path == PIPE else os.path.splitext(path)[1].lower())
        self.encoder = encoder or choose_encoder(fmt)
        self.colour = colour or Colour()
        self.fps = fractions.Fraction(fps)
        # Timestamps are made strictly increasing in the time base the container stores (Matroska and WebM:
        # milliseconds), so frames closer than that are moved apart rather than given one timestamp.
        self.time_base = max(time_base or 1 / self.fps,
                             _STORED_TIME_BASE.get(self.encoder.muxer, fractions.Fraction(0)))
        if self.encoder.codec == "libsvtav1":
            os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1 logs its configuration to stderr unless told: errors only
        target = sys.stdout.buffer if path == PIPE else path
        # YUV4MPEG2 of more than 8 bits (C420p10, ...) is an extension FFmpeg writes only when told it may.
        options = {"strict": "-1"} if self.encoder.muxer == "yuv4mpegpipe" else {}
        self.container = av.open(target, mode="w", format=self.encoder.muxer, options=options)
        self.audio = None
        try:
            if path != PIPE:
                self.container.metadata["comment"] = written_by(command)
            self.stream = self.container.add_stream(self.encoder.codec, rate=self.fps)
            self.stream.width, self.stream.height = width, height
            self.stream.pix_fmt = self.encoder.pix_fmt
            self.stream.codec_context.time_base = self.time_base
            self.stream.time_base = self.time_base
            self.stream.options = dict(self.encoder.options)
            if self.colour.specified:
                cc = self.stream.codec_context
                cc.color_primaries, cc.color_trc = self.colour.primaries, self.colour.trc
                cc.colorspace, cc.color_range = self.colour.matrix, self.colour.range
            # Every stream must exist before the first packet is written.
            self.audio = _AudioCopy(self.container, audio_from)
            self.audio.add_streams()
        except BaseException:
            self.abort()
            raise
        self.count = 0
        self._last_pts = None

    def _video_frame(self, frame: Tensor):
        """The RGB frame as the encoder's pixel format: 8-bit RGB for 8-bit outputs (today's path), 16-bit RGB
        for deeper ones; converted with the input's matrix and range where it has them."""
        import av

        if self.encoder.bits > 8:
            vf = av.VideoFrame.from_ndarray(to_uint16(frame), format="rgb48le")
        else:
            vf = av.VideoFrame.from_ndarray(to_uint8(frame), format="rgb24")
        if not self.colour.specified:
            return vf  # the encoder converts as it always did
        return vf.reformat(format=self.encoder.pix_fmt, dst_colorspace=self.colour.matrix if self.colour.matrix != 2
                           else None, dst_color_range=self.colour.range or None,
                           dst_color_trc=self.colour.trc, dst_color_primaries=self.colour.primaries)

    def write(self, frame: Tensor, time: fractions.Fraction | None = None, pts: int | None = None) -> None:
        """Encodes a frame shown at ``time`` (None: at the constant rate), or at ``pts`` in :attr:`time_base`
        when the caller numbers the frames itself (segments of one output)."""
        vf = self._video_frame(frame)
        if pts is None:
            pts = round(time / self.time_base) if time is not None else round(self.count / self.fps / self.time_base)
            if self._last_pts is not None and pts <= self._last_pts:
                pts = self._last_pts + 1
        vf.pts, vf.time_base = pts, self.time_base
        self._last_pts = pts
        self.audio.until(float(pts * self.time_base))
        for packet in self.stream.encode(vf):
            self.container.mux(packet)
        self.count += 1

    def close(self) -> None:
        for packet in self.stream.encode():
            self.container.mux(packet)
        self.audio.until(None)
        self.container.close()
        self.audio.close()

    def abort(self) -> None:
        try:
            self.container.close()
        except Exception:  # the container may be unusable after an error
            pass
        if getattr(self, "audio", None) is not None:
            self.audio.close()


def try_encoder(encoder: Encoder, audio_from: str | None = None, width: int = 64, height: int = 64) -> str | None:
    """None if one frame (and the first audio packets) of ``encoder`` write into its container in memory, else
    FFmpeg's reason; where a container refuses a codec, it refuses when the header is written."""
    import av
    import torch

    writer = None
    try:
        writer = VideoWriter(io.BytesIO(), fractions.Fraction(25), width, height, audio_from,  # type: ignore[arg-type]
                             fmt=_ext_of(encoder.muxer), encoder=encoder)
        writer.write(torch.zeros(3, height, width))
        for packet in writer.stream.encode():
            writer.container.mux(packet)
        writer.audio.until(0.1)
    except (av.error.FFmpegError, ValueError) as exc:
        return str(exc)
    finally:
        if writer is not None:
            writer.abort()
    return None


def _ext_of(muxer: str) -> str:
    return next(ext for ext, (m, _, _) in VIDEO_OUTPUTS.items() if m == muxer)


def check_video_output(path: str, width: int, height: int, audio_from: str | None,
                       encoder: Encoder | None = None) -> None:
    """Tries the container, encoder and audio copy of a video OUTPUT on an in-memory file, before any work.

    Raises:
        OutputError: the container refuses the encoder or its pixel format (saying which containers take it),
            the frame size, or the input's audio unchanged.
    """
    import av

    ext = os.path.splitext(path)[1].lower()
    encoder = encoder or choose_encoder(ext)
    if encoder.pix_fmt.startswith(("yuv420", "yuvj420", "nv12", "p010")) and (width % 2 or height % 2):
        raise OutputError(f"OUTPUT {path!r}: {width}x{height} frames cannot be encoded in 4:2:0 (odd size)")
    reason = try_encoder(encoder)
    if reason is not None and "avcodec_open2" in reason:  # the encoder itself refuses its settings
        shown = ", ".join(f"{k} {v!r}" for k, v in encoder.options.items())
        raise UsageError(f"--codec {encoder.codec}: the encoder refuses these settings ({encoder.pix_fmt}"
                         f"{', ' + shown if shown else ''}): FFmpeg says {reason.split(':')[0]}; check --preset, "
                         "--pix-fmt and --encoder-option")
    if reason is not None:
        elsewhere = containers_for(encoder.codec, encoder.pix_fmt, ext)
        where = f"; it can go into {', '.join(elsewhere)}" if elsewhere else ""
        raise UsageError(f"OUTPUT {path!r}: {ext} cannot hold {encoder.codec} ({encoder.pix_fmt}) ({reason})"
                         f"{where}")
    if audio_from is None:
        return
    reason = try_encoder(encoder, audio_from)
    if reason is not None:
        with av.open(audio_from) as src:
            a = _audio_stream(src)
            what = f"the input's {a.codec_context.name} audio" if a is not None else "this output"
        raise OutputError(f"OUTPUT {path!r}: {what} cannot be stored in {ext} ({reason}); "
                          "use .mkv, which holds any audio")


class FrameFolderWriter:
    """Writes marked PNG frames ``000000.png``, ``000001.png``, ... into ``folder`` (a temporary of the caller's):
    8-bit, or 16-bit for inputs of more than 8 bits (``bits``); ``start``: the first frame's number."""

    NAMES = r"\d{6}\.png"

    def __init__(self, folder: str, bits: int = 8, start: int = 0) -> None:
        self.folder = folder
        self.bits = 16 if bits > 8 else 8
        self.start = start
        self.count = 0

    def write(self, frame: Tensor, time: fractions.Fraction | None = None, pts: int | None = None) -> None:
        from megan_fast.images import save_png, save_png16

        name = f"{self.start + self.count:06d}.png"
        (save_png16 if self.bits == 16 else save_png)(frame, os.path.join(self.folder, name))
        self.count += 1


def join_segments(segments: list[str], path: str, fmt: str, fps: fractions.Fraction, audio_from: str | None = None,
                  command: str | None = None) -> int:
    """Writes the video of ``segments`` (files of one encoder, frames numbered in one time base) into ``path``
    (a video of extension ``fmt``, declaring the frame rate ``fps``), packet for packet, with the audio of ``audio_from`` interleaved as
    :class:`VideoWriter` does; returns the frames written.  Nothing is encoded again: the output decodes as
    the segments do."""
    import av

    from megan_fast.outputs import written_by

    muxer = VIDEO_OUTPUTS[fmt][0]
    container = av.open(path, mode="w", format=muxer)
    audio = _AudioCopy(container, audio_from)
    count = 0
    try:
        container.metadata["comment"] = written_by(command)
        with av.open(segments[0]) as first:
            stream = container.add_stream_from_template(first.streams.video[0])
        stream.codec_context.framerate = fractions.Fraction(fps)  # what the muxer declares (Matroska's duration)
        audio.add_streams()
        for segment in segments:
            with av.open(segment) as src:
                for packet in src.demux(src.streams.video[0]):
                    if packet.size == 0:  # the demuxer's end-of-stream marker
                        continue
                    if packet.pts is not None:
                        audio.until(float(packet.pts * packet.time_base))
                    packet.stream = stream
                    container.mux(packet)
                    count += 1
        audio.until(None)
        container.close()
    except BaseException:
        audio.close()
        try:
            container.close()
        except Exception:  # the container may be unusable after an error
            pass
        raise
    audio.close()
    return count


class _AudioCopy:
    """The audio streams of ``source`` copied packet for packet into ``container``, up to a time at a call."""

    def __init__(self, container, source: str | None) -> None:
        self.container, self.source, self.streams, self.src, self.pending = container, source, {}, None, None

    def add_streams(self) -> None:
        import av

        if self.source is None:
            return
        self.src = av.open(self.source)
        sources = list(self.src.streams.audio)
        for s in sources:
            self.streams[s.index] = self.container.add_stream_from_template(s)
        self.packets = self.src.demux(*sources) if sources else iter(())

    def until(self, seconds: float | None) -> None:
        while self.streams:
            packet = self.pending or next(self.packets, None)
            self.pending = None
            if packet is None:
                self.streams = {}
                return
            if packet.dts is None:
                continue
            if seconds is not None and packet.pts is not None and float(packet.pts * packet.time_base) > seconds:
                self.pending = packet
                return
            packet.stream = self.streams[packet.stream.index]
            self.container.mux(packet)

    def close(self) -> None:
        if self.src is not None:
            self.src.close()
