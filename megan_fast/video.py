"""Video and frame-folder I/O for ``megan-fast upscale`` (PyAV for video files, Pillow for frames).

Frames are (3, H, W) float32 RGB tensors in [0, 1].  Writers never leave a
half-written output: they write to a temporary path beside the target and
rename it into place only when :meth:`commit` is called.
"""

from __future__ import annotations

import dataclasses
import fractions
import os
import shutil
import tempfile
from typing import Iterator

import numpy as np
import torch
from torch import Tensor

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class VideoError(RuntimeError):
    """An input that cannot be read as a video or frame folder, or an output that cannot be written."""


@dataclasses.dataclass
class VideoInfo:
    num_frames: int | None  # None when the container does not say
    fps: fractions.Fraction
    width: int
    height: int
    has_audio: bool


def _frame_files(folder: str) -> list[str]:
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTENSIONS))
    return [os.path.join(folder, n) for n in names]


def probe(path: str, folder_fps: float = 25.0) -> VideoInfo:
    """Frame count, rate, size and audio presence of a video file or frame folder."""
    if os.path.isdir(path):
        files = _frame_files(path)
        if not files:
            raise VideoError(f"{path}: the folder holds no image frames ({', '.join(IMAGE_EXTENSIONS)})")
        w, h = _load_image(files[0]).shape[2], _load_image(files[0]).shape[1]
        return VideoInfo(len(files), fractions.Fraction(folder_fps).limit_denominator(1001), w, h, False)
    if not os.path.isfile(path):
        raise VideoError(f"{path}: no such file or folder")
    import av

    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise VideoError(f"{path}: the file has no video stream")
            stream = container.streams.video[0]
            fps = stream.average_rate or stream.guessed_rate or fractions.Fraction(25)
            return VideoInfo(
                stream.frames or None,
                fractions.Fraction(fps),
                stream.codec_context.width,
                stream.codec_context.height,
                bool(container.streams.audio),
            )
    except av.error.FFmpegError as exc:
        raise VideoError(f"{path}: cannot be read as a video ({exc})") from exc


def _load_image(path: str) -> Tensor:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            arr = np.asarray(img.convert("RGB"))
    except (UnidentifiedImageError, OSError) as exc:
        raise VideoError(f"{path}: cannot be read as an image ({exc})") from exc
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255)


def read_frames(path: str) -> Iterator[Tensor]:
    """Yields the frames of a video file or frame folder, decoded one at a time."""
    if os.path.isdir(path):
        for f in _frame_files(path):
            yield _load_image(f)
        return
    import av

    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for frame in container.decode(stream):
                try:
                    rgb = frame.to_ndarray(format="rgb24")
                except (ValueError, av.error.FFmpegError) as exc:
                    raise VideoError(
                        f"{path}: cannot convert pixel format {frame.format.name!r} to RGB ({exc})"
                    ) from exc
                yield torch.from_numpy(rgb).permute(2, 0, 1).float().div_(255)
    except av.error.FFmpegError as exc:
        raise VideoError(f"{path}: decoding failed ({exc}); the file may be corrupt") from exc


def to_uint8(frame: Tensor) -> np.ndarray:
    """(3, H, W) float [0, 1] -> (H, W, 3) uint8, rounded."""
    return frame.detach().float().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()


class FrameFolderWriter:
    """Writes PNG frames into a temporary folder renamed to ``path`` on commit."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        parent = os.path.dirname(self.path) or "."
        os.makedirs(parent, exist_ok=True)
        self.tmp = tempfile.mkdtemp(prefix=".megan-fast-", dir=parent)
        self.count = 0

    def write(self, frame: Tensor) -> None:
        from PIL import Image

        Image.fromarray(to_uint8(frame)).save(os.path.join(self.tmp, f"{self.count:06d}.png"))
        self.count += 1

    def commit(self) -> None:
        if os.path.isdir(self.path):
            shutil.rmtree(self.path)
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


class VideoWriter:
    """H.264 (yuv420p) writer that copies the audio of ``audio_from`` unchanged; atomic via rename."""

    def __init__(self, path: str, fps: fractions.Fraction, width: int, height: int,
                 audio_from: str | None = None, crf: int = 18) -> None:
        import av

        self.path = os.path.abspath(path)
        parent = os.path.dirname(self.path) or "."
        os.makedirs(parent, exist_ok=True)
        suffix = os.path.splitext(self.path)[1] or ".mp4"
        fd, self.tmp = tempfile.mkstemp(prefix=".megan-fast-", suffix=suffix, dir=parent)
        os.close(fd)
        self.audio_from = audio_from
        self.container = av.open(self.tmp, mode="w")
        self.stream = self.container.add_stream("libx264", rate=fps)
        self.stream.width, self.stream.height = width, height
        self.stream.pix_fmt = "yuv420p"
        self.stream.options = {"crf": str(crf)}
        # Every stream must exist before the first packet is written.
        self.out_audio = None
        if audio_from is not None:
            with av.open(audio_from) as src:
                if src.streams.audio:
                    self.out_audio = self.container.add_stream_from_template(src.streams.audio[0])
        self.count = 0

    def write(self, frame: Tensor) -> None:
        import av

        vf = av.VideoFrame.from_ndarray(to_uint8(frame), format="rgb24")
        for packet in self.stream.encode(vf):
            self.container.mux(packet)
        self.count += 1

    def _copy_audio(self) -> None:
        import av

        with av.open(self.audio_from) as src:
            for packet in src.demux(src.streams.audio[0]):
                if packet.dts is None:  # the demuxer's end-of-stream marker
                    continue
                packet.stream = self.out_audio
                self.container.mux(packet)

    def commit(self) -> None:
        for packet in self.stream.encode():
            self.container.mux(packet)
        if self.out_audio is not None:
            self._copy_audio()
        self.container.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        try:
            self.container.close()
        except Exception:  # the container may be unusable after an error
            pass
        if os.path.exists(self.tmp):
            os.remove(self.tmp)
