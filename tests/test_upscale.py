"""``megan-fast upscale`` on small generated videos and frame folders."""

from __future__ import annotations

import fractions
import os

import numpy as np
import pytest

av = pytest.importorskip("av", reason="PyAV is needed for video files")

from _media import (audio_packets, decoded, grey_frames, make_video, raw_h264, save_small_model, snapshot,  # noqa: E402
                    write_png16)

from megan_fast import video  # noqa: E402
from megan_fast.cli.main import main  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_small_model(tmp_path_factory.mktemp("ckpt") / "small")


@pytest.fixture(scope="module")
def skip_model(tmp_path_factory):
    """A model whose output is exactly bicubic x4 + frame blending (global skip, last conv zero)."""
    return save_small_model(tmp_path_factory.mktemp("ckpt") / "skip", global_skip=True)


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
    from PIL import Image

    frames = grey_frames(tmp_path / "frames", [40 * i for i in range(5)], h=12, w=8, name="{i:03d}.png")
    dst = tmp_path / "up"
    assert main(["upscale", frames, str(dst), "--checkpoint", checkpoint]) == 0
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

    def flaky(self, frame, **kwargs):
        calls["n"] += "pts" in kwargs  # frames of the output's segments (not the encoder's trial frame)
        if calls["n"] == 3:
            raise KeyboardInterrupt
        original(self, frame, **kwargs)

    monkeypatch.setattr(video.VideoWriter, "write", flaky)
    args = ["upscale", src, str(dst), "--checkpoint", checkpoint, "--segment-frames", "2"]
    assert main(args) == 130
    assert not dst.exists()
    # Kept for the next run: the work folder with its finished segment, and no temporary anywhere.
    assert _leftovers(tmp_path) == [".megan-fast-work-out.mp4"]
    work = tmp_path / ".megan-fast-work-out.mp4"
    assert not [n for n in os.listdir(work) if n.startswith(".megan-fast-")]
    monkeypatch.setattr(video.VideoWriter, "write", original)
    assert main(args) == 0
    assert dst.exists() and _leftovers(tmp_path) == []


def test_segment_frames_0_writes_in_one_pass_without_a_work_folder(tmp_path, checkpoint, monkeypatch):
    src = make_video(tmp_path / "in.mp4", frames=6, audio=False)
    dst = tmp_path / "out.mp4"
    original = video.VideoWriter.write
    folders = []

    def watched(self, frame, *args, **kwargs):
        folders.append(_leftovers(tmp_path))
        if len(folders) == 3:
            raise KeyboardInterrupt
        original(self, frame, *args, **kwargs)

    monkeypatch.setattr(video.VideoWriter, "write", watched)
    args = ["upscale", src, str(dst), "--checkpoint", checkpoint, "--segment-frames", "0"]
    assert main(args) == 130
    assert not dst.exists() and _leftovers(tmp_path) == []
    assert all(not any(n.startswith(".megan-fast-work-") for n in seen) for seen in folders), folders
    monkeypatch.setattr(video.VideoWriter, "write", original)
    assert main(args) == 0
    assert len(decoded(str(dst))[1]) == 11 and _leftovers(tmp_path) == []


# --------------------------------------------------------------------------- output safety


def _leftovers(folder) -> list[str]:
    return [n for n in os.listdir(folder) if n.startswith(".megan-fast-")]


def test_empty_output_is_an_error_and_the_working_folder_is_untouched(tmp_path, checkpoint, capsys, monkeypatch):
    src = make_video(tmp_path / "in.mp4", audio=False)
    (tmp_path / "notes.txt").write_text("keep me")
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    for extra in ([], ["--overwrite"]):
        assert main(["upscale", src, "", "--checkpoint", checkpoint, *extra]) == 2
        assert "OUTPUT is empty" in capsys.readouterr().err
    assert main(["upscale", src, ".", "--checkpoint", checkpoint, "--overwrite"]) == 2
    assert "working folder" in capsys.readouterr().err
    assert snapshot(tmp_path) == before


