"""What resume costs: ``megan-fast upscale`` in segments (the default, 256 output frames each, kept in a work
folder and joined at the end) against one pass (``--segment-frames 0``), same clip, same model, same encoder.

    python benchmarks/segments.py [--checkpoint DIR] [--frames N] [--size HxW] [--repeats R] [--device D]

The clip (H.264, a moving gradient, made here) is upscaled both ways,
each going first in turn, ``--repeats`` times after one warm-up run of
each; the medians of the wall times and of the process's CPU time (all
threads: steadier than the wall time on a shared machine) and their ratios
are printed.  The default checkpoint is the bundled demo model (full size).
Needs PyAV (video files).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import tempfile
import time

import numpy as np

from megan_fast.cli._common import DEMO_CHECKPOINT
from megan_fast.cli.main import main as megan_fast


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def make_clip(path: str, frames: int, h: int, w: int) -> None:
    import av

    with av.open(path, "w") as c:
        stream = c.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        y, x = np.mgrid[0:h, 0:w]
        for i in range(frames):
            pic = np.stack([(x * 4 + i * 3) % 256, (y * 4 + i) % 256, (x + y + 2 * i) % 256], -1).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pic, format="rgb24")):
                c.mux(packet)
        for packet in stream.encode():
            c.mux(packet)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=DEMO_CHECKPOINT)
    p.add_argument("--frames", type=int, default=300, help="input frames (output: 2 x frames - 1)")
    p.add_argument("--size", default="32x32", help="input frame size HxW")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    h, w = (int(v) for v in args.size.split("x"))
    with tempfile.TemporaryDirectory() as root:
        src = os.path.join(root, "in.mp4")
        make_clip(src, args.frames, h, w)
        times = {"segments of 256": [], "one pass": []}
        cpu = {"segments of 256": [], "one pass": []}
        pair = (("segments of 256", "256"), ("one pass", "0"))
        for r in range(-1, args.repeats):  # -1: a warm-up run of each, not counted
            for name, segment in pair if r % 2 else pair[::-1]:  # each goes first in turn
                out = os.path.join(root, f"{r}-{segment}.mp4")
                start, used = time.perf_counter(), cpu_seconds()
                rc = megan_fast(["upscale", src, out, "--checkpoint", args.checkpoint, "--device", args.device,
                                 "--segment-frames", segment, "--quiet"])
                if r >= 0:
                    times[name].append(time.perf_counter() - start)
                    cpu[name].append(cpu_seconds() - used)
                if rc != 0:
                    return rc
                os.remove(out)
    seg, one = (statistics.median(times[k]) for k in ("segments of 256", "one pass"))
    seg_cpu, one_cpu = (statistics.median(cpu[k]) for k in ("segments of 256", "one pass"))
    print(f"{args.frames} input frames of {h}x{w} -> {2 * args.frames - 1} output frames, {args.checkpoint}, "
          f"{args.device}, median of {args.repeats}")
    for name, values in times.items():
        print(f"  {name}: wall " + ", ".join(f"{v:.2f}" for v in values) + " s; CPU "
              + ", ".join(f"{v:.2f}" for v in cpu[name]) + " s")
    print(f"wall: one pass {one:.2f} s, segments of 256 {seg:.2f} s: segments cost {100 * (seg / one - 1):+.2f}%")
    print(f"CPU:  one pass {one_cpu:.2f} s, segments of 256 {seg_cpu:.2f} s: segments cost "
          f"{100 * (seg_cpu / one_cpu - 1):+.2f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
