"""Training data: the datasets of ``data.train`` / ``data.val``, their check against the model, and the data order.

The order of the training items is a function of (seed, epoch) only
(:class:`EpochSampler`), and each item's crop and augmentation of (seed,
epoch, index) (the dataset's own generators), so a resumed run sees exactly
the batches the uninterrupted run would have seen (docs/DESIGN.md section 3,
"Compiled and batched paths"; section 5 for the checks made before anything
is written).
"""

from __future__ import annotations

import torch

from megan_fast import outputs
from megan_fast.errors import ConfigError
from megan_fast.models import MEGANConfig

__all__ = ["EpochSampler", "build_dataset", "check_items", "dataset_class", "epoch_batches", "open_dataset",
           "per_process_batches"]


def dataset_class(kind: str):
    """The dataset class of a ``type`` entry: 'vimeo90k', 'folder' or 'photos'; ConfigError for any other."""
    from megan_fast import data

    if kind == "vimeo90k":
        return data.Vimeo90KSeptuplet
    if kind == "folder":
        return data.VideoFolderClips
    if kind == "photos":
        from megan_fast.data.photo_clips import PhotoClips  # needs scikit-image: imported on use

        return PhotoClips
    raise ConfigError(f"data type must be 'vimeo90k', 'folder' or 'photos', got {kind!r}")


def build_dataset(spec: dict, seed: int, train: bool):
    """The dataset of a ``data.train`` (``train``) or ``data.val`` spec: its ``type`` picks the class, the other
    entries are its arguments (``seed`` for training sets only; a folder validation set gives whole frames)."""
    spec = dict(spec)
    kind = spec.pop("type", "vimeo90k")
    cls = dataset_class(kind)
    if kind == "photos":
        if not train:
            raise ConfigError("data type 'photos' is for training; validate on written clips (type 'folder')")
        return cls(**spec, seed=seed)
    root = spec.pop("root", None)
    if root is None:
        raise ConfigError(f"data type {kind!r} needs a root folder")
    if kind == "folder" and not train:
        spec.setdefault("mode", "eval")  # whole frames, the protocol's windows
    return cls(root, **spec, **({"seed": seed} if train else {}))


def open_dataset(spec: dict, seed: int, train: bool, where: str):
    """:func:`build_dataset` with every failure (missing folder, bad entry) as a ConfigError naming ``where``."""
    try:
        return build_dataset(spec, seed, train)
    except ConfigError:
        raise
    except (ValueError, TypeError, OSError, ImportError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


def check_items(config: MEGANConfig, train_set, val_set) -> None:
    """Reads the first item of each dataset and checks that it fits the model (frames, x4 sizes): a crop larger
    than the frames, LR frames of the wrong size or a scale other than 4 fail here, before anything is written."""
    n_in, t_out = config.num_input_frames, config.num_output_frames
    for where, dataset in (("data.train", train_set), ("data.val", val_set)):
        if dataset is None or len(dataset) == 0:
            continue
        try:
            item = dataset[0]
        except (ValueError, OSError, TypeError, IndexError, RuntimeError) as exc:
            raise ConfigError(f"{where}: {exc}") from None
        lq, gt = item["lq"], item["gt"]
        if lq.shape[0] != n_in or gt.shape[0] != t_out:
            raise ConfigError(f"{where} gives {lq.shape[0]} input and {gt.shape[0]} target frames per item, but "
                              f"model.num_input_frames {n_in} needs {n_in} and {t_out}")
        if tuple(gt.shape[-2:]) != (4 * lq.shape[-2], 4 * lq.shape[-1]):
            raise ConfigError(f"{where} gives {lq.shape[-1]}x{lq.shape[-2]} inputs for {gt.shape[-1]}x{gt.shape[-2]} "
                              "targets; MEGAN upscales x4 (scale 4, LR frames a quarter of GT)")


class EpochSampler(torch.utils.data.Sampler):
    """Indices of a seeded permutation per epoch, sharded over ranks, from any start position."""

    def __init__(self, size: int, seed: int, rank: int = 0, world: int = 1) -> None:
        self.size, self.seed, self.rank, self.world = size, seed, rank, world
        self.epoch, self.start = 0, 0

    def set_position(self, epoch: int, start: int) -> None:
        self.epoch, self.start = epoch, start

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        order = torch.randperm(self.size, generator=g).tolist()
        per_rank = len(order) // self.world
        mine = order[self.rank * per_rank : (self.rank + 1) * per_rank]
        return iter(mine[self.start :])

    def __len__(self) -> int:
        return self.size // self.world - self.start


def per_process_batches(size: int, batch_size: int, seed: int, rank: int, world: int):
    """(sampler, per-process batch, batches per epoch) of a training set of ``size`` items; ConfigError if the
    set or ``data.batch_size`` is too small for the processes."""
    batch = batch_size // world
    if batch < 1:
        raise ConfigError(f"data.batch_size {batch_size} is smaller than the {world} processes")
    sampler = EpochSampler(size, seed, rank, world)
    per_epoch = len(sampler) // batch
    if per_epoch == 0:
        raise ConfigError(f"the training set has {size} items: fewer than one batch of {batch} per process")
    return sampler, batch, per_epoch


def _worker_init(worker_id: int) -> None:
    """Data workers ignore SIGTERM and SIGINT: a signal to the process group is handled by the main process,
    which removes its temporaries and shuts the workers down (no "worker killed by signal" traceback).

    They are forked with both signals blocked (:func:`megan_fast.outputs.signals_held`), so one that came
    before this point is pending: ignoring first, then unblocking, discards it."""
    import signal
    import threading

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})
    default_hook = threading.excepthook

    def quiet(args):
        # A tensor handed over while the main process stopped: its helper thread loses the connection.
        if not issubclass(args.exc_type, (ConnectionError, EOFError)):
            default_hook(args)

    threading.excepthook = quiet


def epoch_batches(train_set, sampler: EpochSampler, batch: int, epoch: int, pos: int, num_workers: int,
                  pin_memory: bool, seed: int):
    """An iterator over the batches of ``epoch`` from batch ``pos`` on (a resumed run starts mid-epoch), its data
    workers started; drop it inside :func:`megan_fast.outputs.signals_held` to stop them."""
    sampler.set_position(epoch, pos * batch)
    if hasattr(train_set, "set_epoch"):
        train_set.set_epoch(epoch)
    # Its own generator: creating a loader must not consume the global RNG,
    # or a resumed run would draw different memory frames than an uninterrupted one.
    loader = torch.utils.data.DataLoader(train_set, batch_size=batch, sampler=sampler, drop_last=True,
                                         num_workers=num_workers, pin_memory=pin_memory,
                                         worker_init_fn=_worker_init,
                                         generator=torch.Generator().manual_seed(seed + epoch))
    with outputs.signals_held():  # the workers start here (see signals_held)
        return iter(loader)
