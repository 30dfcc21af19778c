"""``megan-fast upscale`` on small generated videos and frame folders."""

from __future__ import annotations

import fractions
import os

import numpy as np
import pytest
import torch

av = pytest.importorskip("av", reason="PyAV is needed for video files")

from megan_fast import video  # noqa: E402
from megan_fast.cli.main import main  # noqa: E402
from megan_fast.models import MEGAN  # noqa: E402

SMALL = dict(nf=8, deformable_groups=2, front_blocks=1, back_blocks=1, num_pfrdb=1, nonlocal_inner=4,
             graph_hidden=4, tau=2)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "small"
    MEGAN(**SMALL).save_pretrained(path)
    return str(path)


def make_video(path, frames=6, w=16, h=12, fps=10, audio=True):
    c = av.open(str(path), "w")
    vs = c.add_stream("libx264", rate=fps)
    vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
    a = c.add_stream("aac", rate=16000) if audio else None
    rng = np.random.default_rng(0)
    for _ in range(frames):
        f = av.VideoFrame.from_ndarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8), format="rgb24")
        for p in vs.encode(f):
            c.mux(p)
    for p in vs.encode():
        c.mux(p)
    if a is not None:
        pts = 0
        for _ in range(12):
            af = av.AudioFrame.from_ndarray(rng.standard_normal((1, 1024)).astype(np.float32) * 0.1,
                                            format="fltp", layout="mono")
            af.sample_rate, af.pts = 16000, pts
            pts += 1024
            for p in a.encode(af):
                c.mux(p)
        for p in a.encode():
            c.mux(p)
    c.close()
    return str(path)


def audio_packets(path):
    with av.open(path) as c:
        if not c.streams.audio:
            return None
        return [bytes(p) for p in c.demux(c.streams.audio[0]) if p.dts is not None]


def test_video_round_trip_keeps_audio(tmp_path, checkpoint, capsys):
    src = make_video(tmp_path / "in.mp4", frames=6)
    dst = str(tmp_path / "out.mp4")
    assert main(["upscale", src, dst, "--checkpoint", checkpoint, "--device", "cpu"]) == 0
    info = video.probe(dst)
    assert (info.width, info.height) == (64, 48)
    assert info.fps == fractions.Fraction(20)
    assert len(list(video.read_frames(dst))) == 11
    assert audio_packets(dst) == audio_packets(src)  # audio copied unchanged
    out = capsys.readouterr().out
    assert "upscaled 6 frames (16x12" in out and "11 frames (64x48" in out
    assert [n for n in os.listdir(tmp_path) if n.startswith(".megan-fast-")] == []


def test_frame_folder_in_png_folder_out(tmp_path, checkpoint):
    frames = tmp_path / "frames"
    frames.mkdir()
    from PIL import Image

    for i in range(5):
        Image.fromarray(np.full((12, 8, 3), 40 * i, np.uint8)).save(frames / f"{i:03d}.png")
    dst = tmp_path / "up"
    assert main(["upscale", str(frames), str(dst), "--checkpoint", checkpoint]) == 0
    outs = sorted(os.listdir(dst))
    assert len(outs) == 9
    assert Image.open(dst / outs[0]).size == (32, 48)


def test_refuses_to_overwrite_the_input(tmp_path, checkpoint, capsys):
    src = make_video(tmp_path / "in.mp4", audio=False)
    before = open(src, "rb").read()
    assert main(["upscale", src, src, "--checkpoint", checkpoint, "--overwrite"]) == 2
    assert "is the input INPUT" in capsys.readouterr().err
    assert open(src, "rb").read() == before
    other = tmp_path / "exists.mp4"
    other.write_bytes(b"keep me")
    assert main(["upscale", src, str(other), "--checkpoint", checkpoint]) == 2
    assert "pass --overwrite" in capsys.readouterr().err and other.read_bytes() == b"keep me"


def test_corrupt_and_short_inputs_fail_cleanly(tmp_path, checkpoint, capsys):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00\x01 not a video" * 100)
    assert main(["upscale", str(bad), str(tmp_path / "o.mp4"), "--checkpoint", checkpoint]) == 2
    assert "cannot be read as a video" in capsys.readouterr().err
    short = make_video(tmp_path / "short.mp4", frames=2, audio=False)
    assert main(["upscale", short, str(tmp_path / "o2.mp4"), "--checkpoint", checkpoint]) == 2
    assert "needs at least 4" in capsys.readouterr().err
    assert not (tmp_path / "o.mp4").exists() and not (tmp_path / "o2.mp4").exists()
    assert main(["upscale", str(tmp_path / "nope.mp4"), str(tmp_path / "o3.mp4"), "--checkpoint", checkpoint]) == 2
    assert "no such file" in capsys.readouterr().err


def test_interrupted_run_leaves_no_output(tmp_path, checkpoint, monkeypatch):
    src = make_video(tmp_path / "in.mp4", frames=6, audio=False)
    dst = tmp_path / "out.mp4"
    calls = {"n": 0}
    original = video.VideoWriter.write

    def flaky(self, frame, time=None):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        original(self, frame, time)

    monkeypatch.setattr(video.VideoWriter, "write", flaky)
    assert main(["upscale", src, str(dst), "--checkpoint", checkpoint]) == 130
    assert not dst.exists()
    assert [n for n in os.listdir(tmp_path) if n.startswith(".megan-fast-")] == []