def test_output_folder_that_contains_the_input_is_refused(tmp_path, checkpoint, capsys):
    proj = tmp_path / "proj"
    proj.mkdir()
    src = make_video(proj / "clip.mp4", audio=False)
    (proj / "other.txt").write_text("neighbour")
    before = snapshot(tmp_path)
    assert main(["upscale", src, str(proj), "--checkpoint", checkpoint, "--overwrite"]) == 2
    assert "contains the input INPUT" in capsys.readouterr().err
    assert main(["upscale", src, str(tmp_path / "ckpt_out"), "--checkpoint", str(tmp_path)]) == 2
    assert "lies inside the input --checkpoint" in capsys.readouterr().err
    assert main(["upscale", str(proj), str(proj / "up"), "--checkpoint", checkpoint]) == 2
    assert "lies inside the input INPUT" in capsys.readouterr().err
    assert snapshot(tmp_path) == before


def test_overwrite_replaces_only_megan_fast_outputs(tmp_path, checkpoint, capsys):
    src = make_video(tmp_path / "in.mp4", audio=False)
    theirs = tmp_path / "theirs.mp4"
    make_video(theirs, audio=False)  # a video the user made
    before = theirs.read_bytes()
    assert main(["upscale", src, str(theirs), "--checkpoint", checkpoint, "--overwrite"]) == 2
    assert "not a video file that megan-fast wrote" in capsys.readouterr().err
    assert theirs.read_bytes() == before
    ours = tmp_path / "ours.mp4"
    assert main(["upscale", src, str(ours), "--checkpoint", checkpoint]) == 0
    assert main(["upscale", src, str(ours), "--checkpoint", checkpoint]) == 2  # exists: needs --overwrite
    assert main(["upscale", src, str(ours), "--checkpoint", checkpoint, "--overwrite"]) == 0
    # Frame folders: a folder of the user's PNGs named like ours is not ours.
    frames = tmp_path / "frames"
    frames.mkdir()
    from PIL import Image

    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(frames / "000000.png")
    assert main(["upscale", src, str(frames), "--checkpoint", checkpoint, "--overwrite"]) == 2
    assert "'000000.png' is not" in capsys.readouterr().err
    assert os.listdir(frames) == ["000000.png"]
    up = tmp_path / "up"
    assert main(["upscale", src, str(up), "--checkpoint", checkpoint]) == 0
    assert main(["upscale", src, str(up), "--checkpoint", checkpoint, "--overwrite"]) == 0
    assert len(os.listdir(up)) == 11 and _leftovers(tmp_path) == []


