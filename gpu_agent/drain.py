"""An agent's graceful end (SIGTERM): stop granting, finish what runs, hand parked state on.

``Drain`` runs on the supervisor's loop, a step per tick, and never waits. From the signal on:

* the agent is unready (/readyz) and says ``draining`` in its status, so kernels choosing an
  agent pass it by; a new lease request is refused, and every queued lease is revoked with the
  reason ``draining``: its kernel's keeper asks another agent of the pool at once;
* a held lease whose sessions are idle is revoked (its sessions park, as for a reclaim); one
  whose cell runs is left alone until the cell ends or the grace runs out;
* every parked session is offered to another agent of the pool (``--pool``) with
  ``parked_adopt``: that agent's worker fetches it from here, as it would for a kernel resuming
  there, parks it in its own store and answers ``parked``; the kernel finds it there at its next
  cell (the agents' status lists a kernel's own parked state). An agent that neither answers
  nor fetches a piece for ``offer_timeout`` s is passed over (a dead agent of the pool must not
  hold the state until the grace ends) and the next is offered it. One that no agent takes
  stays here, served to fetches, until the grace ends;
* when nothing is left (no lease, no running session, no parked state still here) the agent
  exits; at the grace's end it exits anyway: running cells are ended and their owners told why,
  parked state still here is dropped with a reason the next resume names.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import zmq

from gpu_agent import protocol as P
from gpu_agent.curve import ServerKeys, connect_encrypted
from gpu_agent.tenancy import Tenancy
from gpu_agent.tenants import SessionState

log = logging.getLogger("harp.agent.drain")

#: the reason a lease ended by a drain carries (the keepers act on it)
DRAINING = "draining"


@dataclass
class _Offer:
    """One parked session being handed to the pool's other agents, one agent at a time."""

    session_id: str
    untried: list[str]
    peer: str | None = None
    rid: int = 0
    failures: list[str] = field(default_factory=list)
    #: when the agent offered it is passed over, unless it answers or fetches before
    deadline: float = 0.0
    #: the fetch requests served for this session when ``deadline`` was last set
    served: int = 0


