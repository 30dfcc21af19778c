"""``megan-fast demo`` with a tiny random model on tiny clips."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os

import numpy as np
import pytest
import torch

av = pytest.importorskip("av", reason="PyAV is needed for the demo video")
pytest.importorskip("skimage", reason="the demo films a photo bundled with scikit-image")

from megan_fast.cli import demo  # noqa: E402
from megan_fast.cli.main import main  # noqa: E402
from megan_fast.models import MEGAN  # noqa: E402

from _models import TINY_MEGAN as SMALL  # noqa: E402
H, W = 32, 48  # GT size of most tests (LR 8x12)


def run_demo(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["demo", *argv])
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    MEGAN(**SMALL).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def result(checkpoint, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("demo") / "out")
    rc, stdout, stderr = run_demo("--checkpoint", checkpoint, "--size", f"{H}x{W}", "--no-bench", "--output", out)
    return {"rc": rc, "out": out, "stdout": stdout, "stderr": stderr}


def read_png(path: str) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        assert img.mode == "RGB"
        return np.asarray(img)


def test_demo_writes_every_output(result):
    assert result["rc"] == 0, result["stderr"]
    out = result["out"]
    assert sorted(os.listdir(out)) == ["frames", "metrics.json", "side_by_side.mp4", "strip.png"]
    frames = sorted(os.listdir(os.path.join(out, "frames")))
    assert frames == [f"megan_{i:03d}.png" for i in range(7)]
    assert read_png(os.path.join(out, "frames", frames[0])).shape == (H, W, 3)
    assert "re-made inputs (4)" in result["stdout"] and "interpolated (3)" in result["stdout"]
    assert out in result["stdout"]


def test_strip_layout(result, checkpoint):
    strip = read_png(os.path.join(result["out"], "strip.png"))
    gap = demo.GAP
    assert strip.shape == (2 * H + gap, 4 * W + 3 * gap, 3)
    assert (strip[H : H + gap] == 255).all()  # gap between the rows
    with open(os.path.join(result["out"], "metrics.json")) as f:
        shown = json.load(f)["strip_frames"]
    assert shown == [2, 3]  # a re-made input frame, then the middle interpolated frame
    gt, lq = demo.make_demo_clip("chelsea", 7, (H, W))
    gt8 = gt.mul(255).round().byte().permute(0, 2, 3, 1).numpy()
    lq8 = lq.mul(255).round().byte().permute(0, 2, 3, 1).numpy()
    for row, t in enumerate(shown):
        top = row * (H + gap)
        panels = [strip[top : top + H, i * (W + gap) : i * (W + gap) + W] for i in range(4)]
        np.testing.assert_array_equal(panels[3], gt8[t])  # ground truth, last
        # LR: nearest x4 of input t // 2 (the previous input for the interpolated frame).
        np.testing.assert_array_equal(panels[0], lq8[t // 2].repeat(4, 0).repeat(4, 1))
        megan = read_png(os.path.join(result["out"], "frames", f"megan_{t:03d}.png"))
        np.testing.assert_array_equal(panels[2], megan)


def test_video_has_every_frame_at_twice_the_rate(result):
    with av.open(os.path.join(result["out"], "side_by_side.mp4")) as c:
        stream = c.streams.video[0]
        assert stream.codec_context.name == "h264"
        assert float(stream.average_rate) == pytest.approx(4.0)  # --fps 2 (default) x 2
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(stream)]
    assert len(frames) == 7
    assert frames[0].shape == (H, 4 * W + 3 * demo.GAP, 3)


def test_metrics_json(result):
    with open(os.path.join(result["out"], "metrics.json")) as f:
        report = json.load(f)
    assert report["bench"] is None
    assert report["clip"]["gt_size"] == [H, W] and report["clip"]["lr_size"] == [H // 4, W // 4]
    for method in ("megan", "bicubic"):
        m = report["metrics"][method]
        assert [m[k]["frames"] for k in ("inputs", "interpolated", "all")] == [4, 3, 7]
        for key in ("inputs", "interpolated", "all"):
            assert math.isfinite(m[key]["psnr_y"]) and 0 < m[key]["ssim_y"] <= 1
        assert m["all"]["psnr_y"] == pytest.approx(np.mean(m["per_frame"]["psnr_y"]))
        assert m["inputs"]["psnr_y"] == pytest.approx(np.mean(m["per_frame"]["psnr_y"][0::2]))
    # A random model is far from bicubic; a trained one would be above it.
    assert report["metrics"]["bicubic"]["all"]["psnr_y"] > 20


def test_scores_follow_the_evaluation_protocol(result):
    """Bicubic figures match megan_fast.evaluation (numpy BasicSR metrics); MEGAN's match its saved frames."""
    from megan_fast.evaluation import bicubic_blend, predict_clip, score_clip

    with open(os.path.join(result["out"], "metrics.json")) as f:
        metrics = json.load(f)["metrics"]
    gt, lq = demo.make_demo_clip("chelsea", 7, (H, W))
    lq_all = lq.new_zeros(7, *lq.shape[1:])
    lq_all[0::2] = lq  # the protocol reads the window's odd (1-based) frames only
    ref = score_clip(predict_clip(bicubic_blend, gt, lq_all, 4), gt)
    assert metrics["bicubic"]["all"]["psnr_y"] == pytest.approx(ref.psnr_y, abs=1e-6)
    assert metrics["bicubic"]["all"]["ssim_y"] == pytest.approx(ref.ssim_y, abs=1e-6)
    frames = {
        i: torch.from_numpy(read_png(os.path.join(result["out"], "frames", f"megan_{i:03d}.png")).copy())
        .permute(2, 0, 1).float().div(255)
        for i in range(7)
    }
    mine = score_clip(frames, gt)
    assert metrics["megan"]["all"]["psnr_y"] == pytest.approx(mine.psnr_y, abs=1e-6)


