"""The linger timer of a ``BatchWriter``, so that a lone call goes out when nothing sends it.

A daemon thread runs the writer's callback ``linger`` seconds after it is woken (the first call
of a batch wakes it); the callback says whether to stop."""

from __future__ import annotations

import threading
from collections.abc import Callable


class LingerThread:
    def __init__(self, linger: float, on_linger: Callable[[], bool]) -> None:
        self.linger = linger
        self._on_linger = on_linger
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="harp-batch-linger",
                                        daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Run the callback ``linger`` seconds from now (if not woken already)."""
        self._wake.set()

    def clear(self) -> None:
        """Forget a wake-up (the callback calls it before looking at what is queued)."""
        self._wake.clear()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def join(self, timeout: float) -> None:
        """Wait for the thread to end, unless this is that thread (a callback stopping it)."""
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=timeout)

    def _loop(self) -> None:
        while True:
            self._wake.wait()
            if self._stop.wait(self.linger):
                return
            if self._on_linger():
                return
