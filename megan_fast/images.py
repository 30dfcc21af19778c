"""Image files: the one frame listing, image reader and PNG writer of every command and dataset.

Frames are (3, H, W) float32 RGB tensors in [0, 1].

- :func:`list_frames`: the image files of a folder in natural order
  (``frame2`` before ``frame10``), dotfiles and sub-folders skipped.
- :func:`read_image`: any bit depth and mode Pillow opens, scaled to [0, 1]
  (16-bit grey by 65535, never clamped to 8 bits; 16-bit colour PNGs, which
  Pillow reads at 8 bits, decoded by FFmpeg at full precision), palettes
  expanded, alpha dropped, the EXIF orientation applied (a phone photo
  comes out as shown).
- :func:`write_png`: 8-bit RGB PNG, marked as megan-fast's (see
  :mod:`megan_fast.outputs`), written atomically; :func:`save_png16` the
  16-bit one (for frames of more than 8 bits).
"""

from __future__ import annotations

import os
import re

import numpy as np
import torch
from torch import Tensor

from megan_fast.errors import InputError, MissingInputError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")
_DIGITS = re.compile(r"([0-9]+)")  # ASCII digits only: "²" is a digit to str.isdigit but not to int()


def natural_key(name: str) -> list:
    """Sort key that orders embedded numbers by value: ``a2`` < ``a10``."""
    return [(0, int(part), "") if _DIGITS.fullmatch(part) else (1, 0, part.lower())
            for part in _DIGITS.split(name) if part]


def list_frames(folder: str) -> list[str]:
    """Paths of the image files in ``folder`` (extensions :data:`IMAGE_EXTENSIONS`), in natural name order.

    Names starting with a dot (hidden files, editors' and megan-fast's
    temporaries) and anything that is not a regular file are skipped.

    Raises:
        MissingInputError: ``folder`` is not a folder (also a FileNotFoundError).
    """
    if not os.path.isdir(folder):
        raise MissingInputError(f"frame folder not found: {folder}")
    names = [n for n in os.listdir(folder)
             if n.lower().endswith(IMAGE_EXTENSIONS) and not n.startswith(".")
             and os.path.isfile(os.path.join(folder, n))]
    return [os.path.join(folder, n) for n in sorted(names, key=natural_key)]


def _open(path: str):
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not os.path.isfile(path):
        raise MissingInputError(f"image not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            turned = ImageOps.exif_transpose(img)
            return turned if turned is not img else img.copy()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise InputError(f"cannot read image {path}: {exc}") from None


def _to_array(img) -> np.ndarray:
    """A Pillow image as (H, W, 3) float32 in [0, 1]."""
    if img.mode in _SIXTEEN_BIT:
        grey = np.asarray(img, dtype=np.uint16).astype(np.float32) / 65535.0
        return np.repeat(grey[..., None], 3, axis=2)
    if img.mode == "I":  # 32-bit integer grey: 16-bit PNGs and TIFFs use 0..65535
        grey = np.asarray(img, dtype=np.int64).clip(0, 65535).astype(np.float32) / 65535.0
        return np.repeat(grey[..., None], 3, axis=2)
    if img.mode == "F":  # floating-point grey (TIFF): taken as [0, 1]
        grey = np.asarray(img, dtype=np.float32).clip(0, 1)
        return np.repeat(grey[..., None], 3, axis=2)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return np.asarray(img.convert("RGB"), dtype=np.uint8).astype(np.float32) / 255.0


def png_bit_depth(path: str) -> int | None:
    """The bits per sample of a colour PNG (truecolour, with or without alpha) from its header; None otherwise."""
    try:
        with open(path, "rb") as f:
            head = f.read(26)
    except OSError:
        return None
    if len(head) < 26 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR" or head[25] not in (2, 6):
        return None
    return head[24]


def _png16_array(path: str) -> np.ndarray:
    """A 16-bit colour PNG as (H, W, 3) float32 in [0, 1], decoded by FFmpeg (Pillow reads these at 8 bits)."""
    import av

    try:
        with av.open(path) as container:
            frame = next(container.decode(video=0))
            rgb = frame.to_ndarray(format="rgb48le")
    except (av.error.FFmpegError, StopIteration) as exc:
        raise InputError(f"cannot read image {path}: {exc}") from None
    return rgb.astype(np.float32) / 65535.0


def read_image(path: str) -> Tensor:
    """Reads an image file as a (3, H, W) float32 RGB tensor in [0, 1].

    Raises:
        MissingInputError: no file at ``path`` (also a FileNotFoundError).
        InputError: not a readable image (the path is in the message).
    """
    with _open(path) as img:
        arr = _to_array(img) if png_bit_depth(path) != 16 else None
        orientation = img.getexif().get(0x0112, 1) if arr is None else 1
    if arr is None:  # 16-bit colour PNG: full precision, the EXIF orientation applied here
        arr = _ORIENT[orientation](_png16_array(path))
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).contiguous()