def test_lr_frames_are_made_as_the_training_data_makes_them(tmp_path):
    from megan_fast.data import Vimeo90KSeptuplet
    from megan_fast.data.synthetic import write_vimeo_layout

    gt, lq = demo.make_demo_clip("chelsea", 7, (H, W), seed=3)
    write_vimeo_layout(str(tmp_path), [gt])
    item = Vimeo90KSeptuplet(str(tmp_path), split="test")[0]
    assert torch.equal(item["gt"], gt)
    assert torch.equal(item["lq"], lq)


def test_bench_and_a_longer_clip(checkpoint, tmp_path):
    from megan_fast.images import write_png

    out = str(tmp_path / "out")
    os.makedirs(os.path.join(out, "frames"))
    stale = os.path.join(out, "frames", "megan_011.png")  # from an earlier run with more frames
    write_png(torch.zeros(3, 4, 4), stale)
    rc, stdout, stderr = run_demo("--checkpoint", checkpoint, "--size", "16x16", "--frames", "9",
                                  "--bench-runs", "1", "--output", out)
    assert rc == 0, stderr
    with open(os.path.join(out, "metrics.json")) as f:
        report = json.load(f)
    bench = report["bench"]
    assert bench["runs"] == 1
    assert bench["auto_s"] > 0 and bench["stock_s"] > 0
    assert bench["speedup"] == pytest.approx(bench["stock_s"] / bench["auto_s"])
    assert bench["auto_backends"] and set(bench["auto_backends"].values()) <= {"native", "triton", "reference",
                                                                                "stock"}
    assert "stock" in stdout and f"{bench['speedup']:.2f}x" in stdout
    assert report["metrics"]["megan"]["all"]["frames"] == 9
    assert sorted(os.listdir(os.path.join(out, "frames"))) == [f"megan_{i:03d}.png" for i in range(9)]


def test_missing_checkpoint(tmp_path, monkeypatch):
    missing = str(tmp_path / "no_such_checkpoint")
    out = str(tmp_path / "out")
    rc, _, stderr = run_demo("--checkpoint", missing, "--output", out, "--no-bench")
    assert rc != 0
    assert missing in stderr and "--checkpoint" in stderr
    assert not os.path.exists(out)
    # The default (bundled) checkpoint, when it is not installed.
    monkeypatch.setattr(demo, "DEMO_CHECKPOINT", str(tmp_path / "bundled"))
    rc, _, stderr = run_demo("--output", out, "--no-bench")
    assert rc != 0
    assert str(tmp_path / "bundled") in stderr and "pass --checkpoint" in stderr


