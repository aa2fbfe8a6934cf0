"""Parked state moving between agents: serving it to another agent's worker, adopting it from a
draining agent, forgetting it once moved, and the end of whatever a drain could not hand on.

``ParkedHandoff`` checks every such request against the session's resume token (only its owner,
or the draining agent that holds it, has it); the bytes themselves travel worker to supervisor,
never through this class.
"""

from __future__ import annotations

import secrets
from typing import Any

from gpu_agent import protocol as P
from gpu_agent.errors import AgentError
from gpu_agent.lease_desk import LeaseDesk, described_map
from gpu_agent.limits import AgentLimits
from gpu_agent.parking import ParkedState, ParkStore
from gpu_agent.session_lifecycle import SessionLifecycle
from gpu_agent.tenants import MOVED, Session, SessionBook, SessionState, lost_message, read_text


class ParkedHandoff:
    """See the module docstring."""

    def __init__(self, book: SessionBook, desk: LeaseDesk, lifecycle: SessionLifecycle,
                 parking: ParkStore, limits: AgentLimits, *, endpoint: str) -> None:
        self.book = book
        self.desk = desk
        self.lifecycle = lifecycle
        self.parking = parking
        self.limits = limits
        self.endpoint = endpoint
        #: during a drain, how many fetch requests each parked session was served (a drain's
        #: offer is alive while the agent that took it keeps fetching)
        self.served: dict[str, int] = {}

    # {{{ serving parked state to another agent

    def parked_for(self, header: dict[str, Any]) -> tuple[Session, ParkedState]:
        """The parked session a ``parked_fetch``/``parked_chunk`` names, checked against its
        resume token (only its owner has it)."""
        session = self.book.get(self._text(header, "session"))
        token = self._text(header, "resume_token")
        if session is None or not secrets.compare_digest(session.resume_token, token):
            reason = self.parking.dropped.get(str(header.get("session")))
            raise AgentError("StateLost", lost_message(reason or "this agent does not have it"))
        parked = self.parking.get(session.session_id)
        if session.state is not SessionState.PARKED or parked is None:
            raise AgentError("SessionError", f"session {session.session_id} is not parked")
        if self.desk.shutting_down:
            self.served[session.session_id] = self.served.get(session.session_id, 0) + 1
        return session, parked

    def manifest(self, header: dict[str, Any]) -> dict[str, Any]:
        session, parked = self.parked_for(header)
        if header.get("kernel_id") != session.kernel_id:
            raise AgentError("LeaseError", "the parked session belongs to another kernel")
        return {"session": session.session_id, "kernel_id": session.kernel_id,
                "range": [session.base, P.SESSION_RANGE_SIZE], "client": session.client,
                "log": parked.log, "chunks": [[c[0], c[1]] for c in parked.chunks]}

    def forget_moved(self, header: dict[str, Any]) -> int:
        session, parked = self.parked_for(header)
        self.parking.drop(session.session_id, MOVED)
        self.book.forget(session)
        self.served.pop(session.session_id, None)
        return parked.nbytes

    # }}}

    # {{{ a drain's handoff

    def adoption_offer(self, session: Session) -> dict[str, Any]:
        """What a draining agent tells another about one of its parked sessions (``adopt``
        there): enough to fetch it from here and to know its owner when it comes back."""
        return {"session": session.session_id, "resume_token": session.resume_token,
                "kernel_id": session.kernel_id,
                "kernel_secret": self.book.secret_of(session.kernel_id),
                "range": [session.base, P.SESSION_RANGE_SIZE], "client": session.client}

    def adopt(self, route: bytes, header: dict[str, Any]) -> None:
        """Take over a parked session from a draining agent (``parked_adopt``): a worker fetches
        it from there (which then forgets it) and parks it here; answered with ``parked`` then.
        Refused without a free slot (the fetch passes through a worker's device memory)."""
        if self.desk.shutting_down:
            raise AgentError("SessionError", "this agent is shutting down too")
        session_id = self._text(header, "session")
        resume_token = self._text(header, "resume_token")
        kernel_id = self._text(header, "kernel_id")
        secret = self._text(header, "kernel_secret")
        origin, wanted = header.get("from"), header.get("range")
        if not (isinstance(origin, str) and origin.startswith("tcp://") and origin != self.endpoint
                and isinstance(wanted, list) and wanted and type(wanted[0]) is int):
            raise AgentError("ProtocolError", "parked_adopt needs the agent it comes 'from' and "
                             "the session's 'range'")
        if self.book.get(session_id) is not None:
            raise AgentError("SessionError", f"session {session_id} is already here")
        self.book.check_secret(kernel_id, secret)
        if not self.desk.leases.free_slots:
            raise AgentError("SessionError", "no free slot here to take parked state through")
        self.book.make_room(kernel_id)
        client = described_map(header, "client", "client description", self.limits)
        session = Session(session_id, kernel_id, resume_token, self.book.free_slot(wanted[0]),
                          client, resumed=True, adopting=True)
        if session.base != wanted[0]:
            raise AgentError("SessionError", f"its address range {wanted[0]:#x} is in use here")
        self.book.add(session)
        self.book.keep_secret(kernel_id, secret)
        self.lifecycle.open(session, route, header, {"fetch": {
            "endpoint": origin, "session": session_id, "resume_token": resume_token,
            "kernel_id": kernel_id, "token": header.get("token")}})
        self.desk.update()  # the fetch occupies a slot until it is parked

    def end_all(self, why: str, *, parked_reason: str) -> None:
        """The agent is going away: every session still running ends (its owner told why),
        every lease is revoked, parked state still here is dropped."""
        for session in list(self.book.sessions.values()):
            if session.state is SessionState.PARKED:
                self.parking.drop(session.session_id, parked_reason)
                self.book.forget(session)
            else:
                self.lifecycle.end(session, why, lost=True)
        for lease in self.desk.active_leases():
            self.desk.revoke(lease.lease_id, "draining")

    # }}}

    def _text(self, header: dict[str, Any], key: str) -> str:
        return read_text(header, key, self.limits.max_secret)
