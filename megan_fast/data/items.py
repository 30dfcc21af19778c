"""What every training data set does to make an item: seeded randomness, augmentation, LR frames, argument checks.

Shared by :mod:`megan_fast.data.datasets` (Vimeo-90K, frame folders) and
:mod:`megan_fast.data.photo_clips` (rendered clips), so that all of them make
items the same way.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from megan_fast.data.imresize import imresize

__all__ = ["augment_clip", "check_common", "item_generator", "make_lq"]


def item_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The generator of item ``index`` in ``epoch``: independent of workers and of the order items are read in."""
    state = np.random.SeedSequence([int(seed), int(epoch), int(index)]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def augment_clip(lq: Tensor, gt: Tensor, flags: list[bool], transpose_ok: bool) -> tuple[Tensor, Tensor]:
    """Applies (hflip, vflip, transpose, temporal reversal) ``flags`` alike to (t, 3, h, w) inputs and targets."""
    hflip, vflip, transpose, reverse = flags
    if hflip:
        lq, gt = lq.flip(-1), gt.flip(-1)
    if vflip:
        lq, gt = lq.flip(-2), gt.flip(-2)
    if transpose and transpose_ok:
        lq, gt = lq.transpose(-2, -1), gt.transpose(-2, -1)
    if reverse:
        lq, gt = lq.flip(0), gt.flip(0)
    return lq.contiguous(), gt.contiguous()


def make_lq(gt_frames: Tensor, scale: int, quantize: bool) -> Tensor:
    """LR frames made from GT frames: MATLAB bicubic 1/scale, clamped to [0, 1], rounded to 8-bit levels if asked."""
    lq = imresize(gt_frames, scale=1.0 / scale).clamp_(0, 1)
    if quantize:
        lq = lq.mul_(255).round_().div_(255)
    return lq


def check_common(scale: int, crop: int | None, seed: int) -> None:
    """Raises ValueError for a scale, crop or seed a data set cannot use."""
    if not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale!r}")
    if crop is not None and (not isinstance(crop, int) or crop < 1):
        raise ValueError(f"crop must be a positive integer or None, got {crop!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
