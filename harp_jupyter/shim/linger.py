"""The linger timer of a ``BatchWriter``, so that a lone call goes out when nothing sends it.

A daemon thread calls the writer's ``on_linger`` every ``linger`` seconds while calls are being
queued; it says whether to stop. The first call of a batch wakes the thread only when it is
asleep: once awake it keeps its period until ``QUIET_PERIODS`` periods in a row began no batch,
and then sleeps until woken again. Waking a sleeping thread for every batch cost a sync
loop (a call queued, then a sync point that sends it) a thread wake-up and a turn at the GIL
each time; a thread that ticks while the loop runs costs one short turn per period."""

from __future__ import annotations

import threading
from collections.abc import Callable

#: periods with nothing queued before the thread sleeps until the next batch wakes it
QUIET_PERIODS = 50


class LingerThread:
    def __init__(self, linger: float, on_linger: Callable[[], bool],
                 has_queued: Callable[[], bool]) -> None:
        self.linger = linger
        self._on_linger = on_linger
        self._has_queued = has_queued
        #: whether the thread is awake (ticking) or was woken: a plain flag, read without a lock
        self._awake = False
        self._wake = threading.Event()
        self._stop = threading.Event()
        #: batches begun (``wake`` calls): a period in which some began is not quiet, even when
        #: a sync point sent them before the period ended
        self.batches_begun = 0
        #: times the sleeping thread was woken (for tests)
        self.wakeups = 0
        self._thread = threading.Thread(target=self._loop, name="harp-batch-linger",
                                        daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Make sure ``on_linger`` runs within ``linger`` seconds (the caller queued a call)."""
        self.batches_begun += 1
        if not self._awake:
            self._awake = True
            self.wakeups += 1
            self._wake.set()

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
            self._wake.clear()
            quiet, seen = 0, self.batches_begun
            while True:
                if self._stop.wait(self.linger):
                    return
                if self._has_queued():
                    quiet = 0
                    if self._on_linger():
                        return
                    continue
                if self.batches_begun != seen:
                    quiet, seen = 0, self.batches_begun
                    continue
                quiet += 1
                if quiet < QUIET_PERIODS:
                    continue
                # asleep from here: a call queued before the flag changed is seen below, one
                # queued after it wakes the thread
                self._awake = False
                if not self._has_queued():
                    break
                self._awake = True
