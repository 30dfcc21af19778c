"""ONNX export: standard operators only, ONNX Runtime (CPU) equal to our PyTorch forward, one-line errors.

Exporting traces the whole network (tens of seconds each): every file is
exported once per module and used by several tests.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx", reason="onnx is needed to export")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime runs the exported files")
pytest.importorskip("onnxscript", reason="onnxscript translates the ops")

from _media import decoded, make_video  # noqa: E402
from _models import tiny_model  # noqa: E402
from megan_fast.cli.main import main  # noqa: E402
from megan_fast.export import to_onnx  # noqa: E402
from megan_fast.export.runtime import OnnxModel  # noqa: E402
from megan_fast.inference import upscale_frames  # noqa: E402
from megan_fast.models import load_model  # noqa: E402


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def randomised(name, **overrides):
    """A tiny model with every weight off its initial value (zero-initialised offsets would hide the DCN)."""
    model = tiny_model(name, **overrides).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    return model


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """One export of each kind: tiny MEGAN (2 frames, any size, float32), Zooming Slow-Mo (3 frames, fixed 12x16,
    float16), TMNet (2 frames, times as an input, 3 per pair, fixed 12x16) and the demo checkpoint (4 frames, fixed
    8x8).  The export time grows with the frames and doubles with free sizes: the tiny ones take few frames."""
    root = tmp_path_factory.mktemp("onnx")
    models = {"megan": randomised("megan", num_input_frames=2), "zsm": randomised("zooming_slowmo", num_input_frames=3),
              "tmnet": randomised("tmnet", num_input_frames=2)}
    for name, model in models.items():
        model.save_pretrained(root / name)  # the same weights for the commands' PyTorch path
    to_onnx(models["megan"], root / "megan.onnx")
    # (the command's path: tests/test_export.py::test_export_command_writes_through_the_output_rules reads it)
    assert main(["export", str(root / "zsm"), str(root / "zsm16.onnx"), "--dtype", "float16", "--size", "12x16"]) == 0
    to_onnx(models["tmnet"], root / "tmnet.onnx", times="input", in_between=3, size=(12, 16))  # any size: megan
    torch.manual_seed(0)
    full = load_model(os.path.join(os.path.dirname(__file__), "..", "megan_fast", "checkpoints", "demo")).float()
    to_onnx(full, root / "full.onnx", size=(8, 8))
    return root, {**models, "full": full}


def run(path, frames, times=None):
    return OnnxModel(path, ["CPUExecutionProvider"])(frames, times=times)


def test_only_standard_operators_and_a_full_check(files):
    root, _ = files
    for name in ("megan", "zsm16", "tmnet", "full"):
        proto = onnx.load(root / f"{name}.onnx")
        onnx.checker.check_model(proto, full_check=True)
        assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"}, name
        assert {"DeformConv", "Resize"} <= {n.op_type for n in proto.graph.node}, name
        meta = {p.key: p.value for p in proto.metadata_props}
        assert meta["megan_fast.layout"].startswith("(b, n, 3, H, W) RGB in [0, 1]")
    meta = {p.key: p.value for p in onnx.load(root / "tmnet.onnx").metadata_props}
    assert meta["megan_fast.inputs"] == "frames, times" and meta["megan_fast.in_between"] == "3"
    assert [i.name for i in onnx.load(root / "megan.onnx").graph.input] == ["frames"]


def test_megan_equals_our_forward_at_two_frame_sizes_and_batches(files):
    root, models = files
    for shape in ((1, 2, 3, 12, 16), (2, 2, 3, 9, 14)):
        x = torch.rand(*shape, generator=torch.Generator().manual_seed(shape[-1]))
        with torch.no_grad():
            want = models["megan"](x)
        got = run(root / "megan.onnx", x)
        assert got.shape == want.shape and rel_l2(got, want) <= 1e-4, shape


def test_tmnet_equals_our_forward_at_two_sets_of_times(files):
    root, models = files
    x = torch.rand(2, 2, 3, 12, 16, generator=torch.Generator().manual_seed(1))
    for times in ([0.25, 0.5, 0.75], [0.1, 0.4, 0.9]):
        with torch.no_grad():
            want = models["tmnet"](x, times=times)
        got = run(root / "tmnet.onnx", x, times)
        assert got.shape == (2, 5, 3, 48, 64) and rel_l2(got, want) <= 1e-4, times


def test_zooming_slowmo_in_float16_is_close_to_float32(files):
    root, models = files
    x = torch.rand(1, 3, 3, 12, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = models["zsm"](x)
    got = run(root / "zsm16.onnx", x)
    assert rel_l2(got, want) <= 5e-3  # float16 throughout: about 1e-3


def test_the_full_size_megan_at_a_tiny_frame_size(files):
    root, models = files
    x = torch.rand(1, 4, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = models["full"](x)
    assert rel_l2(run(root / "full.onnx", x), want) <= 1e-4


def test_onnx_runtime_runs_on_torch_threads(files):
    root, _ = files
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        session = OnnxModel(root / "megan.onnx", ["CPUExecutionProvider"]).session
    finally:
        torch.set_num_threads(before)
    assert session.get_session_options().intra_op_num_threads == 2


def test_upscale_through_onnx_runtime_equals_the_pytorch_path(files, tmp_path, capsys):
    root, models = files
    clip = torch.rand(6, 3, 8, 12, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = upscale_frames(models["megan"], clip, tile=8)
    got = upscale_frames(OnnxModel(root / "megan.onnx", ["CPUExecutionProvider"]), clip, tile=8)
    assert rel_l2(got, want) <= 1e-4
    # the command: the same frames (8-bit) as the PyTorch model's, at 4x the frame rate with TMNet's file
    src = make_video(tmp_path / "in.mp4", frames=5, audio=False)
    for ckpt_arg, out in ((str(root / "tmnet"), "torch.mp4"), (str(root / "tmnet.onnx"), "onnx.mp4")):
        assert main(["upscale", src, str(tmp_path / out), "--checkpoint", ckpt_arg, "--rate", "4"]) == 0
    a, b = (np.stack(decoded(str(tmp_path / n))[1]).astype(int) for n in ("torch.mp4", "onnx.mp4"))
    assert a.shape == b.shape == (17, 48, 64, 3) and np.abs(a - b).max() <= 1


def test_bad_files_frames_sizes_and_providers_are_one_line(files, tmp_path, capsys):
    root, _ = files
    (tmp_path / "text.onnx").write_text("hello")
    src = make_video(tmp_path / "in.mp4", frames=4, audio=False)
    wide = make_video(tmp_path / "wide.mp4", frames=4, w=20, h=12, audio=False)
    cases = [
        (["upscale", src, str(tmp_path / "a.mp4"), "--checkpoint", str(tmp_path / "text.onnx")],
         "text.onnx: not a readable ONNX file"),
        (["upscale", src, str(tmp_path / "b.mp4"), "--checkpoint", str(root / "megan.onnx"), "--providers",
          "NoSuchExecutionProvider"], "--providers: 'NoSuchExecutionProvider' is not in this ONNX Runtime build"),
        (["upscale", wide, str(tmp_path / "c.mp4"), "--checkpoint", str(root / "zsm16.onnx")],
         "zsm16.onnx takes 12x16 frames (fixed at export), got 12x20"),
        (["upscale", src, str(tmp_path / "d.mp4"), "--checkpoint", str(root / "tmnet.onnx"), "--rate", "3"],
         "--rate 3: tmnet.onnx makes 3 in-between frame(s) per pair of inputs (exported with --rate 4), not 2"),
        (["upscale", src, str(tmp_path / "e.mp4"), "--checkpoint", str(root / "megan.onnx"), "--device", "cpu"],
         "--device applies to PyTorch models"),
        (["convert", str(root / "megan.onnx"), str(tmp_path / "m")], "an ONNX file runs in upscale and eval"),
    ]
    for argv, words in cases:
        rc = main(argv)
        err = capsys.readouterr().err
        assert rc == 2 and words in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, (argv, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.mp4", "text.onnx", "wide.mp4"]
    with pytest.raises(ValueError, match=r"megan.onnx takes 2 input frames per window, got 3"):
        run(root / "megan.onnx", torch.rand(1, 3, 3, 8, 8))


def test_export_command_writes_through_the_output_rules(files, tmp_path, capsys):
    root, _ = files
    from megan_fast import outputs

    out = root / "zsm16.onnx"  # written by the command in the fixture
    assert outputs.is_ours(str(out), ("export",)) and not outputs.is_ours(str(root / "megan.onnx"), ("export",))
    before = out.read_bytes()
    assert main(["export", str(root / "zsm"), str(out)]) == 2  # exists: --overwrite needed
    assert "pass --overwrite" in capsys.readouterr().err and out.read_bytes() == before
    ckpt = str(root / "zsm")
    for argv, words in ((["export", ckpt, str(tmp_path / "x.bin")], "must end in .onnx"),
                        (["export", ckpt, str(tmp_path / "y.onnx"), "--times-input"], "--times-input needs a model"),
                        (["export", ckpt, str(tmp_path / "z.onnx"), "--rate", "4"], "--rate 4 needs a model"),
                        (["export", ckpt, str(root / "zsm" / "w.onnx")], "lies inside the input CHECKPOINT")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert words in err and len(err.strip().splitlines()) == 1, err
    assert not list(tmp_path.iterdir())
    demo = os.path.join(os.path.dirname(__file__), "..", "megan_fast", "checkpoints", "demo")
    assert main(["export", demo, str(tmp_path / "demo.onnx")]) == 2
    assert "export it at a fixed --size HxW" in capsys.readouterr().err
