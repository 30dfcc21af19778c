"""Peak CPU memory of forward+backward, fused vs peer, each measured in a fresh subprocess.

    python benchmarks/peak_memory.py [--quick]

Each case runs in its own process: inputs are made, the resident set size is
read, one forward+backward runs, and the growth of the peak resident set
(ru_maxrss) over the pre-run size is reported.  Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CASES = {
    # name: (setup code producing `step`, description)
    "dcn native": "s = b.dcn_step('native', b.dcn_inputs(b.DCN_CASES[0], requires_grad=True), True)",
    "dcn stock (torchvision)": "s = b.dcn_step('stock', b.dcn_inputs(b.DCN_CASES[0], requires_grad=True), True)",
    "attention n=7168 native": "s = b.attention_step('native', b.attention_inputs(7168, requires_grad=True), True)",
    "attention n=7168 stock (SDPA)": "s = b.attention_step('stock', b.attention_inputs(7168, requires_grad=True), True)",
    "attention n=7168 explicit": "s = b.attention_step('explicit', b.attention_inputs(7168, requires_grad=True), True)",
    "attention n=57600 b=1 native": "s = b.attention_step('native', b.attention_inputs(57600, b=1, requires_grad=True), True)",
    "attention n=57600 b=1 stock (SDPA)": "s = b.attention_step('stock', b.attention_inputs(57600, b=1, requires_grad=True), True)",
    "graph b=7 p=5 c=64 64x112 native": "s = b.graph_step('native', b.graph_inputs(requires_grad=True), True)",
    "graph b=7 p=5 c=64 64x112 formula": "s = b.graph_step('reference', b.graph_inputs(requires_grad=True), True)",
}

CHILD = """
import json, resource, sys, time
import torch
from megan_fast import benchmarking as b
{setup}
def rss_mib():
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * 4096 / 2**20
before = rss_mib()
t = time.perf_counter()
s()
elapsed = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({{"added_mib": peak - before, "seconds": elapsed}}))
"""


def measure(setup: str) -> dict:
    res = subprocess.run([sys.executable, "-c", CHILD.format(setup=setup)], capture_output=True, text=True)
    if res.returncode != 0:
        return {"error": (res.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="run the cases whose name contains this text")
    args = parser.parse_args()
    print("| case (float32, forward+backward) | peak memory added (MiB) | seconds (one cold run) |")
    print("|---|---|---|")
    for name, setup in CASES.items():
        if args.only not in name:
            continue
        r = measure(setup)
        if "error" in r:
            print(f"| {name} | failed: {r['error']} | |")
        else:
            print(f"| {name} | {r['added_mib']:.0f} | {r['seconds']:.2f} |")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
