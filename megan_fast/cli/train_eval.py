"""``megan-fast train`` and ``megan-fast eval``."""

from __future__ import annotations

import argparse
import os
import sys


def add_parsers(sub) -> None:
    p = sub.add_parser("train", help="train MEGAN from a YAML config (torchrun for several GPUs or nodes)",
                       description="Iteration-based training; see configs/megan_vimeo90k.yaml for every entry. "
                       "Run several processes with `torchrun --nproc_per_node N -m megan_fast train ...`.")
    p.add_argument("--config", required=True, help="YAML training config")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    p.add_argument("--output-dir", default=None, help="override output_dir of the config")
    p.add_argument("--iterations", type=int, default=None, help="override optim.iterations")
    p.add_argument("--stop-at", type=int, default=None,
                   help="stop after this iteration (checkpointed; the schedule is unchanged) to --resume later")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available, per local rank)")
    p.set_defaults(func=_train)

    p = sub.add_parser("eval", help="score a checkpoint with the papers' protocol (Y-channel PSNR/SSIM)",
                       description="Windows of 7 frames (stride 6, last aligned to the end), inputs = the "
                       "window's odd frames, outputs rounded to uint8, Y channel (BT.601), every frame scored once.")
    p.add_argument("--checkpoint", required=True, help="model folder (config.json + model.safetensors)")
    p.add_argument("--data", required=True, help="folder of clip folders (Vid4/Adobe style) or a Vimeo-90K root")
    p.add_argument("--lq", default=None, help="pre-made LR frames (same layout); default: MATLAB bicubic x4")
    p.add_argument("--split", default="test", help="Vimeo-90K list: test, fast, medium or slow")
    p.add_argument("--json", default=None, help="write per-clip and average scores to this JSON file")
    p.add_argument("--save-frames", default=None, help="write the output frames (PNG) under this folder")
    p.add_argument("--tile", type=int, default=None, help="spatial tile size in input pixels")
    p.add_argument("--device", default=None, help="cpu or cuda")
    p.add_argument("--no-baseline", action="store_true", help="skip the bicubic + frame blending baseline")
    p.set_defaults(func=_eval)


def _train(args: argparse.Namespace) -> int:
    from megan_fast.training import ConfigError, main_train

    try:
        return main_train(args)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"megan-fast train: error: {exc}", file=sys.stderr)
        return 2


def _clips(args):
    from megan_fast import data

    if os.path.isdir(os.path.join(args.data, "sequences")):
        ds = data.Vimeo90KSeptuplet(args.data, split=args.split, lq_root=args.lq)
        for i in range(len(ds)):
            item = ds[i]  # test splits: whole septuplet, LR of frames 1, 3, 5, 7
            # One 7-frame window whose inputs are the odd frames: the even slots are never read.
            lq = item["lq"].new_zeros(7, *item["lq"].shape[1:])
            lq[0::2] = item["lq"]
            yield item["key"], item["gt"], lq
        return
    yield from data.VideoFolderClips(args.data, lq_root=args.lq, mode="eval").iter_clips()


def _eval(args: argparse.Namespace) -> int:
    import torch

    from megan_fast.evaluation import evaluate, format_table, write_json
    from megan_fast.models import MEGAN

    for label, path in (("--checkpoint", args.checkpoint), ("--data", args.data), ("--lq", args.lq)):
        if path is not None and not os.path.isdir(path):
            print(f"megan-fast eval: error: {label} {path!r} is not a folder", file=sys.stderr)
            return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        model = MEGAN.from_pretrained(args.checkpoint).to(device)
        report = evaluate(model, _clips(args), device=device, tile=args.tile, save_dir=args.save_frames,
                          baselines=not args.no_baseline, progress=lambda s: print(s, file=sys.stderr))
    except (ValueError, FileNotFoundError) as exc:
        print(f"megan-fast eval: error: {exc}", file=sys.stderr)
        return 2
    print(format_table(report))
    if args.json:
        write_json(report, args.json)
    return 0
