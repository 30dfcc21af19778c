"""Small media files for the tests: videos (constant and variable rate, rotated, cut, resolution changes),
16-bit PNGs, tiny checkpoints, and ways to run a command with a read-only folder or a full disk."""

from __future__ import annotations

import fractions
import io
import os
import shutil
import struct
import subprocess
import sys
import zlib

import numpy as np
import torch

from _models import TINY_MEGAN as SMALL, save_tiny_model  # noqa: E402  (the one home of the tiny sizes)


def save_small_model(path, **overrides) -> str:
    """A tiny random MEGAN saved at ``path``; ``global_skip=True`` makes its output exactly bicubic + blending."""
    return save_tiny_model(path, "megan", **overrides)


def make_video(path, frames=6, w=16, h=12, fps=10, audio=True, times=None, rotation=None, options=None,
               pictures=None, audio_tracks=1):
    """H.264 video of random (or given (h, w, 3) uint8) pictures; ``times`` (seconds) makes a variable rate."""
    import av

    c = av.open(str(path), "w", options=options or {})
    vs = c.add_stream("libx264", rate=fps)
    vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
    if rotation is not None:
        vs.set_display_rotation(rotation)
    tb = fractions.Fraction(1, 1000)
    if times is not None:
        vs.codec_context.time_base = tb
        vs.time_base = tb
    tracks = [c.add_stream("aac", rate=16000) for _ in range(audio_tracks)] if audio else []
    rng = np.random.default_rng(0)
    for i in range(frames):
        pic = pictures[i] if pictures is not None else rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        f = av.VideoFrame.from_ndarray(pic, format="rgb24")
        if times is not None:
            f.pts, f.time_base = round(fractions.Fraction(times[i]) / tb), tb
        for p in vs.encode(f):
            c.mux(p)
    for p in vs.encode():
        c.mux(p)
    for k, a in enumerate(tracks):
        pts = 0
        for _ in range(12):
            af = av.AudioFrame.from_ndarray(rng.standard_normal((1, 1024)).astype(np.float32) * 0.1 * (k + 1),
                                            format="fltp", layout="mono")
            af.sample_rate, af.pts = 16000, pts
            pts += 1024
            for p in a.encode(af):
                c.mux(p)
        for p in a.encode():
            c.mux(p)
    c.close()
    return str(path)


def raw_h264(w, h, n) -> bytes:
    """An Annex-B H.264 stream of n black frames (concatenate two for a resolution change mid-stream)."""
    import av

    buf = io.BytesIO()
    c = av.open(buf, "w", format="h264")
    s = c.add_stream("libx264", rate=10)
    s.width, s.height, s.pix_fmt = w, h, "yuv420p"
    for _ in range(n):
        for p in s.encode(av.VideoFrame.from_ndarray(np.zeros((h, w, 3), np.uint8), format="rgb24")):
            c.mux(p)
    for p in s.encode():
        c.mux(p)
    c.close()
    return buf.getvalue()


def audio_packets(path, track=0):
    import av

    with av.open(path) as c:
        if len(c.streams.audio) <= track:
            return None
        return [bytes(p) for p in c.demux(c.streams.audio[track]) if p.dts is not None]


def decoded(path):
    """(times in seconds, (h, w, 3) uint8 frames) of a video as decoded (no orientation applied)."""
    import av

    with av.open(path) as c:
        frames = list(c.decode(video=0))
    return [f.time for f in frames], [f.to_ndarray(format="rgb24") for f in frames]


def write_png16(path, arr: np.ndarray) -> None:
    """A 16-bit PNG (grey (h, w), RGB (h, w, 3) or RGBA (h, w, 4) uint16), written by hand: Pillow cannot."""
    h, w = arr.shape[:2]
    ctype = {2: 0, 3: {3: 2, 4: 6}.get(arr.shape[-1])}[arr.ndim]
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, ctype, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def snapshot(root) -> dict[str, bytes]:
    """Every file under ``root`` (relative path -> bytes), folders as b"<dir>"; for "nothing changed" checks."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = b"<dir>"
        for n in filenames:
            p = os.path.join(dirpath, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, root)] = f.read()
    return out


def readonly_command(folder: str, argv: list[str], cwd: str) -> subprocess.CompletedProcess | None:
    """Runs ``python -m megan_fast argv`` with ``folder`` read-only; None if this machine cannot make it so.

    Not root: the folder's mode is 0555 for the run.  Root (who writes into
    0555 folders): a read-only bind mount in a private mount namespace of the
    child (``unshare -m``), so nothing outside the child sees it.
    """
    cmd = [sys.executable, "-m", "megan_fast", *argv]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if os.geteuid() != 0:
        os.chmod(folder, 0o555)
        try:
            return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, timeout=600)
        finally:
            os.chmod(folder, 0o755)
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return None
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount --bind '{folder}' '{folder}' && "
                            f"mount -o remount,bind,ro '{folder}' && ! touch '{folder}/.probe' 2>/dev/null"],
                           capture_output=True)
    if probe.returncode != 0:
        return None
    script = (f"mount --bind '{folder}' '{folder}' && mount -o remount,bind,ro '{folder}' && exec \"$@\"")
    return subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", *cmd], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=600)


def full_disk_command(folder: str, argv: list[str], cwd: str) -> subprocess.CompletedProcess:
    """Runs ``python -m megan_fast argv`` with no room left in ``folder``: a full disk.

    Root with mount namespaces: a one-page tmpfs over ``folder``, filled by a
    hidden file, in a private mount namespace of the child (``unshare -m``),
    so writes fail with ENOSPC.  Elsewhere: a file-size limit of 64 bytes
    (RLIMIT_FSIZE, SIGXFSZ ignored: room for Python's temporary-folder probe,
    none for an output), so writes fail with EFBIG; the same failed write.
    """
    cmd = [sys.executable, "-m", "megan_fast", *argv]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    fill = (f"mount -t tmpfs -o size=4096 tmpfs '{folder}' && "
            f"dd if=/dev/zero of='{folder}/.fill' bs=4096 count=1 2>/dev/null; ")
    if os.geteuid() == 0 and shutil.which("unshare") and shutil.which("mount"):
        probe = subprocess.run(["unshare", "-m", "sh", "-c", fill + f"! touch '{folder}/.x' 2>/dev/null || "
                                f"! dd if=/dev/zero of='{folder}/.x' bs=1 count=1 2>/dev/null"], capture_output=True)
        if probe.returncode == 0:
            return subprocess.run(["unshare", "-m", "sh", "-c", fill + 'exec "$@"', "sh", *cmd], cwd=cwd,
                                  capture_output=True, text=True, env=env, timeout=600)

    def limit():
        import resource
        import signal

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64, 64))

    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, timeout=600, preexec_fn=limit)


def grey_frames(folder, levels, h=8, w=8, name="{i}.png", start=0) -> str:
    """A folder of flat 8-bit frames, one grey level each, named by ``name.format(i=start + k)``."""
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    for i, level in enumerate(levels):
        Image.fromarray(np.full((h, w, 3), level, np.uint8)).save(os.path.join(folder, name.format(i=start + i)))
    return str(folder)
