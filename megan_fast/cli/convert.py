"""``megan-fast convert SRC OUT_DIR``: a checkpoint in this package's format (config.json + model.safetensors).

SRC is an official Zooming Slow-Mo or TMNet ``.pth`` file (read with
``weights_only=True``) or a model folder; OUT_DIR is written as a whole,
atomically (a temporary folder renamed into place), and is checked before
anything is read (:mod:`megan_fast.outputs`).
"""

from __future__ import annotations

import argparse
import os

from megan_fast import outputs
from megan_fast.cli import _common
from megan_fast.errors import UsageError

# Names that promise a single weights file; convert writes a folder, which such a name would misdescribe.
WEIGHT_FILE_EXTENSIONS = (".safetensors", ".pth", ".pt", ".bin", ".ckpt", ".onnx", ".json", ".h5", ".npz", ".gguf", ".tar",
                          ".zip", ".pkl")
MODEL_KIND = outputs.MODEL_FOLDER_KIND


def add_parser(sub) -> None:
    p = sub.add_parser(
        "convert",
        help="write a checkpoint (e.g. an official Zooming Slow-Mo or TMNet .pth) as a model folder of this package",
        description="Reads SRC (an official Zooming Slow-Mo or TMNet .pth state dict, with or without DataParallel's "
        "'module.' prefix, or a model folder) and writes OUT_DIR with config.json and model.safetensors, which "
        "every command's --checkpoint and MEGAN.from_pretrained take.",
    )
    p.add_argument("src", metavar="SRC", help=_common.CHECKPOINT_HELP)
    p.add_argument("out_dir", metavar="OUT_DIR", help="the model folder to write (must not exist yet)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT_DIR if it is an earlier megan-fast model folder (never anything else)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not args.src or not args.src.strip():
        raise UsageError("SRC is empty; give a model folder or a .pth file")
    ext = os.path.splitext(args.out_dir.rstrip("/" + os.sep))[1].lower()
    if ext in WEIGHT_FILE_EXTENSIONS:
        raise UsageError(f"OUT_DIR {args.out_dir!r}: convert writes a folder (config.json + model.safetensors), not "
                         f"a {ext} file; give a folder name without the extension")
    out = outputs.check_output(args.out_dir, "OUT_DIR", MODEL_KIND, inputs=[("SRC", args.src)],
                               overwrite=args.overwrite)
    model = _common.load_model(args.src, "cpu", arg="SRC")
    with out.atomic_folder() as tmp:
        model.save_pretrained(tmp, written_by=outputs.written_by("model"))
    cfg = model.config
    arch = cfg.family_name
    params = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out_dir}: {arch}, {params:,} parameters (nf {cfg.nf}, {cfg.front_blocks} + "
          f"{cfg.back_blocks} residual blocks)")
    return 0
