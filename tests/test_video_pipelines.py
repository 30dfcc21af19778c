"""``megan-fast upscale`` in video pipelines: y4m on standard input and output (real subprocess pipes), a closed
downstream pipe, encoder choice checked up front, 10-bit precision and colour metadata kept."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

av = pytest.importorskip("av", reason="PyAV is needed for video files")

from _media import make_video  # noqa: E402
from _models import save_tiny_model  # noqa: E402
from megan_fast.cli.main import main  # noqa: E402
from megan_fast.video.encoders import VIDEO_OUTPUTS  # noqa: E402

ENV = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def skip_model(tmp_path_factory):
    """A model whose output is exactly bicubic x4 + frame blending (global skip, last conv zero)."""
    return save_tiny_model(tmp_path_factory.mktemp("ckpt") / "skip", global_skip=True)


def pictures(n=5, h=12, w=16, seed=0) -> np.ndarray:
    """(n, h, w, 3) smooth random RGB in [0, 1] (float64)."""
    rng = np.random.RandomState(seed)
    base = rng.rand(n, h // 4, w // 4, 3)
    return np.clip(np.kron(base, np.ones((1, 4, 4, 1))) * 0.8 + rng.rand(n, h, w, 3) * 0.2, 0, 1)


def write_video(path, rgb: np.ndarray, fmt: str, codec: str, pix_fmt: str, fps=10, colour=None, options=None):
    """Encodes (n, h, w, 3) float RGB in [0, 1] at pix_fmt's depth (16-bit RGB in, so nothing passes 8 bits)."""
    c = av.open(str(path) if isinstance(path, (str, os.PathLike)) else path, "w", format=fmt, options=options or {})
    s = c.add_stream(codec, rate=fps)
    s.width, s.height, s.pix_fmt = rgb.shape[2], rgb.shape[1], pix_fmt
    if colour:
        for key, value in colour.items():
            setattr(s.codec_context, key, value)
    for i, picture in enumerate(rgb):
        frame = av.VideoFrame.from_ndarray((picture * 65535).round().astype(np.uint16), format="rgb48le")
        frame = frame.reformat(format=pix_fmt, dst_colorspace=(colour or {}).get("colorspace"),
                               dst_color_range=(colour or {}).get("color_range"))
        frame.pts = i
        for p in s.encode(frame):
            c.mux(p)
    for p in s.encode():
        c.mux(p)
    c.close()


def y4m_bytes(rgb: np.ndarray, pix_fmt="yuv420p10le") -> bytes:
    buf = io.BytesIO()
    write_video(buf, rgb, "yuv4mpegpipe", "wrapped_avframe", pix_fmt, options={"strict": "-1"})
    return buf.getvalue()


def decode(data_or_path, fmt=None) -> tuple[list, list[np.ndarray]]:
    """(frames as PyAV frames' format names, rgb48 float arrays in [0, 1])."""
    source = io.BytesIO(data_or_path) if isinstance(data_or_path, bytes) else str(data_or_path)
    with av.open(source, format=fmt) as c:
        frames = list(c.decode(video=0))
    return frames, [f.to_ndarray(format="rgb48le", src_color_range=int(f.color_range) or None).astype(np.float64)
                    / 65535 for f in frames]


def upscale(*args, data: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megan_fast", "upscale", *args], input=data, capture_output=True,
                          env=ENV, timeout=600)


# --------------------------------------------------------------------------- pipes


def test_y4m_in_from_a_pipe_and_out_to_a_pipe(tmp_path, skip_model):
    rgb = pictures(5)
    res = upscale("-", str(tmp_path / "out.mkv"), "--checkpoint", skip_model, data=y4m_bytes(rgb))
    assert res.returncode == 0, res.stderr.decode()
    frames, _ = decode(tmp_path / "out.mkv")
    assert len(frames) == 9 and frames[0].format.name == "yuv420p10le" and frames[0].width == 64
    # standard input to standard output, with tiles and batches: nothing but the stream on stdout
    res = upscale("-", "-", "--checkpoint", skip_model, "--tile", "8", "--batch", "2", data=y4m_bytes(rgb))
    assert res.returncode == 0, res.stderr.decode()
    assert res.stdout.startswith(b"YUV4MPEG2 W64 H48 F20:1") and b"C420p10" in res.stdout[:80]
    frames, _ = decode(res.stdout, "yuv4mpegpipe")
    assert len(frames) == 9 and frames[0].format.name == "yuv420p10le"
    assert b"upscaled 5 frames" in res.stderr and b"wrote standard output" in res.stderr


