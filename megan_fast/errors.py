"""The errors megan_fast raises for what a user gave it: bad input files, configs, checkpoints and outputs.

Each is a :class:`MeganFastError` and also the built-in exception a caller
would expect (``ValueError``), so ``except ValueError`` keeps working.  The
message is one line that names the argument or file and says what was
expected: ``megan-fast`` prints it as ``megan-fast CMD: error: MESSAGE`` and
exits with status 2, without a traceback.  Anything else that escapes a
command is a bug and keeps its traceback.
"""

from __future__ import annotations


class MeganFastError(Exception):
    """Base class: a problem with the user's input, config, checkpoint, output path or machine."""


class ConfigError(MeganFastError, ValueError):
    """A model or training config with a missing, unknown, mistyped or out-of-range entry."""


class CheckpointError(MeganFastError, ValueError):
    """A checkpoint that cannot be read, is not of the expected kind, or does not fit its model."""


class MissingCheckpointError(CheckpointError, FileNotFoundError):
    """A checkpoint folder or file that does not exist."""


class InputError(MeganFastError, ValueError):
    """An input file or folder that cannot be read as what it should be (image, video, frame folder)."""


class MissingInputError(InputError, FileNotFoundError):
    """An input file or folder that does not exist."""


class OutputError(MeganFastError, ValueError):
    """An output path that must not or cannot be written."""


class UsageError(MeganFastError, ValueError):
    """A command-line argument of the wrong kind or out of range (a device that does not exist, say)."""


def one_line(exc: BaseException) -> str:
    """What ``megan-fast`` prints for ``exc``: its message on one line (an ``OSError`` as ``reason: file``), then
    its notes (what was kept and how to go on), separated by ``; ``."""
    text = str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        text = f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    return "; ".join(" ".join(part.split()) for part in (text, *getattr(exc, "__notes__", ())) if part.strip())
