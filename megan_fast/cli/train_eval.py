"""``megan-fast train`` and ``megan-fast eval``."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys

from megan_fast import outputs
from megan_fast.cli import _common
from megan_fast.cli._common import int_at_least, resolve_device
from megan_fast.errors import InputError, UsageError
from megan_fast.evaluation import SAVED_FRAMES

JSON_KIND = outputs.Kind("JSON file of megan-fast eval", commands=("eval",))
EVAL_FRAMES_KIND = outputs.Kind("folder of evaluation frames", folder=True, entries=SAVED_FRAMES, nested=True)


def add_parsers(sub) -> None:
    p = sub.add_parser("train", help="train MEGAN from a YAML config (torchrun for several GPUs or nodes)",
                       description="Iteration-based training; see configs/megan_vimeo90k.yaml for every entry. "
                       "Run several processes with `torchrun --nproc_per_node N -m megan_fast train ...`. "
                       "The config, data and output folder are checked before anything is written.")
    p.add_argument("--config", required=True, help="YAML training config")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    p.add_argument("--output-dir", default=None, help="override output_dir of the config")
    p.add_argument("--iterations", type=int_at_least(1), default=None, help="override optim.iterations")
    p.add_argument("--stop-at", type=int_at_least(1), default=None,
                   help="stop after this iteration (checkpointed; the schedule is unchanged) to --resume later")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available, per local rank)")
    p.set_defaults(func=_train)

    p = sub.add_parser("eval", help="score a checkpoint with the papers' protocol (Y-channel PSNR/SSIM)",
                       description="Windows of 7 frames (stride 6, last aligned to the end), inputs = the "
                       "window's odd frames, outputs rounded to uint8, Y channel (BT.601), every frame scored once. "
                       "With --rate K (TMNet): windows of K(n - 1) + 1 frames for n input frames, inputs every "
                       "K-th frame, scores per time too.")
    p.add_argument("--checkpoint", required=True, help=_common.CHECKPOINT_HELP)
    p.add_argument("--data", required=True, help="folder of clip folders (Vid4/Adobe style) or a Vimeo-90K root")
    p.add_argument("--lq", default=None, help="pre-made LR frames (same layout); default: MATLAB bicubic x4")
    p.add_argument("--split", default="test", help="Vimeo-90K list: test, fast, medium or slow")
    p.add_argument("--json", default=None, help="write per-clip and average scores to this JSON file")
    p.add_argument("--save-frames", default=None, help="write the output frames (PNG) under this folder")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --json / --save-frames if they are earlier megan-fast outputs (never anything else)")
    _common.add_tile_arguments(p)
    p.add_argument("--device", default=None, help="cpu or cuda")
    _common.add_providers_argument(p)
    p.add_argument("--no-baseline", action="store_true", help="skip the bicubic + frame blending baseline")
    _common.add_rate_argument(p, "ground-truth frames per input frame (inputs are every K-th frame; K > 2 adds "
                              "scores per time to the table and the JSON)")
    p.set_defaults(func=_eval)


def _train(args: argparse.Namespace) -> int:
    from megan_fast.training import main_train

    if args.device is not None:
        resolve_device(args.device)
    result = main_train(args.config, output_dir=args.output_dir, iterations=args.iterations, resume=args.resume,
                        device=args.device, stop_at=args.stop_at)
    if int(os.environ.get("RANK", 0)) == 0:
        print(outputs.dumps(dataclasses.asdict(result)))
    return 0


def _check_clip_sizes(clips) -> None:
    """Every frame's size fits the x4 protocol, from the files' headers, before the model runs.

    Args:
        clips: (name, GT frame paths, LR frame paths or None) per clip.
    """
    from megan_fast.images import image_size

    for name, gt_paths, lq_paths in clips:
        sizes = {p: image_size(p) for p in gt_paths}
        w, h = sizes[gt_paths[0]]
        for path, size in sizes.items():
            if size != (w, h):
                raise InputError(f"clip {name!r}: frame {os.path.basename(path)} is {size[0]}x{size[1]} but "
                                 f"{os.path.basename(gt_paths[0])} is {w}x{h}; the frames of a clip must have one size")
        if lq_paths is None:
            if w % 4 or h % 4:
                raise InputError(f"clip {name!r}: frames are {w}x{h}; LR frames are made by x4 downscaling, so "
                                 "both sides must be multiples of 4 (crop the clip, or give --lq)")
            continue
        for path in lq_paths:
            lw, lh = image_size(path)
            if (4 * lw, 4 * lh) != (w, h):
                raise InputError(f"clip {name!r}: LR frame {os.path.basename(path)} is {lw}x{lh} but GT frames "
                                 f"are {w}x{h}; LR must be a quarter of GT in each dimension")


def _clip_source(args: argparse.Namespace):
    """The clips of ``--data`` (read and checked now), as a function that yields (name, gt, lq)."""
    from megan_fast import data

    rate = args.rate
    vimeo_layout = os.path.isdir(os.path.join(args.data, "sequences"))
    if vimeo_layout and rate != 2 and args.lq is not None:
        raise UsageError(f"--rate {rate} with the Vimeo-90K layout: its LR frames are those of frames 1, 3, 5, 7 "
                         "only; leave out --lq to make the LR of every ground-truth frame")
    try:
        if vimeo_layout:
            ds = data.Vimeo90KSeptuplet(args.data, split=args.split, lq_root=args.lq)
            _check_clip_sizes(
                (key, [os.path.join(ds.seq_dir, key, f"im{i}.png") for i in range(1, 8)],
                 [os.path.join(ds.lq_seq_dir, key, f"im{i}.png") for i in range(1, 8, 2)] if ds.lq_seq_dir else None)
                for key in ds.keys)

            def clip(i):
                item = ds[i]  # test splits: whole septuplet, LR of frames 1, 3, 5, 7
                if rate != 2:  # inputs every rate-th frame: the LR of every frame, made by the protocol
                    return item["key"], item["gt"], None
                # One 7-frame window whose inputs are the odd frames: the even slots are never read.
                lq = item["lq"].new_zeros(7, *item["lq"].shape[1:])
                lq[0::2] = item["lq"]
                return item["key"], item["gt"], lq

            def vimeo(select=None):
                for i in range(len(ds)):
                    if select is None:
                        yield clip(i)
                    elif select(i):
                        yield i, clip(i)

            return vimeo
        folders = data.VideoFolderClips(args.data, lq_root=args.lq, mode="eval")
        _check_clip_sizes((n, folders.gt_paths[n], folders.lq_paths.get(n)) for n in folders.clip_names)
        return folders.iter_clips
    except (ValueError, OSError) as exc:
        raise InputError(f"--data {args.data!r}: {exc}") from None


def _eval(args: argparse.Namespace) -> int:
    from megan_fast.distributed import init_processes
    from megan_fast.evaluation import evaluate, format_table
    from megan_fast.inference import check_rate

    if not os.path.exists(args.checkpoint):
        raise InputError(f"--checkpoint {args.checkpoint!r}: no such folder or file")
    for label, path in (("--data", args.data), ("--lq", args.lq)):
        if path is not None and not os.path.isdir(path):
            raise InputError(f"{label} {path!r} is not a folder")
    inputs = [("--checkpoint", args.checkpoint), ("--data", args.data), ("--lq", args.lq)]
    frames_out = json_out = None
    if args.save_frames is not None:
        frames_out = outputs.check_output(args.save_frames, "--save-frames", EVAL_FRAMES_KIND, inputs=inputs,
                                          overwrite=args.overwrite)
    if args.json is not None:
        json_out = outputs.check_output(args.json, "--json", JSON_KIND,
                                        inputs=[*inputs, ("--save-frames", args.save_frames)],
                                        overwrite=args.overwrite)
    overlap = _common.tile_overlap(args)
    if _common.is_onnx(args.checkpoint) and args.device is not None:
        raise UsageError("--device applies to PyTorch models; an ONNX --checkpoint runs on its --providers")
    # torchrun: each process scores its share of the clips on its own device; the report is one process's.
    if args.device is not None and not _common.is_onnx(args.checkpoint):
        resolve_device(args.device)  # checked first: one line for a device this machine lacks
    world, device = init_processes("cpu" if _common.is_onnx(args.checkpoint) else args.device)
    model = _common.load_model(args.checkpoint, device, providers=args.providers, onnx=True)
    try:
        check_rate(model, args.rate, "--rate")
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    clips = _clip_source(args)
    try:
        with contextlib.ExitStack() as stack:
            save_dir = None
            if frames_out is not None:  # one folder for every process's frames, renamed by the first one
                save_dir = world.broadcast(stack.enter_context(frames_out.atomic_folder()) if world.rank == 0
                                           else None)
            report = evaluate(model, clips(world.mine) if world.distributed else clips(), device=device,
                              tile=args.tile, tile_overlap=overlap, save_dir=save_dir,
                              baselines=not args.no_baseline, progress=lambda s: print(s, file=sys.stderr),
                              rate=args.rate, world=world if world.distributed else None)
            world.barrier()  # every process's frames are written before the folder is renamed
    except (FileNotFoundError, ValueError) as exc:
        if isinstance(exc, outputs.OutputError):
            raise
        raise InputError(f"--data {args.data!r}: {exc}") from None
    if not report["clips"]:
        raise UsageError(f"--data {args.data!r}: no clips to score")
    if world.rank == 0:
        print(format_table(report))
        if json_out is not None:
            outputs.write_json(report, json_out, "eval")
    return 0
