"""SessionParking: a session giving its GPU back (``park``) and the agent taking it first.

A park the session asks for drains its writer, tells the agent ``park`` and waits for
``parked``. The agent may park the session by itself first (a reclaim, the lease's end): then the
session's writer is kept as an ``Orphan``, and the next connect settles it (``parked_calls``):
what did not run is sent again after the restore. When the worker connection drops, the agent's
word on the control connection says which of the two happened, or that the session is lost.

The session installs itself as the ``ParkingHost``: this class reads its writer and tells it
when the writer is done with or the session lost; the session never reaches in here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

from gpu_agent import protocol
from harp_jupyter.shim import hooks
from harp_jupyter.shim.agent_link import AgentLink
from harp_jupyter.shim.batch import BatchWriter, PendingBatch
from harp_jupyter.shim.errors import (
    Error,
    GPULostError,
    LeaseLostError,
    describe_site,
    error_from_agent,
)
from harp_jupyter.shim.notice import in_kernel
from harp_jupyter.shim.parked_calls import (
    CarryOver,
    Orphan,
    await_notice,
    carry_over,
    park_wait_from_env,
)


class ParkingHost(Protocol):
    """What parking asks of the session it parks (RemoteSession)."""

    def current_writer(self) -> BatchWriter | None:
        """The writer calls go through now (None: parked, or not connected yet)."""

    def drop_writer(self) -> None:
        """The writer is done with (parked): the next GPU call connects again."""

    def note_lost(self, error: Error) -> None:
        """The session's state on the agent is gone: ``error`` is raised from now on."""

    def note_error(self, error: Error) -> None:
        """An error to raise at the next sync point (after any recorded before it)."""


