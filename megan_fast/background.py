"""Decoding and encoding beside the model: a reader thread ahead of it and a writer thread behind it.

``megan-fast upscale`` reads frames through :func:`prefetch` and writes them
through :class:`BackgroundWriter`, so the model runs while FFmpeg decodes the
next frames and encodes the last ones (both release the GIL).  Queues are
bounded (memory stays a few frames); an error in either thread is raised in
the main thread at the next call; signals are handled by the main thread,
which stops both threads on its way out (a reader in the middle of a
frame's decode is waited for, 10 s at the most; it is a daemon thread).
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any, Callable, Iterable, Iterator

_DONE = object()
_POLL = 0.1  # seconds: how often a blocked thread looks whether it should stop
_STOP_WAIT = 10.0  # seconds a closing prefetch waits for its thread (a frame being decoded), then leaves it


def prefetch(items: Iterable[Any], size: int = 8) -> Iterator[Any]:
    """Yields ``items`` in order, produced by a thread that runs up to ``size`` items ahead."""
    q: queue.Queue = queue.Queue(maxsize=size)
    stop = threading.Event()

    source = iter(items)

    def produce() -> None:
        try:
            for item in source:
                while not stop.is_set():
                    try:
                        q.put((item, None), timeout=_POLL)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put((_DONE, None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            q.put((_DONE, exc))
        finally:
            close = getattr(source, "close", None)  # a generator's cleanup (its open files) runs here
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name="megan-fast-reader", daemon=True)
    thread.start()
    try:
        while True:
            item, exc = q.get()
            if item is _DONE:
                if exc is not None:
                    raise exc
                return
            yield item
    finally:
        stop.set()
        deadline = time.monotonic() + _STOP_WAIT
        while thread.is_alive() and time.monotonic() < deadline:  # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                pass
            thread.join(_POLL)


class BackgroundWriter:
    """Calls ``write(*args)`` in a thread, in order, at most ``size`` calls behind the caller.

    :meth:`close` waits for every call and raises the first error of the
    thread; :meth:`abort` drops what is queued and stops.
    """

    def __init__(self, write: Callable[..., None], size: int = 8) -> None:
        self._write = write
        self._q: queue.Queue = queue.Queue(maxsize=size)
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="megan-fast-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            args = self._q.get()
            if args is _DONE or self._stop.is_set():
                return
            try:
                self._write(*args)
            except BaseException as exc:  # noqa: BLE001 - raised in the caller's thread
                self._error = exc
                self._stop.set()
                return

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def write(self, *args: Any) -> None:
        while True:
            self._raise()
            try:
                self._q.put(args, timeout=_POLL)
                break
            except queue.Full:
                if not self._thread.is_alive():
                    self._raise()
                    raise RuntimeError("the writer thread stopped")

    def close(self) -> None:
        """Waits until every queued call is done; raises the thread's error, if any."""
        while self._thread.is_alive():
            try:
                self._q.put(_DONE, timeout=_POLL)
                break
            except queue.Full:
                continue
        self._thread.join()
        self._raise()

    def abort(self) -> None:
        """Stops after the call in progress; queued calls are dropped."""
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._q.get_nowait()
            except queue.Empty:
                pass
            try:
                self._q.put_nowait(_DONE)
            except queue.Full:
                pass
            self._thread.join(_POLL)
