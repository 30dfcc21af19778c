"""Training and evaluation data: Vimeo-90K septuplets and folders of frames (Vid4, Adobe240 style).

An item is what MEGAN trains on: 7 consecutive ground-truth frames and the
low-resolution versions of the odd ones (1-based 1, 3, 5, 7)::

    {"lq": (4, 3, h, w) float32 in [0, 1],
     "gt": (7, 3, scale*h, scale*w) float32 in [0, 1],
     "key": "00001/0001"}

Low-resolution frames come from a pre-made folder with the same layout
(``lq_root``) or are made on the fly from the ground truth with MATLAB-style
bicubic downscaling (:func:`megan_fast.data.imresize.imresize`), after
cropping, clamped to [0, 1] and, by default, rounded to 8-bit levels like the
PNGs of the benchmarks.

Training items are random crops (``crop`` x ``crop`` low-resolution pixels and
the matching ground-truth region) with random horizontal and vertical flips,
transposition (with the flips: the 8 rotations and reflections of a square)
and temporal reversal, applied alike to the inputs and the targets.  The
randomness of item ``i`` comes from a ``torch.Generator`` seeded with
(seed, epoch, i), so items do not depend on worker processes or on the order
in which they are read; call :meth:`set_epoch` before each epoch (before the
DataLoader starts its workers, which copy the dataset).

Frames are listed and read by :mod:`megan_fast.images` (natural order; any
bit depth, scaled to [0, 1]), as every command reads them.  Errors name the
path and what was expected.
"""

from __future__ import annotations

import os
from typing import Iterator

import torch
from torch import Tensor
from torch.utils.data import Dataset

from megan_fast.data.items import augment_clip, check_common, item_generator, make_lq
from megan_fast.images import list_frames, natural_key, read_image

__all__ = ["Vimeo90KSeptuplet", "VideoFolderClips"]

NUM_GT = 7


# --------------------------------------------------------------------------- image I/O


def _read_frames(paths: list[str]) -> Tensor:
    """(t, 3, H, W) from t files that must all have the same size."""
    frames = [read_image(p) for p in paths]
    size = frames[0].shape[-2:]
    for p, f in zip(paths, frames):
        if f.shape[-2:] != size:
            raise ValueError(f"frame {p} is {f.shape[-1]}x{f.shape[-2]} (w x h) but {paths[0]} is "
                             f"{size[1]}x{size[0]}; the frames of a clip must have one size")
    return torch.stack(frames, 0)


# --------------------------------------------------------------------------- item making


def _check_lq_size(gt: Tensor, lq: Tensor, scale: int, gt_path: str, lq_path: str) -> None:
    gh, gw = gt.shape[-2:]
    lh, lw = lq.shape[-2:]
    if lh * scale != gh or lw * scale != gw:
        raise ValueError(f"LR frame {lq_path} is {lw}x{lh} (w x h) but GT frame {gt_path} is {gw}x{gh}; "
                         f"LR must be GT/{scale} in each dimension ({gw // scale}x{gh // scale})")


def _load_item(
    gt_paths: list[str],
    lq_paths: list[str] | None,
    key: str,
    scale: int,
    crop: int | None,
    augment: bool,
    quantize_lq: bool,
    generator: torch.Generator | None,
) -> dict:
    """Reads 7 GT frames (+ 4 LR frames), crops, makes LR if needed, augments."""
    gt = _read_frames(gt_paths)  # (7, 3, H, W)
    gh, gw = gt.shape[-2:]
    lq = None
    if lq_paths is not None:
        lq = _read_frames(lq_paths)  # (4, 3, H/s, W/s)
        _check_lq_size(gt, lq, scale, gt_paths[0], lq_paths[0])
        lh, lw = lq.shape[-2:]
    else:
        lh, lw = gh // scale, gw // scale
        if crop is None and (gh % scale or gw % scale):
            raise ValueError(f"GT frame {gt_paths[0]} is {gw}x{gh} (w x h), not a multiple of scale={scale}; "
                             "LR frames cannot be made from it (crop it or give lq_root)")
    if crop is not None:
        if crop > lh or crop > lw:
            raise ValueError(f"crop={crop} is larger than the LR frame {lw}x{lh} (w x h) of {key} "
                             f"({gt_paths[0]} is {gw}x{gh})")
        top = int(torch.randint(0, lh - crop + 1, (1,), generator=generator))
        left = int(torch.randint(0, lw - crop + 1, (1,), generator=generator))
        gt = gt[..., top * scale : (top + crop) * scale, left * scale : (left + crop) * scale]
        if lq is not None:
            lq = lq[..., top : top + crop, left : left + crop]
    if lq is None:
        lq = make_lq(gt[0::2], scale, quantize_lq)
    if augment:
        flags = (torch.rand(4, generator=generator) < 0.5).tolist()
        lq, gt = augment_clip(lq, gt, flags, transpose_ok=lq.shape[-1] == lq.shape[-2])
    return {"lq": lq.contiguous(), "gt": gt.contiguous(), "key": key}


