"""Which encoder writes an output: the container's default, or the user's ``--codec``, ``--crf``, ``--preset``,
``--pix-fmt`` and ``--encoder-option`` (docs/DESIGN.md section 5).

Every choice is checked here against this PyAV build (the encoder exists,
takes the pixel format and a quality setting), and then on an in-memory file
against the container (:func:`megan_fast.video.writing.check_video_output`),
before any work: one line naming what is refused and what would work.
"""

from __future__ import annotations

import dataclasses

from megan_fast.errors import UsageError

# Output extension -> (FFmpeg muxer, default video encoder, its options): today's defaults, 8-bit 4:2:0.
VIDEO_OUTPUTS: dict[str, tuple[str, str, dict[str, str]]] = {
    ".mp4": ("mp4", "libx264", {"crf": "18"}),
    ".mov": ("mov", "libx264", {"crf": "18"}),
    ".mkv": ("matroska", "libx264", {"crf": "18"}),
    ".webm": ("webm", "libvpx-vp9", {"crf": "20", "b": "0", "row-mt": "1", "cpu-used": "4"}),
}
PIPE_OUTPUT = ("yuv4mpegpipe", "wrapped_avframe")  # OUTPUT "-": uncompressed frames in a YUV4MPEG2 stream

# The option that sets a constant quality, per encoder (--crf); encoders not listed have none (lossless ones).
QUALITY_OPTION = {"libx264": "crf", "libx265": "crf", "libsvtav1": "crf", "libvpx-vp9": "crf", "libvpx": "crf",
                  "libaom-av1": "crf", "h264_nvenc": "cq", "hevc_nvenc": "cq", "av1_nvenc": "cq"}
# Options that keep an encoder from writing its own log to the terminal (stderr is the command's).
_QUIET = {"libx265": {"x265-params": "log-level=error"}}  # (SVT-AV1 reads SVT_LOG: writing.VideoWriter)
# Encoders a user is likely to ask for, named when one is not in this build.
KNOWN = ("libx264", "libx265", "libsvtav1", "libvpx-vp9", "ffv1", "prores_ks", "h264_nvenc", "hevc_nvenc",
         "av1_nvenc")


@dataclasses.dataclass(frozen=True)
class Encoder:
    """A video output's muxer, encoder, its options and the pixel format it writes."""

    muxer: str
    codec: str
    options: dict[str, str]
    pix_fmt: str

    @property
    def bits(self) -> int:
        """Bits per sample of the pixel format."""
        import av

        return max(c.bits for c in av.VideoFormat(self.pix_fmt).components)


def _formats(codec: str) -> list[str]:
    import av

    formats = av.Codec(codec, "w").video_formats or []
    return [f.name for f in formats]


def _default_pix_fmt(codec: str, bits: int, source: str | None) -> str:
    """The pixel format an output gets without --pix-fmt: 8-bit 4:2:0 for 8-bit sources (today's), else the
    source's own format or a 4:2:0 / 4:2:2 / 4:4:4 one of its depth, whichever the encoder takes first."""
    formats = _formats(codec)
    wanted = ["yuv420p"] if bits <= 8 else [source] + [f"yuv42{c}p{bits}le" for c in "024"]
    for name in wanted:
        if name and name in formats:
            return name
    if bits <= 8 and formats:  # e.g. prores_ks: no 8-bit format at all
        return formats[0]
    deep = [f for f in formats if f"p{bits}" in f or (bits > 8 and f.endswith(("10le", "12le", "16le")))]
    if deep:
        return deep[0]
    raise UsageError(f"--codec {codec} cannot store {bits}-bit video (it takes {', '.join(formats) or 'nothing'}); "
                     "choose --codec libx265, libsvtav1 or ffv1, or an 8-bit --pix-fmt")


