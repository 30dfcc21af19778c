"""Real-texture clips: a virtual camera's sub-pixel pans and zooms over photos bundled with scikit-image.

Tests, the demo and the demo checkpoint's training need video with natural
image statistics but cannot download anything.  scikit-image's wheel bundles
a few photographs; a clip is made by moving a virtual camera over one of
them: each frame is rendered at ``supersample`` times its size by bicubic
sampling of the photo (``torch.nn.functional.grid_sample``), then
area-averaged down, so frames are antialiased and motion is continuous
(sub-pixel).

Only photos whose files ship inside the installed wheel are used (checked
before loading, so nothing is ever fetched); :data:`PHOTOS` lists them with
the licence stated in scikit-image's documentation.  scikit-image is needed
only here (tests, demo, photo training clips), not by the library itself.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["PHOTOS", "available_photos", "check_photos", "load_photo", "make_clip"]

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



def check_photos(photos: Sequence[str], who: str) -> list[str]:
    """The photo names as a list; raises ValueError naming ``who`` for unknown or unbundled ones."""
    if isinstance(photos, str) or not photos:
        raise ValueError(f"{who}: photos must be a non-empty list of photo names, got {photos!r}")
    photos = list(photos)
    bundled = set(available_photos())
    missing = [p for p in photos if p not in bundled]
    if missing:
        raise ValueError(f"{who}: photos {missing} are unknown or not bundled with this scikit-image; "
                         f"available: {', '.join(sorted(bundled))}")
    return photos