class SessionParking:
    """Parks on request, keeps the orphan of a park the agent made, settles it on reconnect."""

    def __init__(self, host: ParkingHost, link: AgentLink) -> None:
        self._host = host
        self._link = link
        #: the writer of a session the agent parked by itself, settled at the next connect
        self.orphan: Orphan | None = None
        #: its calls to send again once restored (kept until a connect succeeds)
        self._carried: CarryOver | None = None
        #: of those, the ones a restore had not sent again when the agent parked it too
        self._not_resent: list[PendingBatch] = []
        #: how long to wait for the agent's word that it parked this session (HARP_PARK_WAIT)
        self.park_wait = park_wait_from_env()
        #: times this session was parked, for tests and %harp status
        self.parks = 0
        #: called with the writer before a park drains it (the memory's cache unmaps itself,
        #: so that a park does not copy freed memory): ``MemoryCalls.release_cache``
        self.before_park: Callable[[BatchWriter], None] | None = None

    def park(self, reason: str) -> dict[str, Any]:
        """Drain, then have the agent park the session (the session's lock held)."""
        host, link = self._host, self._link
        writer, connection, resume = host.current_writer(), link.connection, link.resume
        if writer is None or connection is None or resume is None:
            if self.orphan is not None:  # the agent parked it first: already done
                return self._parked_already(self.orphan.notice)
            return {"session": None, "agent": None, "bytes": 0}
        parking = time.monotonic_ns()
        try:
            if self.before_park is not None:
                self.before_park(writer)
            writer.drain()
        except GPULostError as e:  # its worker is gone: parked by the agent, or lost
            error = self.explain_loss(e)
            if error is not None:
                raise error from None
            return self._parked_already(self.orphan.notice if self.orphan else None)
        writer.close()
        writer.connection.close()
        try:
            connection.send({"t": protocol.PARK, "rid": 1, "token": connection.token})
            while True:
                reply, _ = connection.recv()
                if reply.get("t") == protocol.LOST and reply.get("session") not in (
                        None, resume["session"]):
                    continue  # about a session this connection served before, not this park
                if reply.get("t") in (protocol.PARKED, protocol.ERROR, protocol.LOST):
                    break
        except GPULostError as e:
            host.note_lost(e)
            raise
        if reply.get("t") != protocol.PARKED:
            # the agent parked it first (a reclaim, the lease's end): its notice says so,
            # or the session's loss with its reason
            notice = reply if reply.get("t") == protocol.LOST else await_notice(
                connection, str(resume["session"]), self.park_wait)
            if notice is not None and notice.get("parked"):
                self.orphan_writer(notice)
                return self._parked_already(notice)
            error = (notice or reply).get("e")
            error = error if isinstance(error, dict) else {}
            if notice is not None:
                host.note_lost(GPULostError(str(error.get("msg") or "lost")))
            raise error_from_agent(error, op="park")
        host.drop_writer()
        link.connection = None
        connection.close()
        self.parks += 1
        hooks.note_lease_span(f"park ({reason})", parking, time.monotonic_ns(),
                              agent=resume["agent"], bytes=int(reply.get("bytes") or 0))
        return {"session": resume["session"], "agent": resume["agent"],
                "bytes": int(reply.get("bytes") or 0)}

    def _parked_already(self, notice: dict[str, Any] | None) -> dict[str, Any]:
        """What a park answers when the agent had parked the session by itself first (a
        reclaim or the lease's end raced it): a success, marked ``already``."""
        resume = self._link.resume or {}
        return {"session": resume.get("session"), "agent": resume.get("agent"),
                "bytes": int((notice or {}).get("bytes") or 0), "already": True}

    def orphan_writer(self, notice: dict[str, Any] | None) -> None:
        """The agent parked this session by itself (lock held): keep its writer for the next
        connect to settle, with the agent's notice once read."""
        writer, link = self._host.current_writer(), self._link
        connection, resume = link.connection, link.resume
        if writer is None or connection is None or resume is None:
            return
        self.orphan = Orphan(writer, connection, str(resume["session"]), notice)
        self._host.drop_writer()
        link.connection = None

    def orphaned(self, writer: BatchWriter) -> bool:
        """Whether ``writer`` is the one the agent's park left, not settled yet."""
        return self.orphan is not None and self.orphan.writer is writer

    def copy_carried_frames(self) -> None:
        """The calls to send again keep copies of their buffers from now on (the caller gets
        its buffers back before the restore that sends them)."""
        for batch in [*(self._carried.resend if self._carried else ()), *self._not_resent]:
            batch.frames = [memoryview(bytes(frame)) for frame in batch.frames]

    def settle(self) -> None:
        """Before leasing again: wait for the agent's word on the parked session (it may still
        be parking: a restore must not race it) and sort its unanswered calls."""
        orphan, self.orphan = self.orphan, None
        if orphan is None:
            return
        self._link.retire(orphan.writer, orphan.connection)
        carried = carry_over(orphan, self.park_wait, self._not_resent)
        self._not_resent = []
        if self._carried is None:
            self._carried = carried
        else:  # a connect failed in between: the older calls go first
            self._carried.resend.extend(carried.resend)
            self._carried.dropped.extend(carried.dropped)
            self._carried.error = self._carried.error or carried.error

    def send_carried(self, writer: BatchWriter) -> None:
        """On the restored session's new writer: free what was dropped, report the error of
        what cannot be made good, and send again what did not run. GPULostError when the link
        drops under that (the agent parked the restored session too, or it is lost): the
        batches ``writer`` did not take are kept for the next restore, after its own."""
        carried, self._carried = self._carried, None
        if carried is None:
            return
        for meta in carried.dropped:
            if meta[3] is not None:
                meta[3]()  # e.g. an allocation that did not run: its addresses are free
        if carried.error is not None:
            self._host.note_error(carried.error)
        for index, batch in enumerate(carried.resend):
            try:
                writer.resend(batch)
            except GPULostError:
                # nothing was queued before it: its calls are queued now if the writer took it
                taken = writer.queued_calls > 0
                self._not_resent = carried.resend[index + 1 if taken else index:]
                raise

    def give_up(self, parks: int) -> LeaseLostError:
        """The agent parked the session ``parks`` times in a row while it was being restored:
        the calls still to send again are dropped (the program runs them again), and this is
        the error that says so; the session stays parked."""
        self.settle()
        carried, self._carried = self._carried or CarryOver(), None
        not_run = [meta for batch in carried.resend for meta in batch.metas]
        for meta in [*carried.dropped, *not_run]:
            if meta[3] is not None:
                meta[3]()  # e.g. an allocation that did not run: its addresses are free
        if carried.error is not None:
            self._host.note_error(carried.error)
        where = describe_site(not_run[0][0], not_run[0][1]) if not_run else ""
        return LeaseLostError(
            f"the agent parked this kernel's GPU session {parks} time{'s' if parks > 1 else ''} "
            "in a row while it was "
            "being restored (other kernels were waiting for the GPU each time)"
            + (f", so {len(not_run)} GPU call{'s' if len(not_run) > 1 else ''} did not run"
               if not_run else "")
            + ". The device memory stays parked as it was, and the next GPU call restores it: "
            f"re-run the {'cell' if in_kernel() else 'code'}. If this keeps happening, the GPU "
            "serves more notebooks than it can: ask your GPU operator for more agents or slots."
            + (f"\n  the first call that did not run: {where}" if where else ""))

    def explain_loss(self, error: GPULostError) -> Error | None:
        """Why the worker connection dropped, as the agent tells this session's control
        connection: parked by the agent (None: the writer is orphaned, and the next connect
        sends its unanswered calls again), or lost with its reason (returned, to raise). Its
        word is awaited as an event, up to the agent timeout (HARP_AGENT_TIMEOUT: a worker
        that froze gets no word at all); once the agent is known to have ended the lease, the
        next connect waits up to ``park_wait`` for the park itself."""
        connection, resume = self._link.connection, self._link.resume
        notice = None
        if connection is not None and resume is not None:
            notice = await_notice(connection, str(resume["session"]),
                                  min(connection.timeout, self.park_wait))
        if notice is None:
            self._host.note_lost(error)
            return error
        agent_error = notice.get("e") if isinstance(notice.get("e"), dict) else {}
        if notice.get("parked") and self._host.current_writer() is not None:
            self.orphan_writer(notice)
            return None
        lost = GPULostError(str(agent_error.get("msg") or error))
        self._host.note_lost(lost)
        return lost