# EXIF orientation -> the (H, W, C) array as shown (Pillow's exif_transpose, for the arrays it does not read).
_ORIENT = {1: lambda a: a, 2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
           5: lambda a: a.transpose(1, 0, 2), 6: lambda a: a.transpose(1, 0, 2)[:, ::-1],
           7: lambda a: a.transpose(1, 0, 2)[::-1, ::-1], 8: lambda a: a.transpose(1, 0, 2)[::-1]}


def image_size(path: str) -> tuple[int, int]:
    """(width, height) of an image as :func:`read_image` returns it (EXIF orientation applied), from its header."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            w, h = img.size
            # A PNG's getexif() decodes the whole image when it finds no eXIf chunk before the pixels.
            has_exif = img.format != "PNG" or "exif" in img.info
            orientation = img.getexif().get(0x0112, 1) if has_exif else 1
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise InputError(f"cannot read image {path}: {exc}") from None
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def to_uint8(frame: Tensor) -> np.ndarray:
    """(3, H, W) float in [0, 1] -> (H, W, 3) uint8, clamped and rounded."""
    return frame.detach().float().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()


def to_uint16(frame: Tensor) -> np.ndarray:
    """(3, H, W) float in [0, 1] -> (H, W, 3) uint16, clamped and rounded."""
    return frame.detach().float().clamp(0, 1).mul(65535).round().to(torch.int32).permute(1, 2, 0).cpu().numpy() \
        .astype(np.uint16)


def save_png16(frame: Tensor, path: str) -> None:
    """Writes a (3, H, W) float frame in [0, 1] to ``path`` as a marked 16-bit RGB PNG (not atomic by itself,
    as :func:`save_png`).  Written directly (Pillow writes 16-bit grey only): IHDR, the mark in a tEXt
    chunk, the rows unfiltered in one IDAT."""
    import struct
    import zlib

    from megan_fast.outputs import written_by

    rgb = to_uint16(frame).astype(">u2")
    h, w = rgb.shape[:2]
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                + chunk(b"tEXt", b"Software\x00" + written_by().encode("latin-1"))
                + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


def save_png(frame: Tensor | np.ndarray, path: str) -> None:
    """Writes a (3, H, W) float frame in [0, 1] (or an (H, W, 3) uint8 array) to ``path`` as a marked 8-bit PNG.

    Not atomic by itself: write into a temporary (:mod:`megan_fast.outputs`)
    or use :func:`write_png`.
    """
    from PIL import Image, PngImagePlugin

    from megan_fast.outputs import written_by

    array = frame if isinstance(frame, np.ndarray) else to_uint8(frame)
    info = PngImagePlugin.PngInfo()
    info.add_text("Software", written_by())
    with open(path, "wb") as f:
        Image.fromarray(array, mode="RGB").save(f, format="PNG", pnginfo=info)


def write_png(frame: Tensor | np.ndarray, path: str) -> None:
    """:func:`save_png` via a temporary file renamed into place; replaces only an earlier megan-fast PNG.

    Raises:
        OutputError: ``path`` exists and is not a PNG megan-fast wrote.
    """
    from megan_fast.outputs import Kind, Output

    out = Output(os.path.abspath(path), "file", Kind("PNG image"), True, path)
    out.check_existing()
    with out.atomic_file() as tmp:
        save_png(frame, tmp)