def choose_encoder(fmt: str, codec: str | None = None, crf: float | None = None, preset: str | None = None,
                   pix_fmt: str | None = None, options: list[tuple[str, str]] = (), bits: int = 8,
                   source_pix_fmt: str | None = None) -> Encoder:
    """The encoder of an output with extension ``fmt`` (``"-"``: the YUV4MPEG2 pipe), from the user's choices.

    Args:
        fmt: ".mp4", ".mov", ".mkv", ".webm" or "-".
        codec, crf, preset, pix_fmt, options: ``--codec``, ``--crf``, ``--preset``, ``--pix-fmt``,
            ``--encoder-option KEY=VALUE`` (None / empty: the defaults).
        bits, source_pix_fmt: the input's bits per sample and pixel format (the output keeps its depth).

    Raises:
        UsageError: an encoder this build lacks, a pixel format it does not take, --crf for an encoder without
            a quality setting, or an encoder option for the pipe.
    """
    import av

    if fmt == "-":
        if codec or crf is not None or preset or options:
            raise UsageError("OUTPUT -: standard output carries uncompressed YUV4MPEG2 frames; --codec, --crf, "
                             "--preset and --encoder-option belong to the encoder downstream (ffmpeg -i - ...)")
        depth = next(d for d in (8, 10, 12, 16) if bits <= d or d == 16)
        return Encoder(*PIPE_OUTPUT, {}, pix_fmt or ("yuv420p" if depth == 8 else f"yuv420p{depth}le"))
    muxer, default_codec, default_options = VIDEO_OUTPUTS[fmt]
    chosen = codec or default_codec
    if chosen not in av.codecs_available or not _is_video_encoder(chosen):
        have = [c for c in KNOWN if c in av.codecs_available and _is_video_encoder(c)]
        raise UsageError(f"--codec {chosen}: not a video encoder of this PyAV build; it has {', '.join(have)}")
    opts = dict(default_options) if chosen == default_codec else {}
    if crf is not None:
        key = QUALITY_OPTION.get(chosen)
        if key is None:
            raise UsageError(f"--crf: {chosen} has no constant-quality setting (it is lossless or rate-driven); "
                             f"leave --crf out, or use --encoder-option")
        opts[key] = f"{crf:g}"
        if chosen.startswith("libvpx"):
            opts.setdefault("b", "0")  # constant quality needs no bitrate cap
    if preset is not None:
        opts["preset"] = preset
    for key, value in _QUIET.get(chosen, {}).items():
        opts.setdefault(key, value)
    for key, value in options:
        opts[key] = value
    if pix_fmt is not None:
        formats = _formats(chosen)
        if pix_fmt not in formats:
            raise UsageError(f"--pix-fmt {pix_fmt}: {chosen} takes {', '.join(formats)}")
        name = pix_fmt
    else:
        name = _default_pix_fmt(chosen, bits, source_pix_fmt)
    return Encoder(muxer, chosen, opts, name)


def _is_video_encoder(name: str) -> bool:
    import av

    try:
        return av.Codec(name, "w").type == "video"
    except (av.error.FFmpegError, ValueError):
        return False


def parse_option(text: str) -> tuple[str, str]:
    """argparse type of ``--encoder-option KEY=VALUE``."""
    import argparse

    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (an option of the encoder), got {text!r}")
    return key.strip(), value


def containers_for(codec: str, pix_fmt: str, exclude: str) -> list[str]:
    """The output extensions whose muxer takes ``codec`` (tried on an in-memory file), for messages."""
    from megan_fast.video.writing import try_encoder

    found = []
    for ext, (muxer, _, _) in VIDEO_OUTPUTS.items():
        if ext != exclude and try_encoder(Encoder(muxer, codec, dict(_QUIET.get(codec, {})), pix_fmt)) is None:
            found.append(ext)
    return found


def describe(encoder: Encoder) -> str:
    """e.g. ``libx265 yuv420p10le crf 20``."""
    extra = " ".join(f"{k} {v}" for k, v in encoder.options.items() if k in ("crf", "cq", "preset"))
    return " ".join(filter(None, (encoder.codec, encoder.pix_fmt, extra)))


__all__ = ["Encoder", "KNOWN", "PIPE_OUTPUT", "QUALITY_OPTION", "VIDEO_OUTPUTS", "choose_encoder", "containers_for",
           "describe", "parse_option"]