def test_file_where_a_folder_is_expected_fails_before_any_work(tmp_path, checkpoint, capsys, monkeypatch):
    src = make_video(tmp_path / "in.mp4", audio=False)
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir.mp4").mkdir()
    import megan_fast.cli._common as common
    from megan_fast.errors import UsageError

    loads = []

    def no_model(*args, **kwargs):
        loads.append(args)
        raise UsageError("stopped at loading the model")

    monkeypatch.setattr(common, "load_model", no_model)
    assert main(["upscale", src, str(tmp_path / "x.mp4"), "--checkpoint", checkpoint]) == 2
    assert "stopped at loading the model" in capsys.readouterr().err and len(loads) == 1  # the probe works
    assert main(["upscale", src, str(tmp_path / "afile"), "--checkpoint", checkpoint, "--overwrite"]) == 2
    assert "is a file, but a folder of PNG frames" in capsys.readouterr().err
    assert main(["upscale", src, str(tmp_path / "adir.mp4"), "--checkpoint", checkpoint, "--overwrite"]) == 2
    assert "is a folder, but a video file" in capsys.readouterr().err
    assert main(["upscale", src, str(tmp_path / "missing" / "o.mp4"), "--checkpoint", checkpoint]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert len(loads) == 1  # none of the bad outputs got as far as the model


def test_containers_that_cannot_hold_the_stream_are_refused_before_work(tmp_path, checkpoint, capsys):
    with_aac = make_video(tmp_path / "a.mp4", audio=True)
    silent = make_video(tmp_path / "s.mp4", audio=False)
    for name in ("o.avi", "o.gif", "o.png"):
        assert main(["upscale", silent, str(tmp_path / name), "--checkpoint", checkpoint]) == 2
        assert "is not written" in capsys.readouterr().err
    assert main(["upscale", with_aac, str(tmp_path / "o.webm"), "--checkpoint", checkpoint]) == 2
    err = capsys.readouterr().err
    assert "aac audio cannot be stored in .webm" in err and "use .mkv" in err
    assert not (tmp_path / "o.webm").exists() and _leftovers(tmp_path) == []
    # Each container gets a codec it can hold: VP9 in WebM, H.264 elsewhere.
    for ext, codec in ((".webm", "vp9"), (".mkv", "h264"), (".mov", "h264")):
        out = str(tmp_path / f"ok{ext}")
        assert main(["upscale", silent, out, "--checkpoint", checkpoint]) == 0
        with av.open(out) as c:
            assert c.streams.video[0].codec_context.name == codec
            assert len(list(c.decode(video=0))) == 11
    out = str(tmp_path / "ok_audio.mkv")
    assert main(["upscale", with_aac, out, "--checkpoint", checkpoint]) == 0
    assert audio_packets(out) == audio_packets(with_aac)


def test_outputs_get_the_umask_mode(tmp_path, checkpoint):
    src = make_video(tmp_path / "in.mp4", audio=False)
    old = os.umask(0o027)
    try:
        assert main(["upscale", src, str(tmp_path / "o.mp4"), "--checkpoint", checkpoint]) == 0
        assert main(["upscale", src, str(tmp_path / "o"), "--checkpoint", checkpoint]) == 0
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "o.mp4").st_mode & 0o777 == 0o640
    assert os.stat(tmp_path / "o").st_mode & 0o777 == 0o750
    assert os.stat(tmp_path / "o" / "000000.png").st_mode & 0o777 == 0o640


@pytest.mark.parametrize("sig, code", [("SIGTERM", 143), ("SIGINT", 130)])
@pytest.mark.parametrize("out_name", ["up.mp4", "up_frames"])
def test_signals_remove_the_temporary_and_print_one_line(tmp_path, checkpoint, sig, code, out_name):
    import signal
    import subprocess
    import sys
    import time

    src = make_video(tmp_path / "long.mp4", frames=400, w=32, h=24, audio=False)
    proc = subprocess.Popen([sys.executable, "-m", "megan_fast", "upscale", src, out_name, "--checkpoint",
                             checkpoint], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not _leftovers(tmp_path) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before the signal could be sent"
    time.sleep(0.3)
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and "nothing half-written" in err
    # The work folder stays only when it holds a finished segment (the line says so), never a temporary.
    kept = _leftovers(tmp_path)
    assert kept in ([], [f".megan-fast-work-{out_name}"]), kept
    if kept:
        assert "the same command resumes" in err and not _leftovers(tmp_path / kept[0]), err


# --------------------------------------------------------------------------- input fidelity


def test_frame_folder_is_read_in_natural_order(tmp_path, skip_model):
    from PIL import Image

    levels = [10 * (i + 1) for i in range(10)]  # frame1 .. frame10: 10, 20, ..., 100
    frames = tmp_path / "frames"
    grey_frames(frames, levels, name="frame{i}.png", start=1)
    (frames / ".hidden.png").write_bytes(b"not an image")
    up = tmp_path / "up"
    assert main(["upscale", str(frames), str(up), "--checkpoint", skip_model]) == 0
    got = [int(np.asarray(Image.open(up / f"{2 * i:06d}.png"))[..., 0].mean().round()) for i in range(10)]
    assert got == levels


def test_16_bit_and_paletted_frames_are_scaled_not_clamped(tmp_path, skip_model):
    from PIL import Image

    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(4):
        write_png16(str(frames / f"{i}.png"), np.full((8, 8), 32768, np.uint16))  # mid grey, 16-bit
    pal = Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).convert("P", palette=Image.ADAPTIVE)
    pal.save(frames / "4.png")
    up = tmp_path / "up"
    assert main(["upscale", str(frames), str(up), "--checkpoint", skip_model]) == 0
    first = np.asarray(Image.open(up / "000000.png"))
    assert abs(first.mean() - 128) < 1  # 32768/65535 of white, not white
    last = np.asarray(Image.open(up / "000008.png"))
    assert abs(last.mean() - 200) < 1


