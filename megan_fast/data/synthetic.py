"""Real-texture test clips: sub-pixel pans and zooms over photos bundled with scikit-image.

Tests and the demo need video with natural image statistics but cannot
download anything.  scikit-image's wheel bundles a few photographs; a clip is
made by moving a virtual camera over one of them: each frame is rendered at
``supersample`` times its size by bicubic sampling of the photo
(``torch.nn.functional.grid_sample``), then area-averaged down, so frames are
antialiased and motion is continuous (sub-pixel).

Only photos whose files ship inside the installed wheel are used (checked
before loading, so nothing is ever fetched); :data:`PHOTOS` lists them with
the licence stated in scikit-image's documentation.  scikit-image is needed
only here (tests and demo), not by the library itself.

The writers (:func:`write_clip_folder`, :func:`write_vimeo_layout`) store
frames as 8-bit RGB PNGs (:func:`megan_fast.images.write_png`: atomic, and
never over a file megan-fast did not write).
"""

from __future__ import annotations

import functools
import math
import os
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

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

# name -> (bundled file in skimage/data, licence as documented by scikit-image)
PHOTOS: dict[str, tuple[str, str]] = {
    "astronaut": ("astronaut.png", "public domain (NASA)"),
    "coffee": ("coffee.png", "CC0 (Rachel Michetti)"),
    "chelsea": ("chelsea.png", "CC0 (Stefan van der Walt)"),
    "rocket": ("rocket.jpg", "public domain (SpaceX)"),
    "hubble_deep_field": ("hubble_deep_field.jpg", "public domain (NASA)"),
    "retina": ("retina.jpg", "CC0 1.0"),
    "immunohistochemistry": ("ihc.png", "no known copyright restrictions"),
    "motorcycle_left": ("motorcycle_left.png", "Middlebury 2014 stereo benchmark (Scharstein et al.)"),
    "motorcycle_right": ("motorcycle_right.png", "Middlebury 2014 stereo benchmark (Scharstein et al.)"),
}


def _data_dir() -> str:
    try:
        import skimage.data
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("megan_fast.data.synthetic needs scikit-image: pip install scikit-image") from exc
    return os.path.dirname(skimage.data.__file__)


def available_photos() -> list[str]:
    """Names of :data:`PHOTOS` whose files are bundled in the installed scikit-image."""
    folder = _data_dir()
    return [name for name, (fname, _) in PHOTOS.items() if os.path.isfile(os.path.join(folder, fname))]


def load_photo(name: str) -> Tensor:
    """A bundled photo as a (3, H, W) float32 tensor in [0, 1].

    Raises:
        ValueError: unknown name, or a photo not bundled with this scikit-image
            (it would have to be downloaded).
    """
    return _load_photo_cached(name).clone()


@functools.lru_cache(maxsize=16)
def _load_photo_cached(name: str) -> Tensor:
    if name not in PHOTOS:
        raise ValueError(f"unknown photo {name!r}; choose one of {', '.join(PHOTOS)}")
    fname = PHOTOS[name][0]
    path = os.path.join(_data_dir(), fname)
    if not os.path.isfile(path):
        raise ValueError(f"photo {name!r} is not bundled with this scikit-image ({path} missing); "
                         f"available: {', '.join(available_photos())}")
    import skimage.data

    if name.startswith("motorcycle_"):
        left, right, _ = skimage.data.stereo_motorcycle()
        arr = left if name.endswith("left") else right
    else:
        arr = getattr(skimage.data, name)()
    arr = np.ascontiguousarray(arr[..., :3])
    return torch.from_numpy(arr).permute(2, 0, 1).float().div(255.0)


