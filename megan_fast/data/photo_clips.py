"""PhotoClips: Vimeo-90K-like training septuplets rendered on the fly from bundled photos."""

from __future__ import annotations

from typing import Sequence

import torch

from megan_fast.data.items import augment_clip, check_common, item_generator, make_lq
from megan_fast.data.photos import check_photos, make_clip

__all__ = ["PhotoClips"]


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
        self.photos = check_photos(photos, "PhotoClips")
        check_common(scale, crop, seed)
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
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} items")
        index %= self.length
        g = item_generator(self.seed, self.epoch, index)
        photo = self.photos[int(torch.randint(len(self.photos), (1,), generator=g))]
        zoom = float(torch.rand((), generator=g)) < self.zoom_prob
        speed = _uniform(g, *(self.zoom_speed if zoom else self.pan_speed))
        view = _uniform(g, *self.view_scale)
        clip_seed = int(torch.randint(2**31 - 1, (1,), generator=g))
        size = self.crop * self.scale
        gt = make_clip(photo, 7, (size, size), "zoom" if zoom else "pan", speed, clip_seed, view_scale=view)
        gt = gt.mul_(255).round_().div_(255)
        lq = make_lq(gt[0::2], self.scale, self.quantize_lq)
        if self.augment:
            flags = (torch.rand(4, generator=g) < 0.5).tolist()
            lq, gt = augment_clip(lq, gt, flags, transpose_ok=True)
        key = f"{photo}/{self.epoch}/{index}"
        return {"lq": lq.contiguous(), "gt": gt.contiguous(), "key": key}
