"""A client's session messages: ``hello`` (new, resumed here, or fetched from another agent),
``park``, ``bye`` and dropping a kernel's sessions.

``SessionDesk`` checks each against the lease it presents and the books, then hands the work to
``SessionLifecycle``; a ``hello`` or ``park`` is answered when the worker reports back.
"""

from __future__ import annotations

import secrets
from typing import Any

from gpu_agent import protocol as P
from gpu_agent.errors import AgentError
from gpu_agent.lease_desk import LeaseDesk, described_map
from gpu_agent.leases import Lease
from gpu_agent.limits import AgentLimits
from gpu_agent.parking import ParkStore, discard
from gpu_agent.session_lifecycle import SessionLifecycle
from gpu_agent.tenants import (
    MOVED,
    Outbox,
    Session,
    SessionBook,
    SessionState,
    lost_message,
    read_text,
)


class SessionDesk:
    """See the module docstring."""

    def __init__(self, book: SessionBook, desk: LeaseDesk, lifecycle: SessionLifecycle,
                 parking: ParkStore, limits: AgentLimits, outbox: Outbox, *,
                 endpoint: str) -> None:
        self.book = book
        self.desk = desk
        self.lifecycle = lifecycle
        self.parking = parking
        self.limits = limits
        self.outbox = outbox
        self.endpoint = endpoint

    def hello(self, route: bytes, header: dict[str, Any]) -> None:
        lease = self.desk.held(header.get("lease"))
        client = described_map(header, "client", "client description", self.limits)
        resume = header.get("resume") if isinstance(header.get("resume"), dict) else None
        current = self.book.of_lease(lease.lease_id)
        if resume is None:
            if current:
                raise AgentError("SessionError", "this lease already has a GPU session here: "
                                 "resume it, or say bye first")
            session = self._new_session(lease, client, None)
            self.lifecycle.open(session, route, header, {})
            return
        session_id = self._text(resume, "session")
        resume_token = self._text(resume, "resume_token")
        session = self.book.get(session_id)
        if session is not None:
            if session.kernel_id != lease.kernel_id or not secrets.compare_digest(
                    session.resume_token, resume_token):
                raise AgentError("LeaseError", f"session {session_id} belongs to another kernel")
            if session.state is SessionState.ACTIVE and session.lease_id == lease.lease_id:
                session.route = route
                self.lifecycle.welcome(session, route, header)
                return
            if session.state is not SessionState.PARKED:
                raise AgentError("SessionError", f"session {session_id} is {session.state}: "
                                 "try again when it is parked")
            if current:
                raise AgentError("SessionError", "this lease already has another session here")
            parked = self.parking.take(session_id)
            if parked is None:
                self.book.forget(session)
                raise AgentError("StateLost", lost_message("its parked memory is gone"))
            session.lease_id = lease.lease_id
            session.resumed = True
            session.client = client or session.client
            _take_park_policy(session, lease)
            self.lifecycle.open(session, route, header, {"restore": {"log": parked.log,
                                                                     "chunks": parked.chunks}},
                                on_done=lambda: discard(parked))
            return
        reason = self.parking.dropped.get(session_id)
        if reason is not None and reason != MOVED:
            raise AgentError("StateLost", lost_message(reason))
        origin = resume.get("from")
        wanted = header.get("range")
        if not (isinstance(origin, str) and origin and origin != self.endpoint
                and isinstance(wanted, list) and wanted and type(wanted[0]) is int):
            raise AgentError("StateLost", lost_message(
                "it is not on this agent and no other agent was named to fetch it from"))
        if current:
            raise AgentError("SessionError", "this lease already has another session here")
        session = self._new_session(lease, client, wanted[0], session_id=session_id,
                                    resume_token=resume_token)
        if session.base != wanted[0]:
            self.book.forget(session)
            raise AgentError("StateLost", lost_message(
                f"its address range {wanted[0]:#x} is in use on this agent by another session, "
                "so its pointers could not stay valid here"))
        session.resumed = True
        self.lifecycle.open(session, route, header, {"fetch": {
            "endpoint": origin, "session": session_id, "resume_token": resume_token,
            "kernel_id": lease.kernel_id, "token": header.get("token")}})

    def _new_session(self, lease: Lease, client: dict[str, Any], wanted_base: int | None, *,
                     session_id: str | None = None,
                     resume_token: str | None = None) -> Session:
        self.book.make_room(lease.kernel_id)
        session = Session(session_id or secrets.token_hex(8), lease.kernel_id,
                          resume_token or secrets.token_urlsafe(18),
                          self.book.free_slot(wanted_base), client, lease_id=lease.lease_id)
        _take_park_policy(session, lease)
        self.book.add(session)
        return session

    def park_request(self, route: bytes, header: dict[str, Any]) -> None:
        session = self.book.of_route(route)
        if session is None:
            raise AgentError("SessionError", "park: this connection has no active session")
        session.waiting.append((route, header))
        self.lifecycle.park(session, "its kernel asked")

    def bye(self, route: bytes) -> None:
        session = self.book.of_route(route)
        if session is not None:
            self.lifecycle.end(session, "its client said bye")
        self.outbox.send(route, {"t": P.BYE})

    def drop_kernel(self, header: dict[str, Any]) -> tuple[int, int]:
        """End every session of a kernel that shut down; (sessions, bytes) they held."""
        kernel_id = self._text(header, "kernel_id")
        secret = self._text(header, "kernel_secret")
        known = self.book.knows_secret(kernel_id, secret)
        if known is None:
            return 0, 0
        if not known:
            raise AgentError("LeaseError", "wrong kernel_secret: refused")
        count = nbytes = 0
        for session in self.book.of_kernel(kernel_id):
            parked = self.parking.get(session.session_id)
            nbytes += parked.nbytes if parked else (
                session.worker.figures().get("device_bytes", 0) if session.worker else 0)
            count += 1
            self.lifecycle.end(session, "its kernel shut down")
        self.book.forget_secret(kernel_id)
        return count, nbytes

    def _text(self, header: dict[str, Any], key: str) -> str:
        return read_text(header, key, self.limits.max_secret)


def _take_park_policy(session: Session, lease: Lease) -> None:
    """The kernel's park_ttl and park_limit from its lease info (positive numbers, else none)."""
    info = lease.info if isinstance(lease.info, dict) else {}
    ttl, limit = info.get("park_ttl"), info.get("park_limit")
    session.park_ttl = float(ttl) if type(ttl) in (int, float) and 0 < ttl < 1e12 else None
    session.park_limit = int(limit) if type(limit) in (int, float) and 0 < limit < 1 << 62 \
        else None