def test_mixed_frame_sizes_fail_before_work(tmp_path, checkpoint, capsys):
    from PIL import Image

    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(5):
        Image.fromarray(np.zeros((8, 8 if i != 3 else 10, 3), np.uint8)).save(frames / f"{i}.png")
    assert main(["upscale", str(frames), str(tmp_path / "up"), "--checkpoint", checkpoint]) == 2
    assert "3.png is 10x8 but 0.png is 8x8" in capsys.readouterr().err
    assert not (tmp_path / "up").exists()


def test_resolution_change_mid_stream_is_a_clear_error(tmp_path, checkpoint, capsys):
    src = tmp_path / "change.h264"
    src.write_bytes(raw_h264(16, 12, 5) + raw_h264(24, 16, 5))
    assert main(["upscale", str(src), str(tmp_path / "o.mp4"), "--checkpoint", checkpoint]) == 2
    assert "frame 5 is 24x16 but the clip started at 16x12" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["change.h264"]


def test_truncated_video_warns_how_many_frames_were_decoded(tmp_path, checkpoint, capsys):
    full = make_video(tmp_path / "full.mp4", frames=40, audio=False, options={"movflags": "faststart"})
    data = open(full, "rb").read()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: int(len(data) * 0.7)])
    assert video.probe(str(cut)).num_frames == 40  # the container still declares 40
    n = len(list(video.read_frames(str(cut))))
    assert 4 <= n < 40
    out = str(tmp_path / "o.mp4")
    assert main(["upscale", str(cut), out, "--checkpoint", checkpoint]) == 0
    err = capsys.readouterr().err
    assert f"decoded {n} of the 40 frames the file declares" in err
    assert len(decoded(out)[1]) == 2 * n - 1


def test_rotated_video_comes_out_as_it_is_shown(tmp_path, skip_model):
    pictures = []
    for _ in range(5):
        pic = np.zeros((12, 16, 3), np.uint8)
        pic[:4, :4] = 255  # a white block at the top left of the stored picture
        pictures.append(pic)
    src = make_video(tmp_path / "phone.mp4", frames=5, audio=False, rotation=90, pictures=pictures)
    info = video.probe(src)
    assert (info.width, info.height) == (12, 16) and "counter-clockwise" in info.orientation
    out = str(tmp_path / "o.mp4")
    assert main(["upscale", src, out, "--checkpoint", skip_model]) == 0
    _, frames = decoded(out)
    first = frames[0][..., 0].astype(float)
    assert first.shape == (64, 48)
    # Turned 90 degrees counter-clockwise: the top-left block is now at the bottom left.
    assert first[-12:, :12].mean() > 200 and first[:12, :12].mean() < 60 and first[-12:, -12:].mean() < 60


def test_variable_frame_rate_keeps_the_input_timestamps(tmp_path, checkpoint):
    times = [0.0, 0.1, 0.15, 0.4, 0.45, 0.9]
    src = make_video(tmp_path / "vfr.mkv", frames=6, audio=True, times=times)
    out = str(tmp_path / "o.mkv")
    assert main(["upscale", src, out, "--checkpoint", checkpoint]) == 0
    got, _ = decoded(out)
    want = []
    for a, b in zip(times, times[1:]):
        want += [a, (a + b) / 2]
    want.append(times[-1])
    assert got == pytest.approx(want, abs=1e-3)
    assert audio_packets(out) == audio_packets(src)


