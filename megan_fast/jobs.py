"""Long outputs made in segments that survive a crash, and shared among processes (docs/DESIGN.md section 8).

An output of ``upscale`` is made in segments of at most ``segment_frames``
output frames (256 by default), each written atomically into a hidden work
folder beside the output, ``.megan-fast-work-NAME``, whose ``job.json`` (marked
as megan-fast's) records the input, the model and every option that changes
the frames.  When the process dies (SIGKILL and power loss included), the
same command finds the folder and makes only the segments it lacks; the
segments are then joined into the output (a video's packets copied, no
second encoding; a frame folder's PNGs moved), which is renamed into place,
and the work folder is removed.  A work folder of other options is reported
and left alone, never reused or removed.  Under ``torchrun`` the segments of
all inputs are dealt out among the processes (:class:`megan_fast.distributed.World`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil

from megan_fast import outputs
from megan_fast.errors import OutputError

__all__ = ["JOB_NAME", "SEGMENT_FRAMES", "Job", "SEGMENT_MUXERS", "file_identity", "model_identity"]

SEGMENT_FRAMES = 256
WORK_PREFIX = ".megan-fast-work-"
JOB_NAME = "job.json"
# Encoders whose segments join into one stream that decodes as the segments do (checked by the tests), and the
# muxer their segments are written in (one that stores every packet's decoding time).  Other encoders write the
# output in one pass, without segments.
SEGMENT_MUXERS = {"libx264": "mov", "libx265": "mov", "prores_ks": "mov", "h264_nvenc": "mov", "hevc_nvenc": "mov",
                  "libvpx-vp9": "mp4", "ffv1": "matroska"}
_SEGMENT = re.compile(r"seg_(\d{6})(\.(mov|mp4|mkv)|\.empty)?")
_JOB_KIND = outputs.Kind("job file of megan-fast upscale", commands=("upscale",))


def file_identity(path: str) -> dict:
    """What tells a changed input file: its absolute path, size and modification time (a folder: of its files)."""
    path = os.path.abspath(path)
    if os.path.isdir(path):
        entries = sorted((n, os.stat(os.path.join(path, n)).st_size, os.stat(os.path.join(path, n)).st_mtime_ns)
                         for n in os.listdir(path) if os.path.isfile(os.path.join(path, n)))
        return {"path": path, "files": hashlib.sha256(repr(entries).encode()).hexdigest()}
    st = os.stat(path)
    return {"path": path, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def model_identity(path: str) -> str:
    """A digest of a checkpoint's files (a folder: its config and weights; a .pth or .onnx: the file)."""
    digest = hashlib.sha256()
    files = [os.path.join(path, n) for n in ("config.json", "model.safetensors")] if os.path.isdir(path) else [path]
    for name in files:
        with open(name, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


@dataclasses.dataclass
class Job:
    """The segments of one output: ``total`` output frames in segments of ``segment_frames``, kept in a work
    folder beside ``output`` (an absolute path); ``settings``: everything that changes the frames."""

    output: str
    total: int
    segment_frames: int
    settings: dict
    kind: str  # "video" (segments are files of ``segment_ext``) or "frames" (segments are folders of PNGs)
    segment_ext: str = ".mov"

    @property
    def folder(self) -> str:
        name = os.path.basename(self.output)
        if len(os.fsencode(WORK_PREFIX + name)) > 255:  # NAME_MAX: a long output name keeps its start and a digest
            digest = hashlib.sha256(os.fsencode(name)).hexdigest()[:16]
            name = os.fsdecode(os.fsencode(name)[:160]).rstrip("\ufffd") + "-" + digest
        return os.path.join(os.path.dirname(self.output), WORK_PREFIX + name)

    @property
    def count(self) -> int:
        return max(1, -(-self.total // self.segment_frames))

    def frames_of(self, k: int) -> tuple[int, int]:
        """Output frames [j0, j1) of segment k."""
        return k * self.segment_frames, min((k + 1) * self.segment_frames, self.total)

    def segment_path(self, k: int) -> str:
        return os.path.join(self.folder, f"seg_{k:06d}" + (self.segment_ext if self.kind == "video" else ""))

    def done(self, k: int) -> bool:
        return os.path.exists(self.segment_path(k)) or os.path.exists(self._empty(k))

    def _empty(self, k: int) -> str:
        return os.path.join(self.folder, f"seg_{k:06d}.empty")

    def mark_empty(self, k: int) -> None:
        """Segment k has no frames (the input ended before it: a cut file that declares more)."""
        with outputs.Output(self._empty(k), "segment", _JOB_KIND, True, self._empty(k)).atomic_file() as tmp:
            open(tmp, "w").close()

    def record(self) -> dict:
        return {"written_by": outputs.written_by("upscale"), "output": self.output, "total_frames": self.total,
                "segment_frames": self.segment_frames, "kind": self.kind, "settings": self.settings}

    def open(self, create: bool) -> int:
        """Checks the work folder (``create``: makes it with its job.json when it does not exist) and returns the
        number of segments already made.

        Raises:
            OutputError: a work folder of other settings (named, left alone), or one megan-fast did not make.
        """
        job_file = os.path.join(self.folder, JOB_NAME)
        if os.path.isdir(self.folder) and not os.path.lexists(job_file) and all(
                outputs.TMP_NAME.fullmatch(n) for n in os.listdir(self.folder)):
            self.remove()  # killed while it was being made: nothing in it yet
        if os.path.lexists(self.folder):
            if os.path.islink(self.folder) or not os.path.isdir(self.folder) or not outputs.is_ours(job_file,
                                                                                                 ("upscale",)):
                raise OutputError(f"{self.folder!r} is in the way of the work folder of {self.output!r} and is not "
                                  "one megan-fast made; move it away")
            with open(job_file, encoding="utf-8") as f:
                saved = json.load(f)
            mine = self.record()
            for key in ("total_frames", "segment_frames", "kind"):
                if saved.get(key) != mine[key]:
                    raise self._other(f"{key} {saved.get(key)!r} there, {mine[key]!r} now")
            for key, value in mine["settings"].items():
                if saved.get("settings", {}).get(key) != value:
                    raise self._other(f"{key} differs")
            return sum(self.done(k) for k in range(self.count))
        if create:
            os.mkdir(self.folder)
            out = outputs.Output(job_file, "job file", _JOB_KIND, True, job_file)
            outputs.write_json(self.record(), out, "upscale")
        return 0

    def _other(self, what: str) -> OutputError:
        return OutputError(f"{self.folder!r} holds an unfinished run of other settings ({what}); run the command "
                           "that started it to finish it, or remove that folder to start again")

    def segments(self) -> list[str]:
        """The made segments' paths, in order (empty ones left out)."""
        return [self.segment_path(k) for k in range(self.count) if os.path.exists(self.segment_path(k))]

    def started(self) -> bool:
        """Whether a segment was made (a run stopped now can be resumed from it)."""
        return any(self.done(k) for k in range(self.count))

    def remove_unstarted(self) -> None:
        """Removes the work folder when it holds nothing but its job file and temporaries (a run stopped before its
        first segment was made)."""
        with contextlib.suppress(OSError):
            if all(n == JOB_NAME or outputs.TMP_NAME.fullmatch(n) for n in os.listdir(self.folder)):
                self.remove()

    def remove(self) -> None:
        """Removes the work folder: only what megan-fast put there (its job file, segments, temporaries)."""
        if not os.path.isdir(self.folder):
            return
        for name in os.listdir(self.folder):
            path = os.path.join(self.folder, name)
            if name == JOB_NAME or _SEGMENT.fullmatch(name) or outputs.TMP_NAME.fullmatch(name):
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path)
                else:
                    os.remove(path)
        try:
            os.rmdir(self.folder)
        except OSError:  # something else is in it: left alone, with the folder
            pass
