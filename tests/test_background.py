"""The reader and writer threads of ``megan-fast upscale`` (megan_fast/background.py)."""

from __future__ import annotations

import threading
import time

import pytest

from megan_fast.background import BackgroundWriter, prefetch


def _threads() -> set[str]:
    return {t.name for t in threading.enumerate() if t.name.startswith("megan-fast-")}


def test_prefetch_keeps_order_and_runs_ahead():
    produced = []

    def items():
        for i in range(20):
            produced.append(i)
            yield i

    feed = prefetch(items(), size=4)
    assert next(feed) == 0
    # Ahead of the consumer up to the bound: 4 queued and 1 waiting to be put, beside the one consumed.
    deadline = time.monotonic() + 60
    while len(produced) < 6 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)
    assert len(produced) == 6
    assert list(feed) == list(range(1, 20))
    assert "megan-fast-reader" not in _threads()


def test_prefetch_raises_the_producers_error_and_closes_its_source():
    closed = []

    def items():
        try:
            yield 1
            raise ValueError("bad frame 2")
        finally:
            closed.append(True)

    feed = prefetch(items())
    assert next(feed) == 1
    with pytest.raises(ValueError, match="bad frame 2"):
        next(feed)
    assert closed == [True]


def test_closing_prefetch_early_stops_the_thread():
    closed = []

    def endless():
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            closed.append(True)

    feed = prefetch(endless(), size=2)
    assert next(feed) == 0
    feed.close()
    assert closed == [True] and "megan-fast-reader" not in _threads()


def test_writer_writes_in_order_and_close_waits():
    seen = []
    w = BackgroundWriter(lambda x: (time.sleep(0.01), seen.append(x)), size=2)
    for i in range(10):
        w.write(i)
    w.close()
    assert seen == list(range(10))
    assert "megan-fast-writer" not in _threads()


def test_writer_error_reaches_the_caller():
    def write(x):
        if x == 3:
            raise OSError("disk full")

    w = BackgroundWriter(write, size=1)
    with pytest.raises(OSError, match="disk full"):
        for i in range(100):
            w.write(i)
        w.close()
    assert "megan-fast-writer" not in _threads()


def test_writer_abort_drops_the_queue():
    seen = []
    w = BackgroundWriter(lambda x: (time.sleep(0.05), seen.append(x)), size=50)
    for i in range(50):
        w.write(i)
    w.abort()
    assert len(seen) < 50 and "megan-fast-writer" not in _threads()
