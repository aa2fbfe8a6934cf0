"""BatchWriter: queues forwarded calls and sends them to the agent as batches.

A batch goes out when a sync point needs it (``flush``), when it holds ``max_calls`` calls or
``flush_bytes`` of frames, or within ``linger`` seconds of its first call: the caller's thread
sends it when it queues a later call past that time, and a daemon thread when nobody queues one
(a thread waiting for the GIL behind a busy notebook gets it only every switch interval, 5 ms).
At most ``max_inflight`` batches are unacknowledged: the sender receives replies before it sends
more, so a loop of a million launches applies back-pressure instead of growing memory.

The calls not sent yet are a ``CallQueue`` (call_queue.py: small buffers copied into the call,
large ones zero-copy frames), the linger timer a ``LingerThread`` (linger.py), what a reply's
values and error do a ``ReplyDelivery`` (replies.py), and the batches sent and not yet answered,
with receiving their replies, an ``InflightWindow`` (inflight.py); this module decides when a
batch goes, sends it, and waits on the window. A call added with ``track=True`` ends its batch at
once and returns a tracker; ``wait_sent`` returns once ZeroMQ sent its frames whole on a
live link (the caller's buffer may then be reused, so the batch can no longer be sent again).

A sync point with nothing in flight sends the calls queued and its own as one batch and waits
for the reply at once (``call_alone``), with the same in-flight record and delivery.

A call added after the link dropped is kept with the calls not sent yet, and the drop raised:
when the agent parked the session (not lost it), they are all sent again after the restore.

Replies arrive in order. Each call's value goes to its ``on_result`` (``FrameRef`` values as
memoryviews of the reply's frames); a reply's error (the first failed call of its batch) goes to
the failed call's ``on_error`` and then to ``on_call_error(call_meta, error)``. All socket use and
every callback happen under ``lock`` (a re-entrant lock the session shares); the linger thread
takes it too, so callbacks may run on that thread.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import zmq

from gpu_agent import protocol
from harp_jupyter.profiler import recorder as profiling
from harp_jupyter.shim.call_queue import BUF_POSITIONS, CallMeta, CallQueue, byte_view
from harp_jupyter.shim.callsite import CallSite, user_call_site
from harp_jupyter.shim.errors import Error, GPULostError
from harp_jupyter.shim.inflight import InflightWindow
from harp_jupyter.shim.linger import LingerThread
from harp_jupyter.shim.replies import PendingBatch, Unanswered
from harp_jupyter.shim.transport import AgentConnection

__all__ = ["BUF_POSITIONS", "BatchWriter", "CallMeta", "PendingBatch", "Unanswered",
           "byte_view"]

DEFAULT_LINGER_S = 0.001
DEFAULT_FLUSH_BYTES = 8 << 20
#: ops whose calls need ``CallQueue.add`` (buffers to convert, kernel names to note): never
#: sent by ``call_alone``
_GENERAL_OPS = frozenset(BUF_POSITIONS) | profiling.NAMING_OPS


class BatchWriter:
    """Queued calls, flush policy, sending, and the bound on the in-flight window; see the
    module docstring."""

    def __init__(self, connection: AgentConnection,
                 on_call_error: Callable[[CallMeta | None, dict[str, Any]], None], *,
                 lock: threading.RLock | None = None,
                 linger: float = DEFAULT_LINGER_S,
                 flush_bytes: int = DEFAULT_FLUSH_BYTES,
                 max_calls: int = protocol.MAX_CALLS_PER_BATCH,
                 max_inflight: int = protocol.MAX_INFLIGHT_BATCHES,
                 max_frame: int = protocol.MAX_FRAME_BYTES,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.connection = connection
        self.lock = lock or threading.RLock()
        self.flush_bytes = flush_bytes
        self.max_calls = min(max_calls, protocol.MAX_CALLS_PER_BATCH)
        self.max_inflight = max(1, min(max_inflight, protocol.MAX_INFLIGHT_BATCHES))
        self._queue = CallQueue(max_frame)
        self._window = InflightWindow(connection, on_call_error)
        self._closing = False
        self._linger = LingerThread(linger, self._on_linger, self._has_queued)
        self._clock = clock
        #: when the batch being queued got its first call (``clock``)
        self._first_queued_at = 0.0
        #: figures for tests and profiling
        self.batches_sent = 0
        self.peak_inflight = 0

    # {{{ adding calls

    def add(self, op: str, args: Sequence[Any], site: CallSite | None = None,
            on_result: Callable[[Any], None] | None = None,
            on_error: Callable[[], None] | None = None, *,
            track: bool = False, end_batch: bool = False) -> zmq.MessageTracker | None:
        """Queue ``[op, *args]``. With ``track`` (or ``end_batch``) the batch is sent now;
        ``track`` returns its tracker (None when nothing went as a frame)."""
        with self.lock:
            window = self._window
            if window.fatal is not None and (self._closing
                                             or not isinstance(window.fatal, GPULostError)):
                raise window.fatal
            queue = self._queue
            queue.add(op, args, site, on_result, on_error)
            if window.fatal is not None:
                raise window.fatal  # the link dropped: kept with the calls not sent yet
            queued = len(queue)
            if (track or end_batch or queued >= self.max_calls
                    or queue.frame_bytes >= self.flush_bytes):
                return self._flush_locked(track)
            if queued == 1:
                self._first_queued_at = self._clock()
                self._linger.wake()  # the linger thread sends it if nobody else does soon
            elif self._clock() - self._first_queued_at >= self._linger.linger:
                self._flush_locked(False)
            return None

    def add_inline(self, call: list[Any], site: CallSite | None) -> None:
        """``add(call[0], call[1:], site)`` for a call whose buffer arguments are all ``bytes``
        shorter than ``protocol.MAX_INLINE_BYTES`` (the caller knows): nothing to convert, no
        callbacks, no tracker. ``call`` becomes the queue's."""
        with self.lock:
            fatal = self._window.fatal
            if fatal is not None and (self._closing or not isinstance(fatal, GPULostError)):
                raise fatal
            queue = self._queue
            queue.add_inline(call, site)
            if fatal is not None:
                raise fatal  # the link dropped: kept with the calls not sent yet
            queued = len(queue.calls)  # (the hot path: not through CallQueue.__len__)
            if queued >= self.max_calls or queue.frame_bytes >= self.flush_bytes:
                self._flush_locked(False)
            elif queued == 1:
                self._first_queued_at = self._clock()
                self._linger.wake()  # the linger thread sends it if nobody else does soon
            elif self._clock() - self._first_queued_at >= self._linger.linger:
                self._flush_locked(False)

    @property
    def max_frame(self) -> int:
        """The largest frame the agent takes (its welcome's ``max_frame``)."""
        return self._queue.max_frame

    @property
    def queued_calls(self) -> int:
        return len(self._queue)

    @property
    def peak_queued_calls(self) -> int:
        return self._queue.peak

    @property
    def inflight(self) -> int:
        return len(self._window.batches)

    # }}}

    # {{{ sending and receiving (all under the lock)

    def flush(self) -> int:
        """Send what is queued; the sequence number of the last batch sent (0 if none yet)."""
        with self.lock:
            if self._window.fatal is not None:
                raise self._window.fatal
            self._flush_locked(False)
            return self._window.next_seq - 1

    def _flush_locked(self, track: bool) -> zmq.MessageTracker | None:
        if not self._queue:
            return None
        recorder = profiling.active
        window = self._window
        batches = window.batches
        if len(batches) >= self.max_inflight:
            waited = recorder.now() if recorder is not None else 0
            while len(batches) >= self.max_inflight:
                window.receive_one()
            if recorder is not None:
                recorder.note_blocked(waited, recorder.now(), self._queue.metas[-1][0],
                                      user_call_site(), "window")
        seq = window.next_seq
        calls, metas, frames = self._queue.take()
        header: dict[str, Any] = {"t": protocol.BATCH, "q": seq, "c": calls}
        sent = 0
        if recorder is not None:
            header["p"] = recorder.level
            sent = recorder.now()  # before the send: the agent may read it at once
        try:
            tracker = self.connection.send(header, frames, track=track and bool(frames))
        except GPULostError as e:
            window.fatal = e
            # kept: if the agent parked the session, they are sent again after the restore
            self._queue.put_back(calls, metas, frames)
            raise
        window.next_seq = seq + 1
        batches.append(PendingBatch(seq, metas, sent,
                                    [recorder.detail_of(c) for c in calls]
                                    if recorder is not None else None,
                                    calls, frames, tracker=tracker))
        self.batches_sent += 1
        self.peak_inflight = max(self.peak_inflight, len(batches))
        return tracker

    def call_alone(self, call: list[Any], meta: CallMeta) -> bool:
        """A sync point's fast path: send the calls queued and ``call`` as one batch and handle
        its reply at once, when nothing is in flight or failed, no profile runs and ``call``
        has no buffer to convert or kernel to name; False (nothing sent) otherwise. The batch
        is in the in-flight record from its send to its reply, as any batch, so a park in
        between sends it again after the restore; the values go to the metas' ``on_result``,
        the error to ``on_call_error``, as ``add`` then ``wait_for`` would."""
        with self.lock:
            window = self._window
            batches = window.batches
            if (window.fatal is not None or batches or profiling.active is not None
                    or call[0] in _GENERAL_OPS):
                return False
            seq = window.next_seq
            queue = self._queue
            if queue.calls:
                calls, metas, frames = queue.take()
                calls.append(call)
                metas.append(meta)
            else:
                calls, metas, frames = [call], [meta], []
            try:
                self.connection.send({"t": protocol.BATCH, "q": seq, "c": calls}, frames)
            except GPULostError as e:
                window.fatal = e
                queue.put_back(calls, metas, frames)  # sent again after a restore
                raise
            window.next_seq = seq + 1
            pending = PendingBatch(seq, metas, calls=calls, frames=frames)
            batches.append(pending)
            self.batches_sent += 1
            self.peak_inflight = self.peak_inflight or 1
            try:
                header, frames = self.connection.recv(None)
            except GPULostError as e:
                window.fatal = e
                raise
            if header.get("t") == protocol.REPLY and header.get("q") == seq:
                batches.popleft()
                if "out" in header:
                    window.replies.accept(pending, header, frames, profiled=False)
                else:
                    window.replies.deliver(pending, header, frames)
                return True
            window.handle(header, frames)  # another message: the general way
            while batches:
                window.receive_one()
            return True

    def wait_for(self, seq: int) -> None:
        """Receive replies until batch ``seq`` (and all before it) is acknowledged."""
        with self.lock:
            window = self._window
            batches = window.batches
            if not (batches and batches[0].seq <= seq):
                return
            recorder = profiling.active
            if recorder is not None:
                waited = recorder.now()
                last = next((b for b in batches if b.seq == seq), batches[-1])
            while batches and batches[0].seq <= seq:
                window.receive_one()
            if recorder is not None:
                recorder.note_blocked(waited, recorder.now(), last.metas[-1][0],
                                      user_call_site(), "sync",
                                      last.details[-1] if last.details else "")

    def drain(self) -> None:
        """Send everything and wait for every reply."""
        self.wait_for(self.flush())

    def reap(self) -> None:
        """Process the replies that have already arrived, without waiting."""
        with self.lock:
            self._window.reap()

    def answered_through(self) -> int:
        """The sequence number of the last batch whose reply arrived (0: none yet)."""
        with self.lock:
            return self._window.answered_through()

    def receive_through(self, seq: int, timeout: float) -> None:
        """Receive the replies of batches up to ``seq`` that are still on their way (a parked
        session's worker answered them before it parked), until the connection drops or
        ``timeout`` seconds pass; nothing is sent. For ``take_unanswered``."""
        deadline = time.monotonic() + timeout
        with self.lock:
            self._window.receive_through(seq, deadline, time.monotonic)

    def take_unanswered(self) -> Unanswered:
        """Stop this writer without sending anything more, and hand over the batches it sent
        that were not answered and the calls it had not sent (its session was parked by the
        agent: the session decides what runs again after the restore)."""
        with self.lock:
            self._closing = True
            self._linger.stop()
            batches, self._window.batches = list(self._window.batches), deque()
            calls, metas, frames = self._queue.take()
            queued = PendingBatch(0, metas, calls=calls, frames=frames)
        self._linger.join(timeout=1.0)
        return Unanswered(batches, queued)

    def resend(self, batch: PendingBatch) -> None:
        """Send ``batch`` (one a parked writer had sent, or its unsent calls) as it was, after
        what is queued here: the calls of a session the agent parked before they ran."""
        if not batch.calls:
            return
        with self.lock:
            if self._window.fatal is not None:
                raise self._window.fatal
            self._flush_locked(False)
            self._queue.put_back(list(batch.calls), list(batch.metas), list(batch.frames))
            self._flush_locked(False)

    def wait_sent(self, trackers: Sequence[zmq.MessageTracker]) -> None:
        """Wait until ZeroMQ sent the frames of ``trackers`` whole; then their buffers are the
        caller's again, and their batches can no longer be sent again. GPULostError when the
        link drops first (ZeroMQ lets go of a message it was sending when the link drops: such
        a batch stays sendable again). The lock is not held while waiting."""
        recorder = profiling.active
        waited = recorder.now() if recorder is not None else 0
        self._wait_sent(trackers)
        with self.lock:
            if self._window.fatal is not None:
                raise self._window.fatal
            try:
                self.connection.poll_alive()
            except GPULostError as e:
                self._window.fatal = e
                raise
            for batch in self._window.batches:
                if batch.tracker is not None and any(batch.tracker is t for t in trackers):
                    batch.frames, batch.replayable, batch.tracker = [], False, None
        if recorder is not None:
            recorder.note_blocked(waited, recorder.now(), "htod", user_call_site(), "upload")

    def _wait_sent(self, trackers: Sequence[zmq.MessageTracker]) -> None:
        for tracker in trackers:
            while not tracker.done:
                try:
                    tracker.wait(0.05)
                except zmq.NotDone:
                    with self.lock:
                        if self._window.fatal is not None:
                            raise self._window.fatal from None
                        try:
                            self.connection.poll_alive()
                        except GPULostError as e:
                            self._window.fatal = e
                            raise

    # }}}

    # {{{ the linger thread

    def _has_queued(self) -> bool:
        return bool(self._queue.calls)  # (no lock: a list's length, read under the GIL)

    def _on_linger(self) -> bool:
        """Send what is queued (the linger thread, each ``linger`` while calls are queued);
        True when the writer is closing. With the window full it waits for the next period."""
        with self.lock:
            if self._closing:
                return True
            if self._window.fatal is not None or not self._queue:
                return False
            try:
                self._window.reap()
                if len(self._window.batches) < self.max_inflight:
                    self._flush_locked(False)
            except Error as e:
                self._window.fatal = self._window.fatal or e
            except Exception as e:  # never let the thread die silently
                self._window.fatal = Error(f"internal error in the shim's batch sender: {e!r}")
            return False

    # }}}

    @property
    def fatal(self) -> Error | None:
        return self._window.fatal

    def close(self) -> None:
        """Stop the linger thread; queued calls are sent (best effort) first."""
        with self.lock:
            if self._closing:
                return
            try:
                if self._window.fatal is None and not self.connection.lost:
                    self._flush_locked(False)
            except Error:
                pass
            self._closing = True
            self._linger.stop()
        self._linger.join(timeout=1.0)
