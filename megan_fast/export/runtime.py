"""Running an exported file under ONNX Runtime where a :class:`~megan_fast.models.MEGAN` goes.

``megan-fast upscale / eval --checkpoint model.onnx`` load it with
:func:`load_onnx`: the windows, tiles, batches and rates of
:mod:`megan_fast.inference` are the same, the network is the file's.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from megan_fast.errors import CheckpointError, InputError, MissingCheckpointError, UsageError
from megan_fast.export import INPUT, OUTPUT, TIMES
from megan_fast.models.config import MEGANConfig

__all__ = ["OnnxModel", "default_providers", "load_onnx"]

# Tried in this order when the user names none: the first present in this ONNX Runtime build is used.
_PREFERRED = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def default_providers() -> list[str]:
    """CUDA (and TensorRT) when this ONNX Runtime build has them, else the CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    chosen = [p for p in _PREFERRED if p in available and p != "CPUExecutionProvider"]
    return chosen + ["CPUExecutionProvider"]


class OnnxModel:
    """An exported file as a model: ``model(frames, times=None)`` -> upscaled frames, with the model's ``config``.

    Args:
        path: an ONNX file written by :func:`megan_fast.export.to_onnx` (``megan-fast export``).
        providers: ONNX Runtime execution providers, in order of preference (default: :func:`default_providers`).

    ONNX Runtime runs on as many CPU threads as torch does (``torch.get_num_threads()``: ``OMP_NUM_THREADS`` or
    ``torch.set_num_threads``), so one setting bounds both runtimes.
    """

    def __init__(self, path: str | os.PathLike, providers: Sequence[str] | None = None) -> None:
        import onnxruntime as ort

        self.path = os.fspath(path)
        available = ort.get_available_providers()
        providers = list(providers) if providers else default_providers()
        unknown = [p for p in providers if p not in available]
        if unknown:
            raise UsageError(f"--providers: {unknown[0]!r} is not in this ONNX Runtime build; it has "
                             f"{', '.join(available)}")
        meta = _metadata(self.path)
        try:
            config = json.loads(meta["megan_fast.config"])
            self.frames_in = int(meta["megan_fast.frames_in"])
            self.in_between = int(meta["megan_fast.in_between"])
            self.times_input = meta["megan_fast.times"] == "input"
            self.fixed_times = None if self.times_input else json.loads(meta["megan_fast.times"])
            self.dtype = np.float16 if meta["megan_fast.dtype"] == "float16" else np.float32
            self.size = None if meta["megan_fast.size"] == "any" else tuple(int(v) for v in
                                                                           meta["megan_fast.size"].split("x"))
            self.config = MEGANConfig.from_dict({**config, "num_input_frames": self.frames_in}, source=self.path)
        except (KeyError, ValueError, TypeError) as exc:
            raise CheckpointError(f"{self.path}: an ONNX file without megan-fast's metadata ({exc}); export models "
                                  "with megan-fast export") from None
        try:
            options = ort.SessionOptions()
            options.intra_op_num_threads = torch.get_num_threads()
            self.session = ort.InferenceSession(self.path, options, providers=providers)
        except Exception as exc:  # noqa: BLE001 - ONNX Runtime's own errors: one line naming the file
            raise CheckpointError(f"{self.path}: ONNX Runtime cannot load it ({str(exc).splitlines()[0]})") from None
        self.providers = self.session.get_providers()

    # The parts of the nn.Module interface that inference and evaluation use.
    def eval(self) -> "OnnxModel":
        return self

    def parameters(self):
        yield torch.empty(0)

    def can_make(self, times: list[float] | None) -> str | None:
        """None if the file makes these in-between times (None: the halfway frame), else why not."""
        wanted = [0.5] if times is None else list(times)
        if self.times_input:
            if len(wanted) != self.in_between:
                return (f"{os.path.basename(self.path)} makes {self.in_between} in-between frame(s) per pair of "
                        f"inputs (exported with --rate {self.in_between + 1}), not {len(wanted)}")
            return None
        if not np.allclose(wanted, self.fixed_times):
            fixed = ", ".join(f"{t:g}" for t in self.fixed_times)
            return (f"{os.path.basename(self.path)} makes the frames at times {fixed} only (fixed at export; "
                    "export with --times-input for any times)")
        return None

    def __call__(self, frames: Tensor, times: list[float] | None = None) -> Tensor:
        b, n, _, h, w = frames.shape
        if n != self.frames_in:
            raise InputError(f"{self.path} takes {self.frames_in} input frames per window, got {n}")
        if self.size is not None and (h, w) != self.size:
            raise InputError(f"{self.path} takes {self.size[0]}x{self.size[1]} frames (fixed at export), got "
                             f"{h}x{w}; use --tile {min(self.size)} or export the file without --size")
        reason = self.can_make(times)
        if reason is not None:
            raise InputError(reason)
        feeds = {INPUT: frames.detach().cpu().numpy().astype(self.dtype, copy=False)}
        if self.times_input:
            row = np.asarray([0.5] if times is None else times, dtype=self.dtype)
            feeds[TIMES] = np.broadcast_to(row, (b, len(row))).copy()
        out = self.session.run([OUTPUT], feeds)[0]
        return torch.from_numpy(np.asarray(out, dtype=np.float32)).to(frames.device)


def _metadata(path: str) -> dict[str, str]:
    """The file's ``metadata_props`` (the graph's weights are not read)."""
    import onnx

    try:
        proto = onnx.load(path, load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - any bytes: "not an ONNX file"
        raise CheckpointError(f"{path}: not a readable ONNX file ({str(exc).splitlines()[0][:120]})") from None
    return {p.key: p.value for p in proto.metadata_props}


def load_onnx(path: str | os.PathLike, providers: Sequence[str] | None = None) -> OnnxModel:
    """:class:`OnnxModel` of ``path``; a missing file is a :class:`MissingCheckpointError`."""
    if not os.path.isfile(path):
        raise MissingCheckpointError(f"{os.fspath(path)}: no such ONNX file")
    return OnnxModel(path, providers)
