"""Our PyTorch path against ONNX Runtime on the exported graph, on the CPU, in one run.

    python benchmarks/onnx_cpu.py [--only model,dcn] [--repeats R]

- model: the demo checkpoint (full-size MEGAN), one window 64x112 -> 7 frames
  of 256x448: ``model(x)`` (our kernels, ``auto``) against an
  ``onnxruntime.InferenceSession`` on the file that ``megan_fast.export.to_onnx``
  writes of the same model (fixed at 64x112, float32, all graph optimisations).
- dcn: our DCN forward against ONNX Runtime's ``DeformConv`` (a one-node
  graph) at MEGAN's shapes (benchmarking.DCN_CASES: 64 channels, 3x3,
  8 offset groups, mask and bias; b4 64x112 and b16 32x32).

Both run with the same number of threads (torch's, given to ONNX Runtime as
its intra-op threads); denormals are flushed to zero, as ``upscale`` and
``eval`` do on the CPU.  Medians of ``megan_fast.benchmarking.median_seconds``.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import numpy as np
import torch

from megan_fast.benchmarking import DCN_CASES, dcn_inputs, dcn_step, median_seconds
from megan_fast.cli._common import DEMO_CHECKPOINT
from megan_fast.ops import modulated_deform_conv2d


def session(path: str):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Its threads would otherwise spin between runs and take the cores from the PyTorch runs timed beside them.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def bench_model(repeats: int) -> None:
    from megan_fast.export import INPUT, to_onnx
    from megan_fast.models import load_model

    model = load_model(DEMO_CHECKPOINT).float().eval()
    x = torch.rand(1, 4, 3, 64, 112, generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as root:
        path = os.path.join(root, "demo.onnx")
        to_onnx(model, path, size=(64, 112))

        def ours():
            with torch.no_grad():
                model(x)

        t_ours = median_seconds(ours, min_run_time=repeats * 5.0)  # before ONNX Runtime's threads exist
        sess = session(path)
        feeds = {INPUT: x.numpy()}
        t_ort = median_seconds(lambda: sess.run(None, feeds), min_run_time=repeats * 5.0)
        with torch.no_grad():
            want = model(x).numpy()
        got = sess.run(None, feeds)[0]
        err = float(np.linalg.norm(got - want) / np.linalg.norm(want))
    print("| workload | ours (PyTorch, auto) | ONNX Runtime (CPU) | ours faster by |")
    print("|---|---|---|---|")
    print(f"| demo MEGAN, one window 64x112 -> 7 x 256x448 | {t_ours:.2f} s | {t_ort:.2f} s | "
          f"{t_ort / t_ours:.2f}x |")
    print(f"(relative L2 of ONNX Runtime's output to ours: {err:.1e})")


def deform_conv_graph(case, path: str) -> None:
    """One DeformConv node (opset 19) with the weights and bias as initialisers."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inputs = dcn_inputs(case)
    c, k, g = case.channels, case.kernel, case.offset_groups
    node = helper.make_node("DeformConv", ["x", "w", "offset", "b", "mask"], ["y"], kernel_shape=[k, k],
                            pads=[1, 1, 1, 1], strides=[1, 1], dilations=[1, 1], group=1, offset_group=g)
    dims = ("b", "h", "w")
    graph = helper.make_graph(
        [node], "dcn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [dims[0], c, dims[1], dims[2]]),
         helper.make_tensor_value_info("offset", TensorProto.FLOAT, [dims[0], 2 * g * k * k, dims[1], dims[2]]),
         helper.make_tensor_value_info("mask", TensorProto.FLOAT, [dims[0], g * k * k, dims[1], dims[2]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [dims[0], c, dims[1], dims[2]])],
        [numpy_helper.from_array(inputs["weight"].numpy(), "w"), numpy_helper.from_array(inputs["bias"].numpy(), "b")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)]), path)


def bench_dcn() -> None:
    print("| case | ours fwd | ONNX Runtime DeformConv | ours faster by |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as root:
        for case in DCN_CASES:
            path = os.path.join(root, f"{case.name}.onnx")
            deform_conv_graph(case, path)
            inputs = dcn_inputs(case)
            t_ours = median_seconds(dcn_step("auto", inputs, backward=False))
            sess = session(path)
            feeds = {n: inputs[key].numpy() for n, key in (("x", "input"), ("offset", "offset"), ("mask", "mask"))}
            t_ort = median_seconds(lambda: sess.run(None, feeds))
            with torch.no_grad():
                want = modulated_deform_conv2d(inputs["input"], inputs["offset"], inputs["weight"], inputs["bias"],
                                               1, 1, 1, inputs["mask"]).numpy()
            got = sess.run(None, feeds)[0]
            assert np.abs(got - want).max() <= 1e-3 * np.abs(want).max(), case.name  # the same operation
            del sess
            print(f"| {case.name} | {t_ours * 1e3:.1f} ms | {t_ort * 1e3:.1f} ms | {t_ort / t_ours:.2f}x |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default="model,dcn", help="comma-separated: model, dcn")
    p.add_argument("--repeats", type=int, default=3, help="about this many calls of the whole model each")
    args = p.parse_args()
    torch.set_flush_denormal(True)  # as upscale and eval run on the CPU (the recurrent states decay into denormals)
    print(f"threads: {torch.get_num_threads()}")
    parts = set(args.only.split(","))
    if "dcn" in parts:
        bench_dcn()
    if "model" in parts:
        bench_model(args.repeats)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