def test_a_file_to_a_pipe_says_the_audio_stays_behind(tmp_path, skip_model):
    src = make_video(tmp_path / "in.mp4", frames=4, audio=True)
    res = upscale(src, "-", "--checkpoint", skip_model)
    assert res.returncode == 0, res.stderr.decode()
    frames, _ = decode(res.stdout, "yuv4mpegpipe")
    assert len(frames) == 7 and frames[0].format.name == "yuv420p"
    assert b"its audio is not written: a YUV4MPEG2 stream holds video only" in res.stderr
    for bad, words in ((["--codec", "libx265"], b"standard output carries uncompressed YUV4MPEG2"),
                       (["--crf", "20"], b"--crf")):
        res = upscale(src, "-", "--checkpoint", skip_model, *bad)
        assert res.returncode == 2 and words in res.stderr and res.stdout == b"", res.stderr


def test_a_closed_downstream_pipe_ends_in_one_line(tmp_path, skip_model):
    src = make_video(tmp_path / "in.mp4", frames=12, audio=False, w=32, h=24)
    proc = subprocess.Popen([sys.executable, "-m", "megan_fast", "upscale", src, "-", "--checkpoint", skip_model],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    assert proc.stdout.read(100).startswith(b"YUV4MPEG2")
    proc.stdout.close()  # the reader downstream stops (head -c 100)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 1
    errors = [line for line in err.splitlines() if "error:" in line]
    assert errors == ["megan-fast upscale: error: the program reading standard output closed it; stopped"], err
    assert "Traceback" not in err and "Exception ignored" not in err


def test_standard_input_that_is_not_y4m_is_one_line(tmp_path, skip_model):
    res = upscale("-", str(tmp_path / "o.mp4"), "--checkpoint", skip_model, data=b"not a video" * 100)
    assert res.returncode == 2 and b"INPUT -: standard input is not a YUV4MPEG2 stream" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "o.mp4").exists()


# --------------------------------------------------------------------------- precision and colour


def test_ten_bits_survive_and_are_closer_than_an_8_bit_round_trip(tmp_path, skip_model):
    from megan_fast.models import load_model
    from megan_fast.video import read_frames

    rgb = pictures(5, seed=1)
    write_video(tmp_path / "in10.mkv", rgb, "matroska", "ffv1", "yuv444p10le")
    write_video(tmp_path / "in8.mkv", rgb, "matroska", "ffv1", "yuv444p")
    for bits in ("10", "8"):
        assert main(["upscale", str(tmp_path / f"in{bits}.mkv"), str(tmp_path / f"out{bits}.mkv"), "--checkpoint",
                     skip_model, "--codec", "ffv1", "--pix-fmt", "yuv444p10le" if bits == "10" else "yuv444p"]) == 0
    # the network's float output on the 10-bit frames as the reader gives them (the skip model: bicubic + blend)
    frames = torch.stack(list(read_frames(str(tmp_path / "in10.mkv"))))
    assert not torch.allclose(frames, frames.mul(255).round().div(255), atol=1e-4)  # off the 8-bit grid
    from megan_fast.inference import upscale_frames

    with torch.no_grad():
        want = upscale_frames(load_model(skip_model), frames).clamp(0, 1).permute(0, 2, 3, 1).double().numpy()
    out10 = np.stack(decode(tmp_path / "out10.mkv")[1])
    out8 = np.stack(decode(tmp_path / "out8.mkv")[1])
    assert decode(tmp_path / "out10.mkv")[0][0].format.name == "yuv444p10le"
    err10, err8 = np.abs(out10 - want).mean(), np.abs(out8 - want).mean()
    assert not np.array_equal(out10, out8) and err10 < err8 / 2, (err10, err8)


