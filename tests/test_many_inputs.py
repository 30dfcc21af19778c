"""``megan-fast upscale`` on many inputs, resumed after SIGKILL, and shared by processes under torchrun (gloo, CPU);
``megan-fast eval`` sharded the same way."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

av = pytest.importorskip("av", reason="PyAV is needed for video files")

from _media import audio_packets, decoded, make_video  # noqa: E402
from _models import save_tiny_model  # noqa: E402
from megan_fast.cli.main import main  # noqa: E402

ENV = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return save_tiny_model(root / "a"), save_tiny_model(root / "b", global_skip=True)


def command(*args) -> list[str]:
    return [sys.executable, "-m", "megan_fast", "upscale", *args]


def same_video(a: str, b: str) -> None:
    (ta, fa), (tb, fb) = decoded(a), decoded(b)
    assert ta == tb and len(fa) == len(fb) and all(np.array_equal(x, y) for x, y in zip(fa, fb))
    assert audio_packets(a) == audio_packets(b)


def test_three_inputs_one_corrupt_then_the_finished_ones_are_skipped(tmp_path, models, capsys):
    os.makedirs(tmp_path / "in")
    make_video(tmp_path / "in" / "a.mp4", frames=4)
    make_video(tmp_path / "in" / "b.mkv", frames=5, audio=False)
    (tmp_path / "in" / "c.mp4").write_bytes(b"\x00 not a video" * 50)
    out = tmp_path / "out"
    assert main(["upscale", str(tmp_path / "in"), str(out), "--checkpoint", models[0]]) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "c.mp4: cannot be read as a video" in errors[0], err
    assert "3 inputs: 2 upscaled, 0 already complete (skipped), 1 failed (c.mp4)" in err
    assert sorted(os.listdir(out)) == ["a.mp4", "b.mp4"] and len(decoded(str(out / "b.mp4"))[1]) == 9
    before = {n: (out / n).read_bytes() for n in os.listdir(out)}
    # run again: the finished outputs are skipped, untouched; the corrupt input fails again
    assert main(["upscale", str(tmp_path / "in" / "a.mp4"), str(tmp_path / "in" / "b.mkv"), str(out), "--checkpoint",
                 models[0]]) == 0
    assert "2 inputs: 0 upscaled, 2 already complete (skipped), 0 failed" in capsys.readouterr().err
    assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before
    # a file of the user's where an output goes is not ours: that input fails, the other goes on
    (out / "b.mp4").write_bytes(b"the user's")
    assert main(["upscale", str(tmp_path / "in" / "b.mkv"), str(tmp_path / "in" / "a.mp4"), str(out),
                 "--checkpoint", models[0]]) == 1
    err = capsys.readouterr().err
    assert "b.mkv" in err and "exists; pass --overwrite" in err and (out / "b.mp4").read_bytes() == b"the user's"


def test_a_run_killed_after_its_first_segment_resumes_to_the_same_file(tmp_path, models):
    src = make_video(tmp_path / "in.mp4", frames=40, w=32, h=24)
    args = ["--checkpoint", models[0], "--segment-frames", "4"]
    assert subprocess.run(command(src, str(tmp_path / "whole.mp4"), *args), env=ENV, capture_output=True,
                          timeout=600).returncode == 0
    work = tmp_path / ".megan-fast-work-out.mp4"
    proc = subprocess.Popen(command(src, str(tmp_path / "out.mp4"), *args), env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (work.is_dir() and any(n.startswith("seg_000000.") for n in os.listdir(work))):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before its first segment"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    made = sorted(n for n in os.listdir(work) if n.startswith("seg_"))
    assert made and len(made) < 20 and not (tmp_path / "out.mp4").exists()
    # another model is refused for that work folder, which is left as it was
    res = subprocess.run(command(src, str(tmp_path / "out.mp4"), *args[2:], "--checkpoint", models[1]), env=ENV,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 2 and "holds an unfinished run of other settings (model differs)" in res.stderr
    assert sorted(n for n in os.listdir(work) if n.startswith("seg_")) == made
    # the same command finishes it: the file of an uninterrupted run, the work folder gone
    res = subprocess.run(command(src, str(tmp_path / "out.mp4"), *args), env=ENV, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0 and f"resuming: {len(made)} of 20 segments were made before" in res.stdout, res.stderr
    same_video(str(tmp_path / "out.mp4"), str(tmp_path / "whole.mp4"))
    assert not work.exists() and sorted(os.listdir(tmp_path)) == ["in.mp4", "out.mp4", "whole.mp4"]


def torchrun(*args, nproc=2) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
                           "--standalone", "-m", "megan_fast", *args], env=ENV, capture_output=True, text=True,
                          timeout=900)


def test_two_processes_upscale_and_eval_as_one_does(tmp_path, models):
    from megan_fast.data import synthetic

    os.makedirs(tmp_path / "in")
    make_video(tmp_path / "in" / "a.mp4", frames=9)
    make_video(tmp_path / "in" / "b.mp4", frames=6, audio=False)
    args = ["--checkpoint", models[0], "--segment-frames", "4"]
    assert main(["upscale", str(tmp_path / "in"), str(tmp_path / "one"), *args]) == 0
    res = torchrun("upscale", str(tmp_path / "in"), str(tmp_path / "two"), *args)
    assert res.returncode == 0, res.stderr[-2000:]
    for name in ("a.mp4", "b.mp4"):
        same_video(str(tmp_path / "one" / name), str(tmp_path / "two" / name))
    for i in range(3):
        synthetic.write_clip_folder(synthetic.make_clip("coffee", 7, size=(16, 16), seed=i), str(tmp_path / "gt" / f"c{i}"))
    assert main(["eval", "--checkpoint", models[0], "--data", str(tmp_path / "gt"), "--json",
                 str(tmp_path / "one.json")]) == 0
    res = torchrun("eval", "--checkpoint", models[0], "--data", str(tmp_path / "gt"), "--json",
                   str(tmp_path / "two.json"), "--save-frames", str(tmp_path / "frames"))
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads((tmp_path / "one.json").read_text()) == json.loads((tmp_path / "two.json").read_text())
    assert sorted(os.listdir(tmp_path / "frames")) == ["c0", "c1", "c2"]
    assert all(len(os.listdir(tmp_path / "frames" / c)) == 7 for c in ("c0", "c1", "c2"))
