"""Type and range checks of config values: one home for the model config and the training config.

Each takes ``where`` (the entry's name in the message) and the value, returns
it and raises :class:`megan_fast.errors.ConfigError` with one line otherwise.
Bools are not integers here (``nf: true`` is refused), and numbers must be
finite.
"""

from __future__ import annotations

import math
from typing import Any

from megan_fast.errors import ConfigError


def check_int(where: str, value: Any, lo: int | None = None, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where} must be an integer, got {value!r}")
    if lo is not None and value < lo:
        raise ConfigError(f"{where} must be >= {lo}, got {value}")
    if hi is not None and value > hi:
        raise ConfigError(f"{where} must be <= {hi}, got {value}")
    return value


def check_float(where: str, value: Any, lo: float = -math.inf, hi: float = math.inf, lo_open: bool = False,
                hi_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        hint = " (write numbers without quotes)" if isinstance(value, str) else ""
        raise ConfigError(f"{where} must be a number, got {value!r}{hint}")
    if not math.isfinite(value) or value < lo or value > hi or (lo_open and value == lo) or (hi_open and value == hi):
        if hi == math.inf and lo == -math.inf:
            what = "a finite number"
        elif hi == math.inf:
            what = "positive" if lo == 0 and lo_open else f"{'>' if lo_open else '>='} {lo:g}"
            what += " (a finite number)"
        else:
            what = f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        raise ConfigError(f"{where} must be {what}, got {value!r}")
    return float(value)


def check_bool(where: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    return value


def check_str(where: str, value: Any, none_ok: bool = False) -> str | None:
    if value is None and none_ok:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where} must be a non-empty string, got {value!r}")
    return value