def test_bad_numbers_and_devices_are_one_line_errors(tmp_path, checkpoint):
    import subprocess
    import sys

    src = make_video(tmp_path / "in.mp4", audio=False)
    cases = [(["--fps", "nan"], "--fps"), (["--fps", "inf"], "--fps"), (["--fps", "0"], "--fps"),
             (["--fps", "-5"], "--fps"), (["--tile", "2"], "--tile"), (["--tile", "8", "--tile-overlap", "8"],
                                                                          "--tile-overlap"),
             (["--device", "bogus"], "--device 'bogus'"), (["--device", "cuda:7"], "--device 'cuda:7'"),
             (["--batch", "0"], "--batch"), (["--compile", "max"], "--compile")]
    for extra, needle in cases:
        res = subprocess.run([sys.executable, "-m", "megan_fast", "upscale", src, str(tmp_path / "o.mp4"),
                              "--checkpoint", checkpoint, *extra], capture_output=True, text=True)
        assert res.returncode == 2, (extra, res.stderr)
        assert len(res.stderr.strip().splitlines()) == 1 and needle in res.stderr, (extra, res.stderr)
    assert sorted(os.listdir(tmp_path)) == ["in.mp4"]


def test_half_precision_on_a_cpu_warns_and_runs_float32(tmp_path, checkpoint, capsys):
    src = make_video(tmp_path / "in.mp4", audio=False)
    assert main(["upscale", src, str(tmp_path / "a"), "--checkpoint", checkpoint, "--device", "cpu"]) == 0
    assert main(["upscale", src, str(tmp_path / "b"), "--checkpoint", checkpoint, "--device", "cpu",
                 "--dtype", "bfloat16"]) == 0
    assert "warning: --dtype bfloat16 is for CUDA devices" in capsys.readouterr().err
    from PIL import Image

    for name in sorted(os.listdir(tmp_path / "a")):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "a" / name)), np.asarray(Image.open(tmp_path / "b" / name)))


def test_frames_that_link_into_the_output_are_refused(tmp_path, checkpoint, capsys):
    frames = grey_frames(tmp_path / "frames", [30 * i for i in range(5)])
    prev = tmp_path / "prev"
    assert main(["upscale", frames, str(prev), "--checkpoint", checkpoint]) == 0
    linked = tmp_path / "linked"
    linked.mkdir()
    for i in range(5):
        (linked / f"in{i}.png").symlink_to(prev / f"{i:06d}.png")
    before = snapshot(prev)
    assert main(["upscale", str(linked), str(prev), "--checkpoint", checkpoint, "--overwrite"]) == 2
    assert "contains files of the input INPUT" in capsys.readouterr().err
    assert snapshot(prev) == before


def test_more_output_names_are_checked_up_front(tmp_path, checkpoint, capsys):
    src = make_video(tmp_path / "in.mp4", audio=False)
    for name in ("x.mts", "x.mp3", "x.wav", "x.h264", "x.vob", "x.qt", "x.m4a"):
        assert main(["upscale", src, str(tmp_path / name), "--checkpoint", checkpoint]) == 2
        assert "is not written" in capsys.readouterr().err
    assert main(["upscale", src, str(tmp_path / ("a" * 300 + ".mp4")), "--checkpoint", checkpoint]) == 2
    assert "the name is too long" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["in.mp4"]