def make_clip(
    image_name: str,
    num_frames: int,
    size: tuple[int, int] = (64, 64),
    motion: str = "pan",
    speed: float | None = None,
    seed: int = 0,
    supersample: int = 4,
    view_scale: float = 1.0,
) -> Tensor:
    """Renders a clip of a virtual camera panning or zooming over a bundled photo.

    The camera looks at a (h, w) window of the photo at ``view_scale`` photo
    pixels per frame pixel (less where the photo is too small for the window
    and the motion).  Start point and direction come from ``seed``.

    Args:
        image_name: one of :func:`available_photos`, e.g. ``"astronaut"``.
        num_frames: t >= 1.
        size: (h, w) of the frames.
        motion: ``"pan"``: constant-velocity translation of ``speed`` frame
            pixels per frame (default 1.5) in a random direction;
            ``"zoom"``: zoom in by a factor ``1 + speed`` per frame (default
            0.02) around a random point.
        speed: see ``motion``; sub-pixel values give sub-pixel motion.
        seed: seeds the start point and direction.
        supersample: frames are rendered at this many times their size (at
            least ``ceil(view_scale)``), then area-averaged down (antialiasing).
        view_scale: photo pixels per frame pixel (> 0); 1 shows the photo's
            own detail, larger values show more of the photo, downscaled.

    Returns:
        (t, 3, h, w) float32 tensor in [0, 1].
    """
    if num_frames < 1:
        raise ValueError(f"make_clip: num_frames must be >= 1, got {num_frames}")
    h, w = (int(s) for s in size)
    if h < 1 or w < 1:
        raise ValueError(f"make_clip: size must be positive (h, w), got {size!r}")
    if motion not in ("pan", "zoom"):
        raise ValueError(f"make_clip: motion must be 'pan' or 'zoom', got {motion!r}")
    if supersample < 1:
        raise ValueError(f"make_clip: supersample must be >= 1, got {supersample}")
    if not view_scale > 0:
        raise ValueError(f"make_clip: view_scale must be positive, got {view_scale}")
    if speed is None:
        speed = 1.5 if motion == "pan" else 0.02
    if motion == "zoom" and speed <= -1:
        raise ValueError(f"make_clip: zoom speed must be > -1, got {speed}")
    photo = _load_photo_cached(image_name)
    ph, pw = photo.shape[-2:]
    g = torch.Generator().manual_seed(int(seed))
    u = torch.rand(4, generator=g, dtype=torch.float64).tolist()

    # Per frame: view size in photo pixels per frame pixel (z_t) and the view's top-left corner.
    if motion == "pan":
        angle = 2 * math.pi * u[0]
        dy, dx = speed * math.sin(angle), speed * math.cos(angle)  # frame pixels per frame
        span_y, span_x = abs(dy) * (num_frames - 1), abs(dx) * (num_frames - 1)
        z = min(view_scale, (ph - 1) / (h + span_y), (pw - 1) / (w + span_x))
        top0 = u[1] * (ph - (h + span_y) * z) + (span_y * z if dy < 0 else 0.0)
        left0 = u[2] * (pw - (w + span_x) * z) + (span_x * z if dx < 0 else 0.0)
        zs = [z] * num_frames
        tops = [top0 + dy * z * t for t in range(num_frames)]
        lefts = [left0 + dx * z * t for t in range(num_frames)]
    else:
        z0 = min(view_scale, (ph - 1) / h, (pw - 1) / w)
        cy = h * z0 / 2 + u[1] * (ph - h * z0)
        cx = w * z0 / 2 + u[2] * (pw - w * z0)
        zs = [z0 / (1 + speed) ** t for t in range(num_frames)]
        if speed < 0 and zs[-1] > z0:  # zooming out: start small enough to end inside the photo
            zs = [z * z0 / zs[-1] for z in zs]
        tops = [cy - h * z / 2 for z in zs]
        lefts = [cx - w * z / 2 for z in zs]

    s = max(supersample, math.ceil(max(zs)))
    ys = (torch.arange(h * s, dtype=torch.float64) + 0.5) / s  # frame edge coordinates of sample centres
    xs = (torch.arange(w * s, dtype=torch.float64) + 0.5) / s
    frames = []
    for z, top, left in zip(zs, tops, lefts):
        # Photo edge coordinate -> grid_sample's normalised coordinate (align_corners=False).
        gy = 2 * (top + ys * z) / ph - 1
        gx = 2 * (left + xs * z) / pw - 1
        grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), -1).float()[None]  # (1, hs, ws, 2)
        hi = F.grid_sample(photo[None], grid, mode="bicubic", padding_mode="reflection", align_corners=False)
        frames.append(F.avg_pool2d(hi, s)[0] if s > 1 else hi[0])
    return torch.stack(frames, 0).clamp_(0, 1)


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


# --------------------------------------------------------------------------- training and held-out clips


def _check_photos(photos: Sequence[str], who: str) -> list[str]:
    if isinstance(photos, str) or not photos:
        raise ValueError(f"{who}: photos must be a non-empty list of photo names, got {photos!r}")
    photos = list(photos)
    bundled = set(available_photos())
    missing = [p for p in photos if p not in bundled]
    if missing:
        raise ValueError(f"{who}: photos {missing} are unknown or not bundled with this scikit-image; "
                         f"available: {', '.join(sorted(bundled))}")
    return photos


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g, dtype=torch.float64))


