"""What the megan-fast commands share: argument types, the device and dtype, the checkpoint, one-line errors."""

from __future__ import annotations

import argparse
import math
import os
import warnings

from megan_fast.errors import UsageError

DEMO_CHECKPOINT = os.path.join(os.path.dirname(os.path.dirname(__file__)), "checkpoints", "demo")


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``prog: error: message (see prog --help)``, exit status 2."""

    def error(self, message: str):  # noqa: D102 - argparse's hook
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _number(text: str, kind: type, minimum: float, strict: bool, what: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not math.isfinite(value) or value < minimum or (strict and value == minimum):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def int_at_least(minimum: int):
    """argparse type: an integer >= ``minimum``."""
    def parse(text: str) -> int:
        return _number(text, int, minimum, False, f"an integer >= {minimum}")
    parse.__name__ = f"integer >= {minimum}"
    return parse


def int_in_range(minimum: int, maximum: int):
    """argparse type: an integer from ``minimum`` to ``maximum``."""
    def parse(text: str) -> int:
        value = _number(text, int, minimum, False, f"an integer from {minimum} to {maximum}")
        if value > maximum:
            raise argparse.ArgumentTypeError(f"expected an integer from {minimum} to {maximum}, got {text!r}")
        return value
    parse.__name__ = f"integer from {minimum} to {maximum}"
    return parse


def add_tile_arguments(p: argparse.ArgumentParser) -> None:
    """``--tile`` and ``--tile-overlap`` (upscale, eval); read them back with :func:`tile_overlap`."""
    p.add_argument("--tile", type=int_at_least(4), default=None,
                   help="spatial tile size in input pixels, >= 4 (bounds memory on large frames)")
    p.add_argument("--tile-overlap", type=int_at_least(0), default=None,
                   help="overlap of neighbouring tiles in input pixels (default 16, or a quarter of a --tile under 64)")


def tile_overlap(args: argparse.Namespace) -> int | None:
    """The checked ``--tile-overlap`` (None: the default of :func:`megan_fast.inference.tile_overlap_for`).

    Raises:
        UsageError: an overlap as large as the tile.
    """
    if args.tile is None:
        if args.tile_overlap is not None:
            warnings.warn("--tile-overlap does nothing without --tile (whole frames are not cut into tiles)",
                          stacklevel=2)
        return None
    if args.tile_overlap is not None and args.tile_overlap >= args.tile:
        raise UsageError(f"--tile-overlap {args.tile_overlap} must be smaller than --tile {args.tile}")
    return args.tile_overlap


def add_rate_argument(p: argparse.ArgumentParser, what: str) -> None:
    """``--rate K`` (upscale, eval): an integer from 2 to the largest rate the tools run."""
    from megan_fast.inference import MAX_RATE

    p.add_argument("--rate", type=int_in_range(2, MAX_RATE), default=2,
                   help=f"{what}, an integer from 2 to {MAX_RATE}: the model makes the K - 1 frames between two "
                   "inputs (default 2; more needs a model that makes frames at any time: TMNet)")


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    return _number(text, float, 0.0, True, "a positive finite number")


def resolve_device(text: str | None, arg: str = "--device"):
    """``cpu``, ``cuda`` or ``cuda:N`` as a torch.device (None: cuda if available, else cpu).

    Raises:
        UsageError: another name, or a CUDA device this machine does not have.
    """
    import torch

    if text is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda") or (device.type == "cpu" and device.index not in (None, 0)):
        raise UsageError(f"{arg} {text!r}: expected cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"{arg} {text!r}: no CUDA device is available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"{arg} {text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def compute_dtype(device, name: str):
    """The autocast dtype for ``--dtype``: float16/bfloat16 only on CUDA (on a CPU: a warning, float32)."""
    import torch

    dtype = getattr(torch, name)
    if dtype != torch.float32 and device.type != "cuda":
        warnings.warn(f"--dtype {name} is for CUDA devices (on a CPU it is many times slower); "
                      f"running in float32 on {device.type}", stacklevel=2)
        return torch.float32
    return dtype


CHECKPOINT_HELP = ("model folder (config.json + model.safetensors), an official Zooming Slow-Mo or TMNet .pth file "
                   "(read with weights_only=True), or an ONNX file of megan-fast export (run by ONNX Runtime)")


def add_providers_argument(p: argparse.ArgumentParser) -> None:
    """``--providers`` (upscale, eval): ONNX Runtime's execution providers for an ONNX ``--checkpoint``."""
    p.add_argument("--providers", default=None, type=lambda t: [x.strip() for x in t.split(",") if x.strip()],
                   help="with an ONNX --checkpoint: ONNX Runtime execution providers in order, comma-separated "
                   "(default: TensorRT and CUDA when this build has them, then CPU)")


def is_onnx(checkpoint: str | None) -> bool:
    """Whether a ``--checkpoint`` names an ONNX file (run by ONNX Runtime, not PyTorch)."""
    return bool(checkpoint) and checkpoint.lower().endswith(".onnx")


def load_model(checkpoint: str, device, arg: str = "--checkpoint", providers=None, onnx: bool = False):
    """The model of a checkpoint folder or official ``.pth`` file (:func:`megan_fast.models.load_model`), on
    ``device``, in eval mode, or, where the command runs one (``onnx``), of an ONNX file
    (:func:`megan_fast.export.runtime.load_onnx`, with ``providers``); errors name the argument and file."""
    from megan_fast.errors import CheckpointError

    if not checkpoint or not checkpoint.strip():
        raise UsageError(f"{arg} is empty; give a model folder, a .pth or an .onnx file")
    if is_onnx(checkpoint) and not onnx:
        raise UsageError(f"{arg} {checkpoint!r}: an ONNX file runs in upscale and eval; this command needs the "
                         "PyTorch model (a model folder or a .pth)")
    try:
        if is_onnx(checkpoint):
            from megan_fast.export.runtime import load_onnx

            return load_onnx(checkpoint, providers)
        if providers:
            raise UsageError("--providers applies to an ONNX --checkpoint (megan-fast export); this one runs in "
                             "PyTorch")
        from megan_fast.models import load_model as load

        return load(checkpoint, map_location=device)
    except CheckpointError as exc:
        raise type(exc)(f"{arg}: {exc}") from None


def finite_float(text: str) -> float:
    """argparse type: any finite number."""
    return _number(text, float, -math.inf, False, "a finite number")


def frame_size(text: str) -> tuple[int, int]:
    """argparse type: a frame size ``HxW`` in pixels, e.g. ``144x176``."""
    import re

    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise argparse.ArgumentTypeError(f"expected HxW (height x width in pixels), e.g. 144x176, got {text!r}")
    return int(m.group(1)), int(m.group(2))


def frame_rate(text: str) -> float:
    """argparse type: a frame rate, 0.01 to 10000 frames per second."""
    value = _number(text, float, 0.0, True, "a frame rate in frames per second (0.01 to 10000)")
    if not 0.01 <= value <= 10000:
        raise argparse.ArgumentTypeError(f"expected a frame rate in frames per second (0.01 to 10000), got {text!r}")
    return value
