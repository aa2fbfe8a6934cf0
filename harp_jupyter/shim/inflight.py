"""InflightWindow: a ``BatchWriter``'s batches sent and not yet answered, and their replies.

Batches are numbered in the order they are sent, and the agent answers them in that order: a
reply must answer the oldest batch in the window, or the connection is broken (nothing more can
be sent on it). An error message instead of a reply means the agent could not take a batch as
one: that ends the writer too. The first error that ends the writer is ``fatal``: every later use
raises it. Everything here runs with the writer's lock held; the writer decides when to wait.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

import zmq

from gpu_agent import protocol
from harp_jupyter.shim.call_queue import CallMeta
from harp_jupyter.shim.errors import Error, GPULostError, ProtocolError, error_from_agent
from harp_jupyter.shim.replies import PendingBatch, ReplyDelivery
from harp_jupyter.shim.transport import AgentConnection


class InflightWindow:
    """The unanswered batches in order, the next sequence number, and receiving."""

    def __init__(self, connection: AgentConnection,
                 on_call_error: Callable[[CallMeta | None, dict[str, Any]], None]) -> None:
        self.connection = connection
        self.batches: deque[PendingBatch] = deque()
        self.next_seq = 1
        self.fatal: Error | None = None
        self.replies = ReplyDelivery(connection.label, on_call_error, self._record_fatal)

    def _record_fatal(self, error: Error) -> Error:
        """``error`` ends the writer: every later use raises it."""
        self.fatal = error
        return error

    def answered_through(self) -> int:
        """The sequence number of the last batch whose reply arrived (0: none yet)."""
        return self.batches[0].seq - 1 if self.batches else self.next_seq - 1

    def reap(self) -> None:
        """Handle the replies that have already arrived, without waiting."""
        while self.batches and self.connection.has_message():
            if not self.receive_one(wait=False):
                break  # it was not a reply (a status answer): nothing to wait for

    def receive_one(self, wait: bool = True) -> bool:
        """Receive and handle one message; False if ``wait`` is off and none was there."""
        if self.fatal is not None:
            raise self.fatal
        try:
            header, frames = self.connection.recv(None if wait else 0)
        except TimeoutError:
            return False
        except GPULostError as e:
            self.fatal = e
            raise
        self.handle(header, frames)
        return True

    def handle(self, header: dict[str, Any], frames: list[zmq.Frame]) -> None:
        kind = header.get("t")
        if kind == protocol.REPLY:
            pending = self.batches[0] if self.batches else None
            if pending is None or header.get("q") != pending.seq:
                expected = pending.seq if pending else None
                self.fatal = ProtocolError(
                    f"the agent at {self.connection.label} replied to batch "
                    f"{header.get('q')!r}, expected {expected!r}")
                raise self.fatal
            self.batches.popleft()
            self.replies.accept(pending, header, frames, profiled=True)
        elif kind == protocol.ERROR:
            # An error message, not a reply: the agent could not take a batch as one, so the
            # in-order accounting is broken; nothing more can be sent on this connection.
            error = header.get("e") if isinstance(header.get("e"), dict) else {}
            self.fatal = error_from_agent(error)
            self.fatal.args = (f"the GPU agent at {self.connection.label} refused this"
                               f" session's messages: {self.fatal.args[0]}",)
            raise self.fatal
        # anything else (a late welcome, an unknown type) is ignored

    def receive_through(self, seq: int, deadline: float, clock: Callable[[], float]) -> None:
        """Receive the replies of batches up to ``seq`` still on their way, until the
        connection drops or ``clock()`` passes ``deadline``; nothing is sent."""
        batches = self.batches
        while self.fatal is None and batches and batches[0].seq <= seq:
            left = deadline - clock()
            if left <= 0:
                return
            try:
                header, frames = self.connection.recv(left)
            except (TimeoutError, GPULostError):
                return
            if header.get("t") == protocol.REPLY and header.get("q") == batches[0].seq:
                self.replies.accept(batches.popleft(), header, frames, profiled=False)