class PhotoClips(torch.utils.data.Dataset):
    """Septuplets rendered on the fly: random sub-pixel pans and zooms over bundled photos.

    Each item is a 7-frame GT clip of ``crop * scale`` pixels square made by
    :func:`make_clip` (rounded to 8-bit levels, as if read from PNG) and its
    4 LR frames (MATLAB-bicubic downscaling of GT frames 0, 2, 4, 6, as the
    Vimeo-90K pipeline makes them).  Photo, motion, speed, direction and
    view scale are drawn from a generator seeded by (seed, epoch, index), so
    an epoch's items are reproducible in any order and on any worker.

    Args:
        photos: names from :func:`available_photos` to draw from.
        length: items per epoch.
        crop: LR size (GT is ``crop * scale``).
        scale: GT size / LR size.
        seed: base seed.
        pan_speed: (min, max) pan speed in GT pixels per GT frame.
        zoom_speed: (min, max) zoom factor change per frame (negative: out).
        zoom_prob: probability of a zoom instead of a pan.
        view_scale: (min, max) photo pixels per GT pixel.
        augment: random flips, transposition and temporal reversal.
        quantize_lq: round LR frames to 8-bit levels.
    """

    def __init__(
        self,
        photos: Sequence[str],
        length: int = 1000,
        crop: int = 32,
        scale: int = 4,
        seed: int = 0,
        pan_speed: Sequence[float] = (0.0, 3.0),
        zoom_speed: Sequence[float] = (-0.02, 0.02),
        zoom_prob: float = 0.25,
        view_scale: Sequence[float] = (1.0, 2.5),
        augment: bool = True,
        quantize_lq: bool = True,
    ) -> None:
        from megan_fast.data.datasets import _check_common

        self.photos = _check_photos(photos, "PhotoClips")
        _check_common(scale, crop, seed)
        if not isinstance(length, int) or length < 1:
            raise ValueError(f"PhotoClips: length must be a positive integer, got {length!r}")
        for name, pair in (("pan_speed", pan_speed), ("zoom_speed", zoom_speed), ("view_scale", view_scale)):
            if len(pair) != 2 or pair[0] > pair[1]:
                raise ValueError(f"PhotoClips: {name} must be a (min, max) pair, got {pair!r}")
        if min(view_scale) <= 0 or min(zoom_speed) <= -1:
            raise ValueError("PhotoClips: view_scale must be positive and zoom_speed > -1")
        if not 0 <= zoom_prob <= 1:
            raise ValueError(f"PhotoClips: zoom_prob must be in [0, 1], got {zoom_prob!r}")
        self.length, self.crop, self.scale, self.seed = length, crop, scale, seed
        self.pan_speed, self.zoom_speed = tuple(map(float, pan_speed)), tuple(map(float, zoom_speed))
        self.zoom_prob, self.view_scale = float(zoom_prob), tuple(map(float, view_scale))
        self.augment, self.quantize_lq = augment, quantize_lq
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        from megan_fast.data.datasets import _augment, _item_generator, _make_lq

        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} items")
        index %= self.length
        g = _item_generator(self.seed, self.epoch, index)
        photo = self.photos[int(torch.randint(len(self.photos), (1,), generator=g))]
        zoom = float(torch.rand((), generator=g)) < self.zoom_prob
        speed = _uniform(g, *(self.zoom_speed if zoom else self.pan_speed))
        view = _uniform(g, *self.view_scale)
        clip_seed = int(torch.randint(2**31 - 1, (1,), generator=g))
        size = self.crop * self.scale
        gt = make_clip(photo, 7, (size, size), "zoom" if zoom else "pan", speed, clip_seed, view_scale=view)
        gt = gt.mul_(255).round_().div_(255)
        lq = _make_lq(gt[0::2], self.scale, self.quantize_lq)
        if self.augment:
            flags = (torch.rand(4, generator=g) < 0.5).tolist()
            lq, gt = _augment(lq, gt, flags, transpose_ok=True)
        key = f"{photo}/{self.epoch}/{index}"
        return {"lq": lq.contiguous(), "gt": gt.contiguous(), "key": key}


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
    photos = _check_photos(photos, "write_photo_clips")
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