def test_refuses_a_foreign_folder_unless_overwrite(checkpoint, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    args = ("--checkpoint", checkpoint, "--size", "16x16", "--no-bench", "--output", str(out))
    rc, _, stderr = run_demo(*args)
    assert rc != 0
    assert "notes.txt" in stderr and "--overwrite" in stderr
    assert os.listdir(out) == ["notes.txt"]
    rc, _, stderr = run_demo(*args, "--overwrite")
    assert rc == 0, stderr
    assert (out / "notes.txt").read_text() == "keep me"
    assert (out / "strip.png").is_file() and (out / "side_by_side.mp4").is_file()


def test_check_output(tmp_path):
    from megan_fast import outputs
    from megan_fast.images import write_png

    assert demo.check_output(str(tmp_path / "new"), overwrite=False).path == str(tmp_path / "new")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(outputs.OutputError, match="is a file"):
        demo.check_output(str(tmp_path / "afile"), overwrite=True)
    own = tmp_path / "own"
    (own / "frames").mkdir(parents=True)
    for name in ("strip.png", "frames/megan_000.png"):
        write_png(torch.zeros(3, 4, 4), str(own / name))
    (own / ".megan-fast-a1b2c3d4.mp4").write_bytes(b"")  # a temporary left by a killed run
    demo.check_output(str(own), overwrite=False)  # a re-run needs no --overwrite
    (own / "frames" / "holiday.jpg").write_bytes(b"")
    with pytest.raises(outputs.OutputError, match="frames/holiday.jpg"):
        demo.check_output(str(own), overwrite=False)
    demo.check_output(str(own), overwrite=True)  # written beside, left alone
    (own / "metrics.json").write_text("{}")  # one of the demo's names, but not megan-fast's file
    with pytest.raises(outputs.OutputError, match="not a JSON file that megan-fast wrote"):
        demo.check_output(str(own), overwrite=True)


def test_bad_arguments(checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--size", "30x48"])
    assert exc.value.code == 2
    assert "multiples of 4" in capsys.readouterr().err
    out = str(tmp_path / "out")
    rc, _, stderr = run_demo("--checkpoint", checkpoint, "--frames", "6", "--output", out)
    assert rc == 2 and "--frames" in stderr
    rc, _, stderr = run_demo("--checkpoint", checkpoint, "--frames", "5", "--output", out, "--no-bench")
    assert rc == 2 and "needs at least 4" in stderr
    rc, _, stderr = run_demo("--checkpoint", checkpoint, "--photo", "nosuchphoto", "--output", out, "--no-bench")
    assert rc == 2 and "nosuchphoto" in stderr
    assert not os.path.exists(out)


def test_a_foreign_frame_is_found_before_any_work(checkpoint, tmp_path):
    out = tmp_path / "out"
    (out / "frames").mkdir(parents=True)
    from PIL import Image

    Image.new("RGB", (4, 4)).save(out / "frames" / "megan_000.png")  # the user's, with the demo's name
    for extra in ((), ("--overwrite",)):
        rc, stdout, stderr = run_demo("--checkpoint", checkpoint, "--size", "16x16", "--no-bench",
                                      "--output", str(out), *extra)
        assert rc == 2 and "megan_000.png" in stderr and "MEGAN:" not in stdout
    assert sorted(os.listdir(out)) == ["frames"] and os.listdir(out / "frames") == ["megan_000.png"]


def test_a_failed_first_run_leaves_no_folder(checkpoint, tmp_path, monkeypatch):
    out = tmp_path / "out"

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(demo, "_write_frames", broken)
    rc, _, stderr = run_demo("--checkpoint", checkpoint, "--size", "16x16", "--no-bench", "--output", str(out))
    assert rc == 1 and "No space left on device" in stderr
    assert os.listdir(tmp_path) == []


def test_frame_rates_are_ranged(capsys):
    for value in ("0.0001", "nan", "-2", "1e9"):
        with pytest.raises(SystemExit):
            main(["demo", "--fps", value])
        assert "argument --fps: expected a frame rate" in capsys.readouterr().err