# --------------------------------------------------------------------------- Vimeo-90K


class Vimeo90KSeptuplet(Dataset):
    """Vimeo-90K septuplets: ``root/sequences/<key>/im1.png .. im7.png``.

    Lists of keys (lines like ``00001/0001``): ``root/sep_trainlist.txt``
    (split "train"), ``root/sep_testlist.txt`` ("test"),
    ``root/sep_{fast,medium,slow}_testset.txt`` ("fast", "medium", "slow"),
    or ``list_file`` for any split.

    Args:
        root: the septuplet folder (holding ``sequences`` and the lists).
        split: "train", "test", "fast", "medium" or "slow".
        lq_root: folder of pre-made LR frames in the same layout
            (``lq_root/sequences/<key>/im1.png``, e.g. Vimeo's
            ``vimeo_septuplet_matlabLRx4``); None: made on the fly (MATLAB bicubic).
        crop: LR crop size (split "train" only); None: whole frames.
        augment: random flips, transposition, temporal reversal (split "train" only).
        scale: GT size / LR size.
        list_file: path of the key list, overriding the default for ``split``.
        seed: base seed of the per-item generators.
        quantize_lq: round LR frames made on the fly to 8-bit levels.

    Items: dict(lq=(4, 3, h, w), gt=(7, 3, scale*h, scale*w), key=str),
    float32 in [0, 1]; the test splits give whole frames (Vimeo: 112x64 LR,
    448x256 GT), deterministically.
    """

    SPLITS = ("train", "test", "fast", "medium", "slow")

    def __init__(
        self,
        root: str,
        split: str = "train",
        lq_root: str | None = None,
        crop: int | None = 32,
        augment: bool = True,
        scale: int = 4,
        list_file: str | None = None,
        seed: int = 0,
        quantize_lq: bool = True,
    ) -> None:
        if split not in self.SPLITS:
            raise ValueError(f"Vimeo90KSeptuplet: split must be one of {', '.join(self.SPLITS)}, got {split!r}")
        check_common(scale, crop, seed)
        if not os.path.isdir(root):
            raise FileNotFoundError(f"Vimeo90KSeptuplet: root folder not found: {root}")
        self.root, self.lq_root, self.split, self.scale = root, lq_root, split, scale
        self.seq_dir = os.path.join(root, "sequences")
        if not os.path.isdir(self.seq_dir):
            raise FileNotFoundError(f"Vimeo90KSeptuplet: {self.seq_dir} not found "
                                    "(expected root/sequences/<key>/im1.png)")
        self.lq_seq_dir = None
        if lq_root is not None:
            self.lq_seq_dir = os.path.join(lq_root, "sequences")
            if not os.path.isdir(self.lq_seq_dir):
                raise FileNotFoundError(f"Vimeo90KSeptuplet: LR folder {self.lq_seq_dir} not found "
                                        "(expected lq_root/sequences/<key>/im1.png)")
        if list_file is None:
            name = {"train": "sep_trainlist.txt", "test": "sep_testlist.txt"}.get(split, f"sep_{split}_testset.txt")
            list_file = os.path.join(root, name)
        if not os.path.isfile(list_file):
            raise FileNotFoundError(f"Vimeo90KSeptuplet: list file for split {split!r} not found: {list_file} "
                                    "(give list_file= or put it there)")
        with open(list_file) as f:
            self.keys = [line.strip() for line in f if line.strip()]
        if not self.keys:
            raise ValueError(f"Vimeo90KSeptuplet: list file {list_file} has no entries")
        for key in self.keys:
            if os.path.isabs(key) or ".." in key.split("/"):
                raise ValueError(f"Vimeo90KSeptuplet: bad entry {key!r} in {list_file} (expected like 00001/0001)")
        self.list_file = list_file
        train = split == "train"
        self.crop = crop if train else None
        self.augment = bool(augment) and train
        self.seed, self.epoch = seed, 0
        self.quantize_lq = quantize_lq

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch whose crops and augmentations items are drawn from."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        index %= len(self)
        key = self.keys[index]
        gt_paths = [os.path.join(self.seq_dir, key, f"im{i}.png") for i in range(1, NUM_GT + 1)]
        lq_paths = None
        if self.lq_seq_dir is not None:
            lq_paths = [os.path.join(self.lq_seq_dir, key, f"im{i}.png") for i in range(1, NUM_GT + 1, 2)]
        g = item_generator(self.seed, self.epoch, index) if (self.crop or self.augment) else None
        return _load_item(gt_paths, lq_paths, key, self.scale, self.crop, self.augment, self.quantize_lq, g)


