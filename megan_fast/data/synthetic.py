"""Writers of clip folders: held-out evaluation clips and tiny Vimeo-90K trees made from real-texture clips.

The writers (:func:`write_clip_folder`, :func:`write_vimeo_layout`,
:func:`write_photo_clips`) store frames as 8-bit RGB PNGs
(:func:`megan_fast.images.write_png`: atomic, and never over a file
megan-fast did not write).  ``python -m megan_fast.data.synthetic OUT
--photos chelsea coffee`` writes held-out clips.  The clips themselves are
rendered by :mod:`megan_fast.data.photos`; training items by
:class:`megan_fast.data.photo_clips.PhotoClips` (both names are available
here too).
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence

from torch import Tensor

from megan_fast.data.photo_clips import PhotoClips
from megan_fast.data.photos import PHOTOS, available_photos, check_photos, load_photo, make_clip
from megan_fast.images import write_png

__all__ = [
    "PHOTOS",
    "PhotoClips",
    "available_photos",
    "load_photo",
    "make_clip",
    "write_clip_folder",
    "write_photo_clips",
    "write_vimeo_layout",
]


def write_clip_folder(frames: Tensor, folder: str, pattern: str = "{:05d}.png", start: int = 0) -> list[str]:
    """Writes (t, 3, h, w) frames in [0, 1] as 8-bit RGB PNGs into ``folder`` (created).

    Args:
        frames: (t, 3, h, w) floating tensor (clamped to [0, 1], rounded to uint8).
        folder: output folder.
        pattern: file name format, given the frame number, e.g. ``"im{}.png"``.
        start: number of the first frame.

    Returns:
        The written paths, in frame order.
    """
    if not isinstance(frames, Tensor) or frames.dim() != 4 or frames.shape[1] != 3:
        shape = tuple(frames.shape) if isinstance(frames, Tensor) else type(frames).__name__
        raise ValueError(f"write_clip_folder: frames must have shape (t, 3, h, w), got {shape}")
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i, frame in enumerate(frames):
        path = os.path.join(folder, pattern.format(start + i))
        write_png(frame, path)
        paths.append(path)
    return paths


def _write_text(path: str, lines: Sequence[str]) -> None:
    from megan_fast.outputs import Kind, Output

    out = Output(os.path.abspath(path), "file", Kind("list file", entries=".*", by_name=True), True, path)
    with out.atomic_file() as tmp, open(tmp, "w") as f:
        f.write("".join(f"{line}\n" for line in lines))


def write_vimeo_layout(
    root: str,
    clips: Mapping[str, Tensor] | Sequence[Tensor],
    lists: Mapping[str, Sequence[str]] | None = None,
    lq_root: str | None = None,
) -> list[str]:
    """Writes a tiny Vimeo-90K septuplet tree: root/sequences/<key>/im1.png..im7.png + list files.

    Args:
        root: output root (created).
        clips: (7, 3, H, W) frame tensors in [0, 1], as a mapping from key
            (``"00001/0001"``) or a sequence (keys ``00001/0001``,
            ``00001/0002``, ...).
        lists: list files to write, file name -> keys; default
            ``sep_trainlist.txt`` and ``sep_testlist.txt`` with every key.
        lq_root: if given, also writes x4 MATLAB-bicubic downscaled frames
            (H and W must be multiples of 4) in the same layout there.

    Returns:
        The keys, in order.
    """
    from megan_fast.data.imresize import bicubic_downscale_x4

    if isinstance(clips, Mapping):
        items = list(clips.items())
    else:
        items = [(f"00001/{i + 1:04d}", clip) for i, clip in enumerate(clips)]
    for key, clip in items:
        if not isinstance(clip, Tensor) or clip.dim() != 4 or clip.shape[:2] != (7, 3):
            shape = tuple(clip.shape) if isinstance(clip, Tensor) else type(clip).__name__
            raise ValueError(f"write_vimeo_layout: clip {key!r} must have shape (7, 3, H, W), got {shape}")
        if lq_root is not None and (clip.shape[-2] % 4 or clip.shape[-1] % 4):
            raise ValueError(f"write_vimeo_layout: clip {key!r} is {clip.shape[-2]}x{clip.shape[-1]}; "
                             "making LR frames needs multiples of 4")
    keys = [k for k, _ in items]
    for key, clip in items:
        write_clip_folder(clip, os.path.join(root, "sequences", key), pattern="im{}.png", start=1)
        if lq_root is not None:
            lq = bicubic_downscale_x4(clip.double()).clamp(0, 1)
            write_clip_folder(lq, os.path.join(lq_root, "sequences", key), pattern="im{}.png", start=1)
    if lists is None:
        lists = {"sep_trainlist.txt": keys, "sep_testlist.txt": keys}
    for fname, names in lists.items():
        _write_text(os.path.join(root, fname), list(names))
    return keys



def write_photo_clips(
    root: str,
    photos: Sequence[str],
    clips_per_photo: int = 2,
    num_frames: int = 13,
    size: tuple[int, int] = (144, 176),
    seed: int = 0,
) -> list[str]:
    """Writes held-out evaluation clips, one folder of PNG frames each: ``root/<photo>_<i>/00000.png``.

    Clip i of a photo alternates pan (even i, 1.5 px/frame) and zoom (odd i,
    1.5% per frame); start point and direction come from ``seed``.  The
    folder layout is what ``megan-fast eval --data root`` reads.

    Returns:
        The clip folder names.
    """
    photos = check_photos(photos, "write_photo_clips")
    if clips_per_photo < 1 or num_frames < 1:
        raise ValueError("write_photo_clips: clips_per_photo and num_frames must be >= 1")
    names = []
    for pi, photo in enumerate(photos):
        for i in range(clips_per_photo):
            motion, speed = ("pan", 1.5) if i % 2 == 0 else ("zoom", 0.015)
            clip = make_clip(photo, num_frames, size, motion, speed, seed=seed * 1000 + pi * 100 + i,
                             view_scale=1.5)
            name = f"{photo}_{i}"
            write_clip_folder(clip, os.path.join(root, name))
            names.append(name)
    return names


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m megan_fast.data.synthetic OUT --photos chelsea coffee``: writes held-out clips."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m megan_fast.data.synthetic",
                                     description="Write real-texture evaluation clips (folders of PNG frames).")
    parser.add_argument("out", help="output folder (created)")
    parser.add_argument("--photos", nargs="+", required=True, help=f"photo names ({', '.join(PHOTOS)})")
    parser.add_argument("--clips-per-photo", type=int, default=2)
    parser.add_argument("--frames", type=int, default=13)
    parser.add_argument("--size", default="144x176", help="GT frame size HxW (multiples of 4)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        h, w = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        parser.error(f"--size must look like 144x176, got {args.size!r}")
    if h % 4 or w % 4:
        parser.error(f"--size must be multiples of 4, got {args.size}")
    names = write_photo_clips(args.out, args.photos, args.clips_per_photo, args.frames, (h, w), args.seed)
    print(f"wrote {len(names)} clips to {args.out}: {', '.join(names)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
