"""``megan-fast export CHECKPOINT OUT.onnx``: a model as a standard ONNX file (docs/DESIGN.md section 7).

CHECKPOINT is what every ``--checkpoint`` takes (a model folder of ours or an
official ``.pth``); OUT.onnx is checked before anything is read and written
atomically (:mod:`megan_fast.outputs`), carrying megan-fast's mark in its
metadata.
"""

from __future__ import annotations

import argparse
import os
import time

from megan_fast import outputs
from megan_fast.cli import _common
from megan_fast.errors import UsageError

ONNX_KIND = outputs.Kind("ONNX file of megan-fast export", commands=("export",))


def add_parser(sub) -> None:
    p = sub.add_parser(
        "export",
        help="write a model as a standard ONNX file (ONNX Runtime, TensorRT, vs-mlrt)",
        description="Exports CHECKPOINT (a model folder or an official Zooming Slow-Mo or TMNet .pth) to OUT.onnx: "
        "input 'frames' (b, n, 3, H, W) RGB in [0, 1], output 'upscaled' (b, n + (n - 1) k, 3, 4H, 4W); "
        "batch, height and width free; only default-domain ONNX operators (opset 19: DeformConv, Resize, ...).",
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT", help=_common.CHECKPOINT_HELP)
    p.add_argument("out", metavar="OUT.onnx", help="the ONNX file to write")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16"),
                   help="the file's inputs, weights and outputs (default float32)")
    _common.add_rate_argument(p, "output frame rate / input frame rate the file makes (times i/K fixed in the file)")
    p.add_argument("--times-input", action="store_true",
                   help="TMNet: take the in-between times as a second input 'times' (b, K - 1) instead of fixing them")
    p.add_argument("--frames", type=_common.int_at_least(2), default=None,
                   help="input frames per call (default: the model's window; Zooming Slow-Mo and TMNet take any n >= 2)")
    p.add_argument("--size", type=_common.frame_size, default=None, metavar="HxW",
                   help="fix the input frame size (static shapes, for engines that want them); default: any size")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT.onnx if it is an earlier megan-fast export (never anything else)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from megan_fast.export import to_onnx
    from megan_fast.inference import check_rate

    if not args.out.lower().endswith(".onnx"):
        raise UsageError(f"OUT.onnx {args.out!r}: the file to write must end in .onnx")
    out = outputs.check_output(args.out, "OUT.onnx", ONNX_KIND, inputs=[("CHECKPOINT", args.checkpoint)],
                               overwrite=args.overwrite)
    model = _common.load_model(args.checkpoint, "cpu", arg="CHECKPOINT")
    try:
        times = check_rate(model, args.rate, "--rate")
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.times_input and not model.config.any_times:
        raise UsageError(f"--times-input needs a model that makes frames at any time (TMNet); this "
                         f"{model.config.family_name} model makes only the halfway frame")
    start = time.perf_counter()
    print(f"exporting {args.checkpoint} ({model.config.family_name}) to ONNX: tracing takes a minute or more",
          flush=True)
    with out.atomic_file() as tmp:
        meta = to_onnx(model, tmp, dtype=args.dtype, frames=args.frames,
                       times="input" if args.times_input else times, in_between=args.rate - 1, size=args.size,
                       metadata={"written_by": outputs.written_by("export")})
    size_mb = os.path.getsize(out.path) / 2**20
    print(f"wrote {args.out} ({size_mb:.1f} MiB, {args.dtype}, {time.perf_counter() - start:.0f} s): "
          f"inputs {meta['megan_fast.inputs']}, {meta['megan_fast.frames_in']} frames in, "
          f"{meta['megan_fast.in_between']} in-between frame(s) per pair, frame size {meta['megan_fast.size']}")
    return 0