def test_every_audio_track_is_copied(tmp_path, checkpoint):
    two = make_video(tmp_path / "two.mkv", audio=True, audio_tracks=2)
    assert audio_packets(two, 0) != audio_packets(two, 1)
    dst = str(tmp_path / "o.mkv")
    assert main(["upscale", two, dst, "--checkpoint", checkpoint]) == 0
    assert audio_packets(dst, 0) == audio_packets(two, 0) and audio_packets(dst, 1) == audio_packets(two, 1)


def test_a_cut_file_without_a_frame_count_warns_from_its_duration(tmp_path, checkpoint, capsys):
    full = make_video(tmp_path / "long.mkv", frames=30, audio=False)
    assert video.probe(full).num_frames is None  # Matroska declares no frame count
    data = open(full, "rb").read()
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(data[: int(len(data) * 0.6)])
    assert main(["upscale", str(cut), str(tmp_path / "o.mkv"), "--checkpoint", checkpoint]) == 0
    err = capsys.readouterr().err
    assert "of a file that declares 3.00 s (about 30 frames" in err
    assert main(["upscale", full, str(tmp_path / "o2.mkv"), "--checkpoint", checkpoint]) == 0
    assert "warning" not in capsys.readouterr().err  # the whole file: nothing to say


def test_non_finite_weights_are_refused(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    path = save_small_model(tmp_path / "nan")
    state = load_file(os.path.join(path, "model.safetensors"))
    state["reconstruction.conv_last.weight"][0, 0, 0, 0] = float("nan")
    save_file(state, os.path.join(path, "model.safetensors"))
    src = make_video(tmp_path / "in.mp4", audio=False)
    assert main(["upscale", src, str(tmp_path / "o.mp4"), "--checkpoint", path]) == 2
    assert "hold NaN or infinite weights (e.g. 'reconstruction.conv_last.weight')" in capsys.readouterr().err


def test_audio_longer_than_the_video_is_no_truncation(tmp_path, checkpoint, capsys):
    src = make_video(tmp_path / "short_video.mkv", frames=5, fps=10, audio=True)  # 0.5 s of video, 0.77 s of audio
    with av.open(src) as c:
        assert c.duration / 1e6 > 0.7
    assert main(["upscale", src, str(tmp_path / "o.mkv"), "--checkpoint", checkpoint]) == 0
    assert "truncated" not in capsys.readouterr().err


def test_long_but_legal_names_are_accepted(tmp_path, checkpoint):
    src = make_video(tmp_path / "in.mp4", audio=False)
    name = "a" * 236 + ".mp4"  # 240 bytes: within NAME_MAX (255)
    assert main(["upscale", src, str(tmp_path / name), "--checkpoint", checkpoint]) == 0
    assert os.path.isfile(tmp_path / name)


def test_batched_windows_and_tiles_give_the_frames_of_batch_one(tmp_path, checkpoint):
    from PIL import Image

    src = make_video(tmp_path / "in.mp4", frames=9, audio=False)

    def run(*extra):
        dst = tmp_path / ("out" + "_".join(extra).replace("-", ""))
        assert main(["upscale", src, str(dst), "--checkpoint", checkpoint, "--device", "cpu", *extra]) == 0
        return np.stack([np.asarray(Image.open(dst / n), dtype=np.int16) for n in sorted(os.listdir(dst))])

    one, two, three = run(), run("--batch", "2"), run("--batch", "3")
    assert one.shape == three.shape and one.shape[0] == 17
    assert np.array_equal(two, three)  # every batch of two or more: the same arithmetic
    # a batch of one takes another oneDNN convolution algorithm: float rounding, at most one 8-bit level
    assert np.abs(one - three).max() <= 1 and np.mean(one != three) < 1e-3
    tiles_one, tiles_three = run("--tile", "8", "--tile-overlap", "2"), run("--tile", "8", "--tile-overlap", "2",
                                                                           "--batch", "3")
    assert np.abs(tiles_one - tiles_three).max() <= 1 and np.mean(tiles_one != tiles_three) < 1e-3
    assert [n for n in os.listdir(tmp_path) if n.startswith(".megan-fast-")] == []