class Drain:
    """See the module docstring."""

    def __init__(self, tenancy: Tenancy, *, grace: float, offer_timeout: float, advertise: str,
                 peers: Callable[[], list[str]], token: str | None, curve: ServerKeys | None,
                 context: zmq.Context, clock: Callable[[], float] = time.monotonic) -> None:
        self.tenancy = tenancy
        self.grace = grace
        self.offer_timeout = offer_timeout
        self.advertise = advertise
        self._peers = peers
        self._token = token
        self._curve = curve
        self._context = context
        self._clock = clock
        self.started_at: float | None = None
        self._pool: list[str] = []
        self._sockets: dict[str, zmq.Socket] = {}
        self._offers: dict[str, _Offer] = {}
        #: parked sessions no agent took (kept here for fetches until the grace ends)
        self._stuck: dict[str, str] = {}
        #: agents of the pool that let an offer time out: not offered anything more
        self._silent: set[str] = set()
        self._rid = 0

    @property
    def active(self) -> bool:
        return self.started_at is not None

    def begin(self) -> None:
        """The signal came: refuse new leases, send queued kernels elsewhere."""
        if self.active:
            return
        self.started_at = self._clock()
        tenancy = self.tenancy
        tenancy.lease_desk.shutting_down = True
        try:
            self._pool = [p for p in self._peers() if p != self.advertise]
        except OSError as e:
            log.warning("draining: the pool's agents could not be resolved (%s): parked state "
                        "stays here until the grace ends", e)
        for lease in tenancy.leases.queue:
            tenancy.lease_desk.revoke(lease.lease_id, DRAINING)
        log.warning("draining (SIGTERM): no new leases; running cells have %g s; parked state "
                    "moves to %s", self.grace, ", ".join(self._pool) or "no other agent "
                    "(no --pool)")

    def tick(self) -> bool:
        """One step; True when the agent may exit now."""
        assert self.started_at is not None
        now = self._clock()
        tenancy = self.tenancy
        self._read_answers()
        self._pass_over_silent(now)
        for lease in list(tenancy.leases.holders):
            if tenancy.lease_desk.idle_seconds(lease, now) is not None:
                tenancy.lease_desk.revoke(lease.lease_id, DRAINING)
        for session in list(tenancy.book.sessions.values()):
            if (session.state is SessionState.PARKED and session.session_id not in self._offers
                    and session.session_id not in self._stuck):
                self._offers[session.session_id] = _Offer(session.session_id, list(self._pool))
        for offer in list(self._offers.values()):
            if offer.peer is None:
                self._offer_next(offer)
        if now - self.started_at >= self.grace:
            self._end_everything()
            return True
        busy = any(s.state is not SessionState.PARKED for s in tenancy.book.sessions.values())
        if tenancy.leases.holders or busy or self._offers:
            return False
        # everything that could move has moved; what no agent took is served to fetches
        # until the grace ends (a kernel's next cell may fetch it through another agent)
        return not self._stuck or not self._pool

    # {{{ handing parked state on

    def _offer_next(self, offer: _Offer) -> None:
        session = self.tenancy.book.get(offer.session_id)
        if session is None or session.state is not SessionState.PARKED:
            del self._offers[offer.session_id]  # restored or fetched meanwhile: gone from here
            return
        while offer.untried and offer.untried[0] in self._silent:
            offer.failures.append(f"{offer.untried.pop(0)}: did not answer an earlier offer")
        if not offer.untried:
            del self._offers[offer.session_id]
            why = "; ".join(offer.failures) or "no other agent in the pool (harp-agent --pool)"
            self._stuck[offer.session_id] = why
            log.warning("draining: parked session %s stays here (%s)", offer.session_id, why)
            return
        peer = offer.untried.pop(0)
        self._rid += 1
        offer.peer, offer.rid = peer, self._rid
        offer.deadline = self._clock() + self.offer_timeout
        offer.served = self.tenancy.handoff.served.get(offer.session_id, 0)
        manifest = self.tenancy.handoff.adoption_offer(session)
        self._socket(peer).send(P.pack_header({
            "t": P.PARKED_ADOPT, "rid": offer.rid, "token": self._token, "from": self.advertise,
            **manifest}))
        log.info("draining: offering parked session %s to %s", offer.session_id, peer)

    def _read_answers(self) -> None:
        for peer, socket in self._sockets.items():
            while socket.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                try:
                    reply, _ = P.decode(socket.recv_multipart(copy=False))
                except P.ProtocolError:
                    continue
                offer = next((o for o in self._offers.values()
                              if o.peer == peer and o.rid == reply.get("rid")), None)
                if offer is None:
                    continue
                if reply.get("t") == P.PARKED:
                    log.info("draining: parked session %s moved to %s", offer.session_id, peer)
                    del self._offers[offer.session_id]
                    # its worker told us to forget it (parked_forget): nothing is left here
                    continue
                error = reply.get("e") if isinstance(reply.get("e"), dict) else {}
                offer.failures.append(f"{peer}: {error.get('msg')}")
                offer.peer = None

    def _pass_over_silent(self, now: float) -> None:
        """Offers whose agent neither answered nor fetched for ``offer_timeout`` s go to the
        next agent; that agent gets no more offers (its socket, with what is queued, closes)."""
        served = self.tenancy.handoff.served
        for offer in self._offers.values():
            if offer.peer is None:
                continue
            count = served.get(offer.session_id, 0)
            if count != offer.served:  # it is fetching: alive
                offer.served, offer.deadline = count, now + self.offer_timeout
            elif now >= offer.deadline:
                log.warning("draining: %s did not answer the offer of parked session %s within "
                            "%g s: offering it to the next agent", offer.peer, offer.session_id,
                            self.offer_timeout)
                self._silent.add(offer.peer)
        for peer in self._silent & set(self._sockets):
            self._sockets.pop(peer).close(0)
        for offer in self._offers.values():
            if offer.peer in self._silent:
                offer.failures.append(f"{offer.peer}: no answer within {self.offer_timeout:g} s "
                                      "(harp-agent --drain-offer-timeout)")
                offer.peer = None

    def _socket(self, peer: str) -> zmq.Socket:
        socket = self._sockets.get(peer)
        if socket is None:
            socket = self._context.socket(zmq.DEALER)
            socket.setsockopt(zmq.LINGER, 0)
            if self._curve is not None:
                connect_encrypted(socket, self._curve)
            socket.connect(peer)
            self._sockets[peer] = socket
        return socket

    # }}}

    def _end_everything(self) -> None:
        """The grace is over: cells still running are ended, their owners told."""
        why = (f"the GPU agent shut down (its drain grace of {self.grace:g} s, harp-agent "
               "--drain-grace, ran out while your GPU work was still running)")
        self.tenancy.handoff.end_all(why, parked_reason=(
            "the GPU agent shut down and no other agent of its pool took its parked state"))

    def close(self) -> None:
        for socket in self._sockets.values():
            socket.close(0)
        self._sockets.clear()
