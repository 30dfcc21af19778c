"""Models out of Python: standard ONNX files that ONNX Runtime, TensorRT and VapourSynth's vs-mlrt run as they are.

:func:`to_onnx` exports a model of the family with PyTorch's own exporter
(``torch.onnx.export(dynamo=True)``), the four fused ops translated into
default-domain operators (:mod:`megan_fast.export.onnx_ops`);
:class:`megan_fast.export.runtime.OnnxModel` runs such a file where a
:class:`~megan_fast.models.MEGAN` goes (``upscale``/``eval --checkpoint
model.onnx``).  The file's interface (docs/DESIGN.md section 7):

- input ``frames``: (b, n, 3, H, W) RGB in [0, 1], float32 (or float16 for
  a float16 file); n fixed per file, b, H and W free (or H, W fixed with
  ``size``);
- input ``times`` (TMNet files exported with ``times="input"``): (b, k) in-between times,
  increasing in (0, 1), k fixed per file;
- output ``upscaled``: (b, n + (n - 1) k, 3, 4H, 4W), in time order.

The file's metadata (``metadata_props``) says all of it, with the model's config.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Sequence

import torch
from torch import Tensor, nn

from megan_fast.errors import UsageError

__all__ = ["INPUT", "OUTPUT", "TIMES", "to_onnx"]

INPUT, TIMES, OUTPUT = "frames", "times", "upscaled"
LAYOUT = "(b, n, 3, H, W) RGB in [0, 1] -> (b, n + (n - 1) k, 3, 4H, 4W) RGB in [0, 1], in time order"
DTYPES = {"float32": torch.float32, "float16": torch.float16}


class _Fixed(nn.Module):
    """The model with its in-between times fixed (None: the model's default, the halfway frame)."""

    def __init__(self, model: nn.Module, times: list[float] | None) -> None:
        super().__init__()
        self.model, self.times = model, times

    def forward(self, frames: Tensor) -> Tensor:
        return self.model(frames) if self.times is None else self.model(frames, times=self.times)


class _TimesInput(nn.Module):
    """The model with its in-between times as a second input, a (b, k) tensor."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, frames: Tensor, times: Tensor) -> Tensor:
        return self.model(frames, times=times)


def to_onnx(model: nn.Module, path: str | os.PathLike, *, dtype: str = "float32", frames: int | None = None,
            times: Sequence[float] | str | None = None, in_between: int = 1, size: tuple[int, int] | None = None,
            metadata: dict[str, str] | None = None) -> dict[str, str]:
    """Writes ``model`` (a :class:`~megan_fast.models.MEGAN` of any member of the family) as an ONNX file.

    Args:
        model: the network (its weights are copied; the model is left as it is).
        path: the file to write (the caller decides where: the command writes a temporary renamed into place).
        dtype: "float32" or "float16" (inputs, weights and outputs).
        frames: input frames per call (default: the model's window); other than the window only for
            architectures that take any number (Zooming Slow-Mo, TMNet).
        times: the in-between times: None (the model's default, the halfway frame), a list of increasing
            times in (0, 1) fixed in the file, or "input" (TMNet: a ``times`` input of shape (b, in_between)).
        in_between: with ``times="input"``: k, the in-between frames per pair of inputs (fixed per file).
        size: (H, W) to fix the input frame size (static shapes, for engines that want them); None: any.
        metadata: more ``metadata_props`` (a command's mark).

    Returns:
        The metadata written into the file.

    Raises:
        UsageError: an argument the model cannot take (one line naming it).
    """
    import onnx

    from megan_fast.export.onnx_ops import OPSET, translation_table
    from megan_fast.models.inputs import check_times

    cfg = model.config
    if dtype not in DTYPES:
        raise UsageError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    n = cfg.num_input_frames if frames is None else frames
    if n != cfg.num_input_frames and not (cfg.any_num_frames and n >= 2):
        raise UsageError(f"frames {n}: {cfg.family_name} takes exactly {cfg.num_input_frames} input frames")
    net = copy.deepcopy(model).eval().to(DTYPES[dtype])
    example = torch.rand(2, n, 3, *(size or (12, 16)), dtype=DTYPES[dtype])  # batch 2: not specialised as 1
    free = torch.export.Dim.AUTO
    frame_dims = {0: free} if size else {0: free, 3: free, 4: free}
    if size is None and cfg.global_skip:  # the MATLAB bicubic of the skip is built for one frame size
        raise UsageError("this model adds the bicubic baseline (global_skip, e.g. the demo checkpoint), whose "
                         "resize matrices depend on the frame size: export it at a fixed --size HxW")
    if times == "input":
        if not cfg.any_times:
            raise UsageError(f"times as an input needs a model that makes frames at any time (TMNet); this "
                             f"{cfg.family_name} model makes only the halfway frame")
        if not isinstance(in_between, int) or isinstance(in_between, bool) or in_between < 1:
            raise UsageError(f"in_between must be an integer >= 1, got {in_between!r}")
        k = in_between
        example_times = torch.arange(1, k + 1, dtype=DTYPES[dtype]).div(k + 1).expand(2, k).contiguous()
        wrapped, args, names = _TimesInput(net).eval(), (example, example_times), [INPUT, TIMES]
        dynamic = (frame_dims, {0: free})
        shown_times = "input"
    else:
        fixed = None if times is None else [float(t) for t in times]
        try:  # the model's own check of the times, with its message
            k = check_times(fixed, 1, cfg.time_modulation, example)[0]
        except ValueError as exc:
            raise UsageError(f"times: {str(exc).removeprefix('MEGAN: ')}") from None
        wrapped, args, names = _Fixed(net, fixed).eval(), (example,), [INPUT]
        dynamic = (frame_dims,)
        shown_times = json.dumps(fixed if fixed is not None else [0.5])
    with torch.no_grad():
        program = torch.onnx.export(wrapped, args, dynamo=True, custom_translation_table=translation_table(),
                                    opset_version=OPSET, input_names=names, output_names=[OUTPUT],
                                    dynamic_shapes=dynamic, verbose=False)
    meta = {
        "megan_fast.network": cfg.family_name,
        "megan_fast.config": json.dumps(model.config_dict()),
        "megan_fast.inputs": ", ".join(names),
        "megan_fast.layout": LAYOUT,
        "megan_fast.frames_in": str(n),
        "megan_fast.in_between": str(k),
        "megan_fast.times": shown_times,
        "megan_fast.dtype": dtype,
        "megan_fast.size": "any" if size is None else f"{size[0]}x{size[1]}",
        "megan_fast.scale": "4",
        **(metadata or {}),
    }
    proto = program.model_proto
    free_dims = [0] if size else [0, 3, 4]
    fixed = [d for d in free_dims if not proto.graph.input[0].type.tensor_type.shape.dim[d].dim_param]
    if fixed:  # the tracer specialised a dimension that should stay free: the file would lie about its sizes
        names = ", ".join(("batch", "", "", "height", "width")[d] for d in fixed)
        raise UsageError(f"this model cannot be exported with a free {names}: it depends on its value; "
                         "export at a fixed --size")
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    domains = sorted({node.domain for node in proto.graph.node} - {"", "ai.onnx"})
    if domains:  # a translation that left a custom op behind: a bug, not a user error
        raise RuntimeError(f"the exported graph has operators of non-standard domains {domains}")
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, os.fspath(path))
    return meta