# --------------------------------------------------------------------------- folders of clips


class VideoFolderClips(Dataset):
    """Clips stored as one folder of frames each (Vid4, Adobe240, REDS style).

    ``gt_root/<clip>/<frames>`` with frames sorted by name (natural order,
    :func:`megan_fast.images.list_frames`); ``lq_root/<clip>/`` holds LR versions of every GT
    frame (same count, GT/scale in each dimension), or LR frames are made on
    the fly.

    Items are 7-frame windows: the inputs are the window's frames 1, 3, 5, 7.
    mode "train": every window start (``window_stride`` apart) of every clip,
    with random crops and augmentation; each clip needs at least 7 frames.
    mode "eval": the evaluation protocol's windows (stride 6, the last one
    aligned to the end), whole frames, no augmentation; clips need at least 4
    frames (those shorter than 7 give no windows but :meth:`clip_frames`
    reads them).

    Args:
        gt_root: folder of GT clip folders.
        lq_root: folder of LR clip folders with the same names, or None.
        mode: "train" or "eval".
        crop: LR crop size in "train" mode; None: whole frames.
        augment: random flips, transposition, temporal reversal ("train").
        scale: GT size / LR size.
        seed: base seed of the per-item generators.
        window_stride: frames between window starts in "train" mode.
        quantize_lq: round LR frames made on the fly to 8-bit levels.
    """

    def __init__(
        self,
        gt_root: str,
        lq_root: str | None = None,
        mode: str = "train",
        crop: int | None = 32,
        augment: bool = True,
        scale: int = 4,
        seed: int = 0,
        window_stride: int = 1,
        quantize_lq: bool = True,
    ) -> None:
        if mode not in ("train", "eval"):
            raise ValueError(f"VideoFolderClips: mode must be 'train' or 'eval', got {mode!r}")
        check_common(scale, crop, seed)
        if not isinstance(window_stride, int) or window_stride < 1:
            raise ValueError(f"VideoFolderClips: window_stride must be a positive integer, got {window_stride!r}")
        if not os.path.isdir(gt_root):
            raise FileNotFoundError(f"VideoFolderClips: GT folder not found: {gt_root}")
        if lq_root is not None and not os.path.isdir(lq_root):
            raise FileNotFoundError(f"VideoFolderClips: LR folder not found: {lq_root}")
        names = [n for n in os.listdir(gt_root) if not n.startswith(".") and os.path.isdir(os.path.join(gt_root, n))]
        names.sort(key=natural_key)
        if not names:
            raise FileNotFoundError(f"VideoFolderClips: no clip folders in {gt_root} "
                                    "(expected gt_root/<clip>/<frames>)")
        need = NUM_GT if mode == "train" else 2  # eval: evaluation.evaluate says what the model needs
        self.gt_paths: dict[str, list[str]] = {}
        self.lq_paths: dict[str, list[str]] = {}
        for name in names:
            frames = list_frames(os.path.join(gt_root, name))
            if len(frames) < need:
                raise ValueError(f"VideoFolderClips: clip {os.path.join(gt_root, name)} has {len(frames)} frames; "
                                 f"mode {mode!r} needs at least {need}")
            self.gt_paths[name] = frames
            if lq_root is not None:
                lq_dir = os.path.join(lq_root, name)
                if not os.path.isdir(lq_dir):
                    raise FileNotFoundError(f"VideoFolderClips: LR clip folder not found: {lq_dir} "
                                            f"(GT clip {os.path.join(gt_root, name)})")
                lq = list_frames(lq_dir)
                if len(lq) != len(frames):
                    raise ValueError(f"VideoFolderClips: LR clip {lq_dir} has {len(lq)} frames but GT clip "
                                     f"{os.path.join(gt_root, name)} has {len(frames)}")
                self.lq_paths[name] = lq
        self.gt_root, self.lq_root, self.mode, self.scale = gt_root, lq_root, mode, scale
        train = mode == "train"
        self.crop = crop if train else None
        self.augment = bool(augment) and train
        self.seed, self.epoch = seed, 0
        self.quantize_lq = quantize_lq
        self.windows: list[tuple[str, int]] = []
        for name, frames in self.gt_paths.items():
            t = len(frames)
            if t < NUM_GT:
                continue
            if train:
                starts = list(range(0, t - NUM_GT + 1, window_stride))
            else:
                starts = list(range(0, t - NUM_GT + 1, NUM_GT - 1))
                if starts[-1] != t - NUM_GT:
                    starts.append(t - NUM_GT)
            self.windows += [(name, s) for s in starts]

    @property
    def clip_names(self) -> list[str]:
        """Clip folder names, in natural order."""
        return list(self.gt_paths)

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch whose crops and augmentations items are drawn from."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} windows")
        index %= len(self)
        name, start = self.windows[index]
        gt_paths = self.gt_paths[name][start : start + NUM_GT]
        lq_paths = self.lq_paths[name][start : start + NUM_GT : 2] if self.lq_root is not None else None
        g = item_generator(self.seed, self.epoch, index) if (self.crop or self.augment) else None
        key = f"{name}/{start:05d}"
        return _load_item(gt_paths, lq_paths, key, self.scale, self.crop, self.augment, self.quantize_lq, g)

    def clip_frames(self, name: str) -> tuple[Tensor, Tensor | None]:
        """Reads a whole clip.

        Returns:
            gt: (t, 3, H, W) float32 in [0, 1].
            lq: (t, 3, H/scale, W/scale) from ``lq_root`` (LR of every GT
            frame), or None without ``lq_root``.
        """
        if name not in self.gt_paths:
            raise KeyError(f"no clip {name!r} in {self.gt_root}; clips: {', '.join(self.gt_paths)}")
        gt = _read_frames(self.gt_paths[name])
        if self.lq_root is None:
            return gt, None
        lq = _read_frames(self.lq_paths[name])
        _check_lq_size(gt, lq, self.scale, self.gt_paths[name][0], self.lq_paths[name][0])
        return gt, lq

    def iter_clips(self, select=None) -> Iterator[tuple[str, Tensor, Tensor | None]]:
        """Yields (name, gt, lq or None) per clip, the input of :func:`megan_fast.evaluation.evaluate`; with
        ``select(index)``: only the clips it selects, as (index, (name, gt, lq)), the others not read."""
        for index, name in enumerate(self.gt_paths):
            if select is None:
                yield (name, *self.clip_frames(name))
            elif select(index):
                yield index, (name, *self.clip_frames(name))
