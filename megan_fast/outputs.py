"""Output safety: the one module through which every megan-fast command writes a user-visible path.

The rules (docs/DESIGN.md section 5, "Users' files"):

1. :func:`check_output` runs before any work.  An empty path is an error; an
   output may not be, contain or lie inside any input, nor be or contain the
   working folder; a file is never written where a folder is expected, or the
   other way round; the parent folder must exist (``make_parents`` for run
   folders) and be writable; an existing output is replaced only with
   ``--overwrite`` and only if megan-fast wrote it.
2. What megan-fast writes carries a mark (:func:`written_by`): a PNG text
   chunk, the container comment of a video, a ``written_by`` entry in JSON,
   a first-line comment in YAML.  A folder is megan-fast's when every entry is
   a marked file of the expected name (:class:`Kind`).  Anything else is the
   user's and is never replaced or deleted.
3. Outputs are written to a hidden temporary file or folder beside the target
   (``.megan-fast-*``) and renamed into place when complete
   (:meth:`Output.atomic_file`, :meth:`Output.atomic_folder`); the temporary
   is created inside the ``try`` that removes it, and on any exit, including
   SIGINT and SIGTERM (:func:`sigterm_raises`), nothing half-written stays.
   Outputs get the mode the umask gives (as ``open()`` would), not
   ``tempfile``'s 0600/0700.
4. JSON is strict (:func:`dumps`): a NaN or infinity becomes ``null`` and a
   ``notes`` entry says where.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import signal
import tempfile
import threading
from typing import Any, Iterable, Iterator

from megan_fast.errors import OutputError

TMP_PREFIX = ".megan-fast-"
# The names tempfile gives our temporaries (prefix + 8 random characters + the target's extension), and the
# "-old" name of a folder being replaced: an earlier run killed outright (SIGKILL) may have left them.
TMP_NAME = re.compile(re.escape(TMP_PREFIX) + r"[a-z0-9_]{8}(\.[A-Za-z0-9]+)?(-old)?")
MARK = "megan-fast"
VIDEO_EXTENSIONS = (".mp4", ".mkv", ".mov", ".webm", ".avi")  # files recognised as videos (not all are written)


def written_by(command: str | None = None) -> str:
    """The mark put in every file megan-fast writes, e.g. ``"megan-fast 0.1.0 upscale"``."""
    from megan_fast import __version__

    return f"{MARK} {__version__}" + (f" {command}" if command else "")


# --------------------------------------------------------------------------- recognising our own files


def _marked(value: Any, commands: tuple[str, ...] | None = None) -> bool:
    if not (isinstance(value, str) and (value == MARK or value.startswith(MARK + " "))):
        return False
    parts = value.split()  # "megan-fast", version, command
    return commands is None or (len(parts) >= 3 and parts[2] in commands)


def is_ours(path: str, commands: tuple[str, ...] | None = None) -> bool:
    """Whether the file at ``path`` carries megan-fast's mark (by its extension's format; unknown: False), naming
    one of ``commands`` if given."""
    if os.path.islink(path) or not os.path.isfile(path):
        return False
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext == ".png":
            from PIL import Image

            with Image.open(path) as img:  # text chunks before the image data are read on open
                return _marked(img.info.get("Software"), commands)
        if ext == ".json":
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            return isinstance(data, dict) and _marked(data.get("written_by"), commands)
        if ext == ".safetensors":
            from safetensors import safe_open

            with safe_open(path, "pt") as f:  # the header only
                return _marked((f.metadata() or {}).get("written_by"), commands)
        if ext in (".yaml", ".yml"):
            with open(path, encoding="utf-8") as f:
                first = f.readline()
            return first.startswith("# ") and _marked(first[2:].strip().split(":")[0], commands)
        if ext == ".onnx":
            import onnx

            meta = {p.key: p.value for p in onnx.load(path, load_external_data=False).metadata_props}
            return _marked(meta.get("written_by"), commands)
        if ext in VIDEO_EXTENSIONS:
            import av

            with av.open(path) as container:
                meta = {k.lower(): v for k, v in container.metadata.items()}
            return _marked(meta.get("comment"), commands)
    except Exception:  # unreadable or not of that format: not ours
        return False
    return False


@dataclasses.dataclass(frozen=True)
class Kind:
    """What a command writes at one output path, and how to recognise an earlier one.

    Args:
        what: a few words for messages ("video file", "folder of PNG frames").
        folder: the output is a folder (else a file).
        entries: folders: a regular expression that the names of its files match.
        nested: folders: the files may sit in sub-folders of any name and
            depth (``eval --save-frames``: one folder per clip, and Vimeo-90K
            keys such as ``00001/0001`` are two levels).
        by_name: files inside a folder that only megan-fast writes (a run's
            checkpoints): a name matching ``entries`` is enough.
        commands: the marks must name one of these commands (an eval JSON
            may replace an eval JSON, not a model's config.json).
    """

    what: str
    folder: bool = False
    entries: str | None = None
    nested: bool = False
    by_name: bool = False
    commands: tuple[str, ...] | None = None

    def foreign(self, path: str) -> str | None:
        """None if ``path`` is an output of this kind that megan-fast wrote, else the first path in it that is not.

        Temporary files of an earlier run (``.megan-fast-*``) count as megan-fast's.
        """
        if not self.folder:
            if self.by_name:
                return None if self.entries and re.fullmatch(self.entries, os.path.basename(path)) else path
            return None if is_ours(path, self.commands) else path
        for name in sorted(os.listdir(path)):
            entry = os.path.join(path, name)
            if TMP_NAME.fullmatch(name) and not os.path.islink(entry):
                # A killed run's temporary: a file, or a folder holding only this kind's files.
                if not os.path.isdir(entry) or dataclasses.replace(self, nested=True).foreign(entry) is None:
                    continue
                return entry
            if os.path.isdir(entry) and not os.path.islink(entry):
                if not self.nested:
                    return entry
                inner = self.foreign(entry)
                if inner is not None:
                    return inner
            elif not (self.entries and re.fullmatch(self.entries, name) and is_ours(entry, self.commands)):
                return entry
        return None


# A model folder (megan-fast convert, a training run's model/): replaced whole, only if every file is a model's.
MODEL_FOLDER_KIND = Kind("model folder", folder=True, entries=r"config\.json|model\.safetensors", commands=("model",))


# --------------------------------------------------------------------------- temporaries, umask, signals

_live: set[str] = set()  # temporaries not yet renamed or removed


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
    _live.discard(path)


def remove_leftovers() -> None:
    """Removes every temporary this process created and has not renamed or removed yet."""
    for path in list(_live):
        _remove(path)


def umask() -> int:
    """The process's umask, read without changing it where the system allows."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM while :func:`sigterm_raises` is active (exit status 143)."""


_signalled: list[int] = []  # signals whose exception may have been swallowed (raised inside an "ignored" context)
_ignore_after = [False]


def ignore_signals_after() -> None:
    """When the :func:`sigterm_raises` block ends, ignore SIGINT and SIGTERM instead of restoring the old
    handlers: for a process that is exiting after an interruption (its teardown must not be cut short)."""
    _ignore_after[0] = True


def raise_if_signalled() -> None:
    """Raises KeyboardInterrupt or :class:`Terminated` for a signal whose first exception was lost.

    A signal handler's exception raised inside, say, an at-fork callback or
    a ``__del__`` is printed as "Exception ignored" and dropped; long loops
    call this once per step so that such a signal still ends the run.
    """
    if len(_signalled) == 1:
        signum = _signalled[0]
        _signalled.append(signum)  # raised once only
        raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """SIGTERM raises :class:`Terminated` and SIGINT KeyboardInterrupt, so ``finally`` blocks remove temporaries.

    Each signal is also remembered for :func:`raise_if_signalled`.  Only the
    first raises: a second (a double Ctrl-C, a scheduler's repeated SIGTERM)
    is ignored so that it cannot interrupt the cleanup; a third ends the
    process at once.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_signal(signum, frame):
        _signalled.append(signum)
        if len(_signalled) == 1:
            raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()
        if len(_signalled) >= 3:  # a third: the user insists; stop at once (temporaries may stay)
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
        # A second one is ignored: it must not cut the cleanup of the first short.

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        _signalled.clear()
        for s, handler in previous.items():
            if _ignore_after[0]:
                handler = signal.SIG_IGN
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        _ignore_after[0] = False


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Delays SIGINT and SIGTERM to the end of the block.

    Around a rename and its bookkeeping (not cut in two), around starting
    and stopping worker processes (a child forked here starts with both
    signals blocked, so one meant for the parent's process group cannot kill
    it before it sets its own handling: the training's data workers ignore
    them), and around code whose exceptions Python only prints (``__del__``).
    The signals are blocked, and a handler that was already due records
    instead of raising; both are delivered when the block ends.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    kinds = (signal.SIGINT, signal.SIGTERM)
    caught: list[int] = []
    saved = {s: signal.getsignal(s) for s in kinds}
    masked = hasattr(signal, "pthread_sigmask")  # not on Windows: there the handlers alone hold
    previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, set(kinds)) if masked else None
    for s in kinds:
        signal.signal(s, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        if masked:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)  # a pending signal is delivered now
        if caught:
            signal.raise_signal(caught[0])


# --------------------------------------------------------------------------- paths


def _within(child: str, parent: str) -> bool:
    return child == parent or child.startswith(parent.rstrip(os.sep) + os.sep)


def _same(a: str, b: str) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


@dataclasses.dataclass
class Output:
    """A checked output path (from :func:`check_output`); write it with :meth:`atomic_file` or :meth:`atomic_folder`."""

    path: str  # absolute; the parent folder resolved, the last component as given
    arg: str  # what the user called it in messages: "OUTPUT", "--json"
    kind: Kind
    overwrite: bool
    shown: str  # the path as the user gave it

    def _describe(self) -> str:
        return f"{self.arg} {self.shown!r}"

    def _check_type(self) -> bool:
        """Whether the path exists; raises OutputError if it is a link, or a file where a folder goes (or the reverse)."""
        if not os.path.lexists(self.path):
            return False
        if os.path.islink(self.path):
            raise OutputError(f"{self._describe()} is a symbolic link; give the path of a new file or folder")
        if os.path.isdir(self.path) != self.kind.folder:
            found = "folder" if os.path.isdir(self.path) else "file"
            raise OutputError(f"{self._describe()} is a {found}, but a {self.kind.what} is written there; "
                              "choose another path")
        return True

    def check_existing(self) -> None:
        """Raises OutputError unless the path is free, or an earlier output of this kind that may be replaced."""
        if not self._check_type():
            return
        if not self.overwrite:
            raise OutputError(f"{self._describe()} exists; pass --overwrite to replace it")
        foreign = self.kind.foreign(self.path)
        if foreign is not None:
            which = "" if foreign == self.path else f" ({os.path.relpath(foreign, self.path)!r} is not)"
            raise OutputError(f"{self._describe()} is not a {self.kind.what} that megan-fast wrote{which}; "
                              "--overwrite replaces only megan-fast's own outputs: choose another path")

    def child(self, name: str, kind: Kind) -> "Output":
        """An output inside this folder output that replaces an earlier megan-fast file of the same name."""
        return Output(os.path.join(self.path, name), f"{self.arg} file", kind, True,
                      os.path.join(self.shown, name))

    @contextlib.contextmanager
    def _naming_failures(self, tmp: str) -> Iterator[None]:
        """A failed write (a full disk, a quota) names this output, not the temporary or nothing."""
        try:
            yield
        except OSError as exc:
            if exc.filename is None or _within(os.path.abspath(os.fspath(exc.filename)), tmp):
                raise OSError(exc.errno, exc.strerror or str(exc), self.shown) from None
            raise

    @contextlib.contextmanager
    def atomic_file(self) -> Iterator[str]:
        """Yields a temporary path beside the output; renamed onto it if the block succeeds, removed otherwise.

        The temporary keeps the output's extension (writers that pick a
        format from the name see the right one).
        """
        tmp = None
        try:
            with signals_held():
                fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=os.path.splitext(self.path)[1],
                                           dir=os.path.dirname(self.path))
                _live.add(tmp)
                os.close(fd)
            with self._naming_failures(tmp):
                yield tmp
            os.chmod(tmp, 0o666 & ~umask())
            with signals_held():
                self.check_existing()  # it may have appeared, or changed owner, while we worked
                os.replace(tmp, self.path)
                _live.discard(tmp)
                tmp = None
        finally:
            if tmp is not None:
                _remove(tmp)

    @contextlib.contextmanager
    def atomic_folder(self) -> Iterator[str]:
        """Yields a temporary folder beside the output; it takes the output's place if the block succeeds.

        An earlier output (checked again to be megan-fast's) is removed only
        after the new one is in place.
        """
        tmp = old = None
        try:
            with signals_held():
                tmp = tempfile.mkdtemp(prefix=TMP_PREFIX, dir=os.path.dirname(self.path))
                _live.add(tmp)
            with self._naming_failures(tmp):
                yield tmp
            os.chmod(tmp, 0o777 & ~umask())
            with signals_held():
                self.check_existing()
                if os.path.lexists(self.path):
                    old = tmp + "-old"
                    os.rename(self.path, old)
                    _live.add(old)
                try:
                    os.rename(tmp, self.path)
                except BaseException:
                    if old is not None:  # put the earlier output back: it is never lost
                        os.rename(old, self.path)
                        _live.discard(old)
                        old = None
                    raise
                _live.discard(tmp)
                tmp = None
        finally:
            for path in (tmp, old):
                if path is not None:
                    _remove(path)


def _linked_entries(folder: str, depth: int = 2, limit: int = 20000) -> Iterator[str]:
    """Real paths of the symbolic links in ``folder`` and its sub-folders, ``depth`` levels down, at most ``limit``
    entries read (a frame folder whose frames link elsewhere; a dataset's linked clip folders)."""
    pending, seen = [(folder, 0)], 0
    while pending and seen < limit:
        path, level = pending.pop()
        try:
            entries = list(os.scandir(path))
        except OSError:
            continue
        for entry in entries:
            seen += 1
            if entry.is_symlink():
                yield os.path.realpath(entry.path)
            elif level + 1 < depth and entry.is_dir(follow_symlinks=False):
                pending.append((entry.path, level + 1))


def _probe_writable(folder: str, described: str) -> None:
    try:
        with signals_held():
            fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=folder)
            os.close(fd)
            os.remove(tmp)
    except OSError as exc:
        raise OutputError(f"{described}: cannot write in {folder!r} ({exc.strerror or exc})") from None


def check_output(
    path: str | os.PathLike | None,
    arg: str,
    kind: Kind,
    inputs: Iterable[tuple[str, str | os.PathLike | None]] = (),
    overwrite: bool = False,
    existing: str = "replace",
    make_parents: bool = False,
) -> Output:
    """Checks an output path before any work; raises OutputError with a one-line reason.

    Args:
        path: the path the user gave.
        arg: its name in messages ("OUTPUT", "--json", "output_dir").
        kind: what will be written there.
        inputs: (name, path) of every input of the command (None entries skipped).
        overwrite: the user passed --overwrite.
        existing: what an existing output means: "replace" (it will be
            replaced: needs ``overwrite`` and must be megan-fast's), "fill" (a
            folder megan-fast writes named files into: without ``overwrite``
            it may hold only megan-fast's files; other files are left alone)
            or "keep" (the caller decides; only the file/folder type is checked).
        make_parents: missing parent folders will be created (the nearest
            existing one must be a writable folder).
    """
    if path is None or not str(path).strip():
        raise OutputError(f"{arg} is empty; give the path to write")
    shown = os.fspath(path)
    absolute = os.path.abspath(shown)
    parent = os.path.realpath(os.path.dirname(absolute))
    out = Output(os.path.join(parent, os.path.basename(absolute)), arg, kind, overwrite, shown)
    real = os.path.realpath(absolute)
    if existing != "replace" and kind.folder and os.path.islink(out.path) and os.path.isdir(out.path):
        out.path = real  # a folder written into, not replaced: a link to one (scratch space) is followed
    if existing == "replace" and _within(os.path.realpath(os.getcwd()), real):
        # (a folder that is written into, not replaced, may be the working folder: `cd run && train --resume`)
        raise OutputError(f"{out._describe()} is the working folder or contains it; give a new path")
    for name, inp in inputs:
        if inp is None:
            continue
        inp_real = os.path.realpath(os.fspath(inp))
        if _same(real, inp_real):
            raise OutputError(f"{out._describe()} is the input {name} {os.fspath(inp)!r}; choose another path")
        if _within(real, inp_real):
            raise OutputError(f"{out._describe()} lies inside the input {name} {os.fspath(inp)!r}; "
                              "choose a path outside it")
        if _within(inp_real, real):
            raise OutputError(f"{out._describe()} contains the input {name} {os.fspath(inp)!r}; "
                              "choose a path that does not")
    try:
        name_max = os.pathconf(parent if os.path.isdir(parent) else "/", "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    if len(os.fsencode(os.path.basename(absolute))) > name_max:
        raise OutputError(f"{out._describe()}: the name is too long for this file system (at most {name_max} "
                          "bytes); choose a shorter one")
    for name, inp in inputs:  # an input folder's entries may be links to files inside the output
        if inp is not None and os.path.isdir(inp):
            for linked in _linked_entries(os.fspath(inp)):
                if _within(linked, real):
                    raise OutputError(f"{out._describe()} contains files of the input {name} {os.fspath(inp)!r} "
                                      f"(it links to {linked!r}); choose a path that does not")
    folder = parent
    if make_parents:
        while not os.path.exists(folder):
            folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        what = "is not a folder" if os.path.exists(folder) else "does not exist"
        raise OutputError(f"{out._describe()}: {folder!r} {what}; create the folder first or choose another path")
    if existing == "replace":
        out.check_existing()
    elif out._check_type():
        if existing == "fill" and not overwrite:
            foreign = kind.foreign(out.path)
            if foreign is not None:
                raise OutputError(f"{out._describe()} holds files megan-fast did not write "
                                  f"({os.path.relpath(foreign, out.path)!r}); choose another folder, or pass "
                                  "--overwrite to write into it anyway (other files are left alone)")
    _probe_writable(out.path if existing != "replace" and os.path.isdir(out.path) else folder, out._describe())
    return out


# --------------------------------------------------------------------------- strict JSON


def json_safe(obj: Any, where: str = "") -> tuple[Any, list[str]]:
    """A copy of ``obj`` that strict JSON can hold: non-finite floats become None; returns (copy, notes)."""
    notes: list[str] = []

    def walk(x: Any, at: str) -> Any:
        if isinstance(x, dict):
            return {k: walk(v, f"{at}.{k}" if at else str(k)) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [walk(v, f"{at}[{i}]") for i, v in enumerate(x)]
        if isinstance(x, bool) or x is None or isinstance(x, (int, str)):
            return x
        try:
            value = float(x)
        except (TypeError, ValueError):
            return x
        if not math.isfinite(value):
            notes.append(f"{at or 'value'} was {value!r}, which JSON cannot hold; written as null")
            return None
        return value

    return walk(obj, where), notes


def dumps(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` that never writes NaN or Infinity: they become null, and a dict gets a ``notes`` list."""
    clean, notes = json_safe(obj)
    if notes and isinstance(clean, dict):
        clean["notes"] = list(clean.get("notes") or []) + notes
    return json.dumps(clean, allow_nan=False, **kwargs)


def write_json(obj: dict, out: Output, command: str) -> None:
    """Writes ``obj`` (with a ``written_by`` mark first) as strict, indented JSON, atomically."""
    text = dumps({"written_by": written_by(command), **obj}, indent=2) + "\n"
    with out.atomic_file() as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
