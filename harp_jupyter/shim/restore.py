"""SessionRestore: a session's connects and restores, and its sends across a park.

A connect leases a GPU and opens the session on its agent, or restores a parked one (the same
address range, or device pointers would be wrong), then first sends again the calls the agent
parked before they ran (``SessionParking.send_carried``). When the agent parks the session again
meanwhile, it restores again, at most ``limit`` times in a row.

A send the agent's park cuts (the link drops under it) is not lost: the call stays with the
writer's calls not sent yet, the writer is orphaned, and the next GPU call restores the session
and sends it again after the calls that did not run. A send that must finish now (large buffers
that go zero-copy: the caller may change them once this returns, ``send_tracked``; a sync point,
``wait_everything``) restores now and sends again before it returns.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Protocol

from harp_jupyter.shim.agent_link import AgentLink
from harp_jupyter.shim.batch import BatchWriter, CallMeta
from harp_jupyter.shim.callsite import CallSite
from harp_jupyter.shim.device_memory import DeviceMemory
from harp_jupyter.shim.errors import Error, GPULostError, ProtocolError
from harp_jupyter.shim.parking import SessionParking


class RestoreHost(Protocol):
    """What restoring uses of its session."""

    lock: threading.RLock

    def current_writer(self) -> BatchWriter | None: ...

    def use_writer(self, writer: BatchWriter) -> None: ...

    def _ensure_connected(self) -> BatchWriter: ...

    def _on_call_error(self, meta: CallMeta | None, error: dict[str, Any]) -> None: ...

    def _add(self, writer: BatchWriter, op: str, args: Any, site: CallSite | None,
             on_result: Callable[[Any], None] | None = None,
             on_error: Callable[[], None] | None = None, *, end_batch: bool = False) -> None: ...


class SessionRestore:
    """Connect or restore, and send again what a park cut; see the module docstring."""

    def __init__(self, host: RestoreHost, link: AgentLink, parking: SessionParking,
                 memory: DeviceMemory) -> None:
        self._host = host
        self._link = link
        self._parking = parking
        self._memory = memory
        #: times the session was restored, for tests and %harp status
        self.restores = 0

    def connect(self, limit: int) -> BatchWriter:
        """Lease a GPU and open (or restore) the session on its agent (the session's lock
        held); when the agent parks it again while it sends its unanswered calls again, restore
        again (at most ``limit`` times in a row)."""
        host, link, parking = self._host, self._link, self._parking
        for _ in range(limit):
            parking.settle()
            link.close_stale()
            opened = link.open(self._memory.address_range)
            try:
                device = opened.welcome.get("device") or {}
                restored = self._memory.adopt_range(opened.base, opened.size,
                                                    device.get("total_memory"))
            except ProtocolError:
                opened.close()
                raise
            if restored:
                self.restores += 1
            link.commit(opened)
            writer = BatchWriter(opened.data, host._on_call_error, lock=host.lock,
                                 max_frame=opened.max_frame)
            host.use_writer(writer)
            try:
                parking.send_carried(writer)
                # learn the real free memory with the first reply, at no extra round trip
                writer.add("mem_get_info", [], None, self._memory.mem_info_receiver())
            except GPULostError as e:
                loss = parking.explain_loss(e)
                if loss is not None:
                    raise loss from None
                continue  # parked again: what it had not sent goes with the next restore
            return writer
        raise parking.give_up(limit)

    def wait_everything(self, writer: BatchWriter) -> None:
        """Send what is queued and wait for every reply. When the agent parked the session
        meanwhile, lease again, restore, send the calls it did not run, and wait for those."""
        host = self._host
        while True:
            try:
                writer.wait_for(writer.flush())
                return
            except GPULostError as e:
                if host.current_writer() is not writer:
                    raise  # not this session's current connection: nothing to explain
                error = self._parking.explain_loss(e)
                if error is not None:
                    raise error from None
            writer = host._ensure_connected()

    def send_tracked(self, writer: BatchWriter, calls: list[tuple[str, Any]],
                     site: CallSite | None) -> None:
        """Send calls whose large buffers go zero-copy, each batch ending with its call, and
        return once the buffers are on the wire (the caller may then change them). When the
        agent parks the session meanwhile (a link drop in the middle of a send), the buffers
        are still the caller's: the session is restored now and they are sent again before
        this returns, after the calls that did not run (each runs exactly once)."""
        host = self._host
        trackers, added = [], 0
        try:
            for op, args in calls:
                added += 1
                tracker = writer.add(op, args, site, track=True)
                if tracker is not None:
                    trackers.append(tracker)
            if trackers:
                writer.wait_sent(trackers)
            return
        except GPULostError as e:
            self.parked_meanwhile(writer, e)
            # the one whose send failed was kept (``BatchWriter.add``); the rest join it
            for op, args in calls[added:]:
                host._add(writer, op, args, site, end_batch=True)
        try:
            self.wait_everything(host._ensure_connected())
        except Error:
            # not restored now: they go with the next restore, as they are at this call
            self._parking.copy_carried_frames()
            raise

    def parked_meanwhile(self, writer: BatchWriter, error: GPULostError) -> None:
        """``writer``'s link dropped during a send: return when the agent parked the session
        (then ``writer`` is orphaned, and its calls not run are sent again after the restore),
        raise the loss otherwise."""
        with self._host.lock:
            if self._parking.orphaned(writer):
                return  # the agent's word that it ended the lease came first
            if self._host.current_writer() is not writer:
                raise error
            loss = self._parking.explain_loss(error)
            if loss is not None:
                raise loss from None