def test_16_bit_png_folders_stay_16_bit(tmp_path, skip_model):
    from _media import write_png16

    os.makedirs(tmp_path / "in")
    for i, picture in enumerate(pictures(4, seed=2)):
        write_png16(str(tmp_path / "in" / f"{i}.png"), (picture * 65535).round().astype(np.uint16))
    assert main(["upscale", str(tmp_path / "in"), str(tmp_path / "out"), "--checkpoint", skip_model]) == 0
    from megan_fast.images import png_bit_depth

    names = sorted(os.listdir(tmp_path / "out"))
    assert len(names) == 7 and all(png_bit_depth(str(tmp_path / "out" / n)) == 16 for n in names)


def test_hdr_colour_metadata_is_carried_to_the_output(tmp_path, skip_model):
    pq = dict(color_primaries=9, color_trc=16, colorspace=9, color_range=1)  # BT.2020, PQ, BT.2020 NCL, limited
    write_video(tmp_path / "hdr.mkv", pictures(4, h=24, w=32, seed=3), "matroska", "libx265", "yuv420p10le", colour=pq,
                options=None)
    for out, extra in (("hdr.mp4", []), ("hdr_ffv1.mkv", ["--codec", "ffv1"])):
        assert main(["upscale", str(tmp_path / "hdr.mkv"), str(tmp_path / out), "--checkpoint", skip_model,
                     *extra]) == 0
        with av.open(str(tmp_path / out)) as c:
            frame = next(c.decode(video=0))
        assert frame.format.name == "yuv420p10le", out
        assert (frame.color_primaries, frame.color_trc, frame.colorspace, frame.color_range) == (9, 16, 9, 1), out


# --------------------------------------------------------------------------- encoder choice


CODECS = ["libx264", "libx265", "libsvtav1", "libvpx-vp9", "ffv1", "prores_ks"]


@pytest.mark.parametrize("codec", CODECS)
def test_every_codec_container_and_pix_fmt_works_or_is_refused_up_front(tmp_path, skip_model, capsys, monkeypatch,
                                                                      codec):
    if codec not in av.codecs_available:
        pytest.skip(f"this PyAV build has no {codec}")
    from megan_fast import inference

    ran = []
    real = inference.iter_upscale
    monkeypatch.setattr(inference, "iter_upscale", lambda *a, **k: (ran.append(1), real(*a, **k))[1])
    src = make_video(tmp_path / "in.mp4", frames=4, audio=False, w=8, h=8)
    worked = []
    for ext in VIDEO_OUTPUTS:
        for pix_fmt in (None, "yuv420p10le", "yuv422p10le"):
            ran.clear()
            out = tmp_path / f"o_{pix_fmt}{ext}"
            argv = ["upscale", src, str(out), "--checkpoint", skip_model, "--codec", codec]
            rc = main(argv + (["--pix-fmt", pix_fmt] if pix_fmt else []))
            err = capsys.readouterr().err
            what = (codec, ext, pix_fmt)
            if rc == 0:
                with av.open(str(out)) as c:
                    stream = c.streams.video[0]
                    frames = list(c.decode(stream))
                assert len(frames) == 7 and (pix_fmt is None or frames[0].format.name == pix_fmt), what
                assert stream.codec_context.codec.id == av.Codec(codec, "w").id, what  # e.g. prores_ks -> prores
                worked.append((ext, pix_fmt))
            else:
                assert rc == 2 and ran == [] and not out.exists(), (what, err)
                lines = err.strip().splitlines()
                refused = f"--pix-fmt {pix_fmt}: {codec} takes" in lines[0] or f"cannot hold {codec}" in lines[0]
                assert len(lines) == 1 and refused, (what, err)
    assert worked, f"{codec}: no container takes it"
