"""Who uses this agent's GPU and what they keep on it: leases, sessions, parked state.

``Tenancy`` is the supervisor's authority logic with no sockets of its own: the supervisor hands
it requests, worker messages and ticks, and sends what it puts in ``outbox``. The GPU's slots
belong to the holders of the held leases (``LeaseTable``); each active session runs in a worker
of its own (``WorkerPool``). When a lease ends, its kernel's active sessions are parked before the
slot is granted again, so a new tenant never shares memory with an old one, and the parked owner
finds its memory intact at the same addresses, here or on another agent.

Nothing here waits: opening, restoring and parking are orders to a worker, answered when the
worker reports back; a client's ``hello`` or ``park`` is answered then.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import msgpack

from gpu_agent import protocol as P
from gpu_agent import worker_link as W
from gpu_agent.errors import AgentError
from gpu_agent.leases import Lease, LeaseState, LeaseTable
from gpu_agent.limits import AgentLimits
from gpu_agent.metrics import AgentMetrics
from gpu_agent.parking import ParkStore, discard
from gpu_agent.workers import WorkerHandle, WorkerPool

log = logging.getLogger("harp.agent.tenancy")

#: ended leases are remembered this long, so a late renew gets "released" rather than "unknown"
FORGET_ENDED_S = 600.0
MOVED = "it moved to another agent"
DRAINING_REFUSAL = ("this GPU agent is shutting down (draining): it grants no new lease; ask "
                    "another agent of the pool")
#: how long a parking worker that has exited may take to have its report read
PARK_REPORT_S = 5.0
#: address ranges an agent hands out (each 256 GiB of virtual address space)
ADDRESS_RANGES = 256

Outgoing = tuple[bytes, dict[str, Any], list[Any]]


class SessionState(StrEnum):
    OPENING = "opening"  # a worker is creating or restoring it
    ACTIVE = "active"
    PARKING = "parking"  # its worker is writing its memory to the park store
    PARKED = "parked"


@dataclass
class Session:
    session_id: str
    kernel_id: str
    resume_token: str
    slot: int
    client: dict[str, Any]
    state: SessionState = SessionState.OPENING
    lease_id: str | None = None
    worker: WorkerHandle | None = None
    #: the client's connection to the supervisor (pushes go there)
    route: bytes | None = None
    #: requests answered when the worker reports: (route, header)
    waiting: list[tuple[bytes, dict[str, Any]]] = field(default_factory=list)
    attach: str = field(default_factory=lambda: secrets.token_urlsafe(18))
    park_ttl: float | None = None
    park_limit: int | None = None
    started: float = field(default_factory=time.time)
    resumed: bool = False
    #: when its client's worker connection dropped (monotonic), until it comes back
    gone_at: float | None = None
    #: when its parking worker's exit was seen before its report (monotonic)
    worker_exited_at: float | None = None
    #: why parking started (told to the owner)
    park_reason: str = ""
    #: when the running park or restore started (monotonic), for the metrics
    moving_since: float = 0.0
    #: taken over from a draining agent: parked again as soon as its worker has it
    adopting: bool = False

    @property
    def base(self) -> int:
        return P.session_range(self.slot)[0]


class Tenancy:
    """See the module docstring."""

    def __init__(self, workers: WorkerPool, parking: ParkStore, limits: AgentLimits, *,
                 endpoint: str, agent_info: dict[str, Any],
                 device_info: Callable[[], dict[str, Any]], metrics: AgentMetrics,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.workers = workers
        self.parking = parking
        self.limits = limits
        self.endpoint = endpoint
        self.agent_info = agent_info
        self.device_info = device_info
        self.metrics = metrics
        self._last_tick = clock()
        self._clock = clock
        self.leases = LeaseTable(limits.lease_ttl, clock, slots=limits.slots,
                                 max_queue=limits.max_queue, min_ttl=limits.min_lease_ttl)
        self.sessions: dict[str, Session] = {}
        self._kernel_secrets: dict[str, str] = {}
        #: lease id -> the connection that hears about that lease's changes
        self.lease_routes: dict[str, bytes] = {}
        #: last queue position told to each active lease, to push only changes
        self._told: dict[str, int] = {}
        self.outbox: list[Outgoing] = []
        #: refusals by kind, for status and metrics
        self.refusals: dict[str, int] = {}
        #: open orders for workers not ready yet, and what to do once a worker opened
        self._pending_open: dict[str, tuple[dict[str, Any], Callable[[], None] | None]] = {}
        self._after_open: dict[str, Callable[[], None]] = {}
        #: the agent is shutting down (gpu_agent.drain): no new leases, no adoptions
        self.draining = False

    def send(self, route: bytes, header: dict[str, Any], frames: list[Any] | None = None) -> None:
        self.outbox.append((route, header, frames or []))

    # {{{ leases

    def request(self, route: bytes, header: dict[str, Any]) -> None:
        if self.draining:
            raise AgentError("LeaseError", DRAINING_REFUSAL)
        kernel_id = self._text(header, "kernel_id")
        secret = self._text(header, "kernel_secret")
        user = header.get("user") if isinstance(header.get("user"), str) else ""
        if len(user) > self.limits.max_secret:
            raise AgentError("ProtocolError", "user name too long")
        info = header.get("info") if isinstance(header.get("info"), dict) else {}
        if len(msgpack.packb(info, default=str)) > self.limits.max_lease_info:
            raise AgentError("ProtocolError", f"lease info larger than "
                             f"{self.limits.max_lease_info} bytes (harp-agent --max-lease-info)")
        known = self._kernel_secrets.get(kernel_id)
        if known is not None and not secrets.compare_digest(known, secret):
            raise AgentError("LeaseError", f"kernel {kernel_id} is known here with another "
                             "kernel_secret: refused")
        for lease in self._active_leases():
            if lease.kernel_id == kernel_id:  # a resent request: the same lease again
                self._reply_lease(route, header, lease, with_token=True)
                return
        changed = self.leases.request(kernel_id, user, info, header.get("ttl"))
        self._kernel_secrets[kernel_id] = secret
        lease = changed[0]
        self._told[lease.lease_id] = self.leases.position(lease.lease_id)
        if lease.state is LeaseState.HELD:
            self.metrics.lease_granted(0.0)
        log.info("lease %s for kernel %s: %s", lease.lease_id, kernel_id, lease.state.value)
        self._reply_lease(route, header, lease, with_token=True)
        self._tell(self.settle(changed[1:]))

    def renew(self, route: bytes, header: dict[str, Any]) -> None:
        lease = self.leases.renew(*self._lease_ref(header))
        self._reply_lease(route, header, lease)

    def release(self, route: bytes, header: dict[str, Any]) -> None:
        changed = self.leases.release(*self._lease_ref(header))
        lease = changed[0]
        self._reply_lease(route, header, lease)
        self.lease_routes.pop(lease.lease_id, None)
        self._tell([x for x in self.settle(changed) if x is not lease])

    def revoke(self, lease_id: str, reason: str) -> None:
        """End a lease on the agent's word (its kernel is told, with ``reason``)."""
        self._tell(self.settle(self.leases.revoke(lease_id, reason)))

    def _reply_lease(self, route: bytes, header: dict[str, Any], lease: Lease, *,
                     with_token: bool = False) -> None:
        self.lease_routes[lease.lease_id] = route
        self.send(route, {"t": P.LEASE, "rid": header.get("rid"),
                          "lease": self.lease_info(lease, with_token=with_token)})

    def settle(self, changed: list[Lease]) -> list[Lease]:
        """Act on lease changes (park the sessions of ended leases, grant free slots); returns
        the leases to tell, ended ones first, then grants and queue moves."""
        ended = [lease for lease in changed if not lease.active]
        for lease in ended:
            for session in self._sessions_of_lease(lease.lease_id):
                self.park(session, f"its lease was {lease.state.value}")
            self._told.pop(lease.lease_id, None)
            self._forget_secret(lease.kernel_id)
        self.leases.draining = self._draining()
        granted = self.leases.promote()
        for lease in granted:
            self.metrics.lease_granted(self._clock() - lease.requested_at)
        told = list(ended)
        for lease in [*changed, *granted, *self.leases.queue]:
            if not lease.active or lease in told:
                continue
            position = self.leases.position(lease.lease_id)
            if self._told.get(lease.lease_id) != position:
                self._told[lease.lease_id] = position
                told.append(lease)
        return told

    def _draining(self) -> int:
        """Workers that still occupy the GPU for a lease no longer held: parking, or ending
        (until their process is gone, their memory is not free)."""
        held = {lease.lease_id for lease in self.leases.holders}
        count = 0
        for worker in self.workers.workers.values():
            if worker.session_id is None or worker.ended_by == "parked":
                continue  # a spare, or a parked session's worker: its memory is given back
            session = self.sessions.get(worker.session_id)
            if session is None or session.worker is not worker or session.lease_id not in held:
                count += 1
        return count

    def _tell(self, leases: list[Lease]) -> None:
        for lease in leases:
            route = self.lease_routes.get(lease.lease_id)
            if route is not None:
                self.send(route, {"t": P.LEASE, "lease": self.lease_info(lease)})
            if not lease.active:
                self.lease_routes.pop(lease.lease_id, None)

    def held(self, ref: Any) -> Lease:
        if not (isinstance(ref, list) and len(ref) == 2 and all(isinstance(x, str) for x in ref)):
            raise AgentError("LeaseError", "this client presented no lease: a GPU session needs "
                             "a lease held on this agent (lease_request first)")
        lease = self.leases.check(ref[0], ref[1])
        if lease.state is not LeaseState.HELD:
            raise AgentError("LeaseError", f"lease {lease.lease_id} is still queued (position "
                             f"{self.leases.position(lease.lease_id)}): wait for the grant")
        return lease

    def _lease_ref(self, header: dict[str, Any]) -> tuple[str, str]:
        return self._text(header, "lease_id"), self._text(header, "token")

    def _text(self, header: dict[str, Any], key: str) -> str:
        value = header.get(key)
        if not (isinstance(value, str) and 0 < len(value) <= self.limits.max_secret):
            raise AgentError("ProtocolError", f"{header.get('t')} needs a string {key} of at "
                             f"most {self.limits.max_secret} characters")
        return value

    def lease_info(self, lease: Lease, *, with_token: bool = False) -> dict[str, Any]:
        info: dict[str, Any] = {
            "id": lease.lease_id, "state": lease.state.value, "kernel_id": lease.kernel_id,
            "user": lease.user, "agent": self.endpoint, "ttl": lease.ttl,
            "position": self.leases.position(lease.lease_id) if lease.active else None,
            "granted_at": _wall(lease.granted_at, self._clock), "session": None,
            "slots": self.leases.slots, "reason": lease.reason or None,
            # what this agent applies: the kernel's own, bounded by the agent's
            "reclaim_after": self._reclaim_after(lease),
        }
        if with_token:
            info["token"] = lease.token
        sessions = [s for s in self.sessions.values() if s.kernel_id == lease.kernel_id]
        sessions.sort(key=lambda s: s.state is not SessionState.ACTIVE)
        if sessions:
            info["session"] = self._session_summary(sessions[0])
        return info

    def _active_leases(self) -> list[Lease]:
        return [*self.leases.holders, *self.leases.queue]

    # }}}

    # {{{ sessions: hello, park, bye

    def hello(self, route: bytes, header: dict[str, Any]) -> None:
        lease = self.held(header.get("lease"))
        client = header.get("client") if isinstance(header.get("client"), dict) else {}
        resume = header.get("resume") if isinstance(header.get("resume"), dict) else None
        current = self._sessions_of_lease(lease.lease_id)
        if resume is None:
            if current:
                raise AgentError("SessionError", "this lease already has a GPU session here: "
                                 "resume it, or say bye first")
            session = self._new_session(lease, client, None)
            self._open(session, route, header, {})
            return
        session_id = self._text(resume, "session")
        resume_token = self._text(resume, "resume_token")
        session = self.sessions.get(session_id)
        if session is not None:
            if session.kernel_id != lease.kernel_id or not secrets.compare_digest(
                    session.resume_token, resume_token):
                raise AgentError("LeaseError", f"session {session_id} belongs to another kernel")
            if session.state is SessionState.ACTIVE and session.lease_id == lease.lease_id:
                session.route = route
                self._welcome(session, route, header)
                return
            if session.state is not SessionState.PARKED:
                raise AgentError("SessionError", f"session {session_id} is {session.state}: "
                                 "try again when it is parked")
            if current:
                raise AgentError("SessionError", "this lease already has another session here")
            parked = self.parking.take(session_id)
            if parked is None:
                self._forget_session(session)
                raise AgentError("StateLost", _lost("its parked memory is gone"))
            session.lease_id = lease.lease_id
            session.resumed = True
            session.client = client or session.client
            _take_park_policy(session, lease)
            self._open(session, route, header, {"restore": {"log": parked.log,
                                                            "chunks": parked.chunks}},
                       on_done=lambda: discard(parked))
            return
        reason = self.parking.dropped.get(session_id)
        if reason is not None and reason != MOVED:
            raise AgentError("StateLost", _lost(reason))
        origin = resume.get("from")
        wanted = header.get("range")
        if not (isinstance(origin, str) and origin and origin != self.endpoint
                and isinstance(wanted, list) and wanted and type(wanted[0]) is int):
            raise AgentError("StateLost", _lost(
                "it is not on this agent and no other agent was named to fetch it from"))
        if current:
            raise AgentError("SessionError", "this lease already has another session here")
        session = self._new_session(lease, client, wanted[0], session_id=session_id,
                                    resume_token=resume_token)
        if session.base != wanted[0]:
            self._forget_session(session)
            raise AgentError("StateLost", _lost(
                f"its address range {wanted[0]:#x} is in use on this agent by another session, "
                "so its pointers could not stay valid here"))
        session.resumed = True
        self._open(session, route, header, {"fetch": {
            "endpoint": origin, "session": session_id, "resume_token": resume_token,
            "kernel_id": lease.kernel_id, "token": header.get("token")}})

    def _new_session(self, lease: Lease, client: dict[str, Any], wanted_base: int | None, *,
                     session_id: str | None = None,
                     resume_token: str | None = None) -> Session:
        self._make_room(lease.kernel_id)
        session = Session(session_id or secrets.token_hex(8), lease.kernel_id,
                          resume_token or secrets.token_urlsafe(18),
                          self._free_slot(wanted_base), client, lease_id=lease.lease_id)
        _take_park_policy(session, lease)
        self.sessions[session.session_id] = session
        return session

    def _open(self, session: Session, route: bytes, header: dict[str, Any],
              extra: dict[str, Any], on_done: Callable[[], None] | None = None) -> None:
        worker = self.workers.take_spare()
        worker.session_id = session.session_id
        session.worker, session.route, session.state = worker, route, SessionState.OPENING
        session.gone_at = session.worker_exited_at = None
        session.waiting.append((route, header))
        session.moving_since = self._clock()
        order = {"session": session.session_id, "base": session.base,
                 "size": P.SESSION_RANGE_SIZE, "cap": self.workers.config.memory_cap,
                 "attach": session.attach, **extra}
        session_order = (order, on_done)
        if worker.ready:
            self._send_open(worker, session_order)
        else:
            self._pending_open[worker.worker_id] = session_order

    def _send_open(self, worker: WorkerHandle,
                   order: tuple[dict[str, Any], Callable[[], None] | None]) -> None:
        fields, on_done = order
        self.workers.send(worker, W.OPEN, **fields)
        if on_done is not None:
            self._after_open[worker.worker_id] = on_done

    def _welcome(self, session: Session, route: bytes, header: dict[str, Any]) -> None:
        worker = session.worker
        assert worker is not None and worker.endpoint is not None
        self.send(route, {
            "t": P.WELCOME, "v": P.PROTOCOL_VERSION, "rid": header.get("rid"),
            "session": session.session_id, "resume_token": session.resume_token,
            "resumed": session.resumed, "range": [session.base, P.SESSION_RANGE_SIZE],
            "device": self.device_info(),
            "executor": self.agent_info["executor"], "emulated": self.agent_info["emulated"],
            "agent": self.agent_info, "worker": worker.endpoint, "attach": session.attach,
            "slot": {"slots": self.leases.slots, "memory": self.workers.config.memory_cap},
        })

    def park_request(self, route: bytes, header: dict[str, Any]) -> None:
        session = self._session_of_route(route)
        if session is None:
            raise AgentError("SessionError", "park: this connection has no active session")
        session.waiting.append((route, header))
        self.park(session, "its kernel asked")

    def park(self, session: Session, why: str) -> None:
        """Start parking an active session (its worker writes its memory, then ends). If it
        can't fit the park store, its state is dropped and its owner told (StateLost)."""
        if session.state is not SessionState.ACTIVE or session.worker is None:
            return
        nbytes = session.worker.figures().get("device_bytes", 0)
        try:
            plan = self.parking.plan(session.session_id, nbytes, session.park_limit)
        except AgentError as e:
            self._end(session, f"its GPU state could not be parked: {e}", lost=True)
            return
        for evicted in plan.evicted:
            self._forget_session_id(evicted)
        session.state, session.park_reason = SessionState.PARKING, why
        session.moving_since = self._clock()
        self.workers.send(session.worker, W.PARK, memory_dir=self.parking.memory_dir,
                          memory_room=plan.memory_room, disk_dir=self.parking.disk_dir)
        log.info("parking session %s (%d bytes): %s", session.session_id, nbytes, why)

    def bye(self, route: bytes) -> None:
        session = self._session_of_route(route)
        if session is not None:
            self._end(session, "its client said bye")
        self.send(route, {"t": P.BYE})

    def _end(self, session: Session, why: str, *, lost: bool = False) -> None:
        """End a session: its worker ends (freeing its memory), its state is forgotten. With
        ``lost`` its owner is told why, now and at its next resume."""
        if session.worker is not None:
            self.workers.end(session.worker, why)
            session.worker = None
        self.parking.cancel(session.session_id)
        self.parking.drop(session.session_id, why)
        if lost:
            self.parking.remember(session.session_id, why)
            error = P.error("StateLost", _lost(why, parked=session.state in (
                SessionState.PARKING, SessionState.PARKED)))
            for route, request in session.waiting:
                self.send(route, {"t": P.ERROR, "rid": request.get("rid"), "e": error})
            if session.route is not None:
                self.send(session.route, {"t": P.LOST, "session": session.session_id,
                                          "e": error})
        else:
            self.parking.dropped.pop(session.session_id, None)
        session.waiting.clear()
        self.sessions.pop(session.session_id, None)
        log.info("session %s ended: %s", session.session_id, why)
        self._tell(self.settle([]))

    def drop_kernel(self, header: dict[str, Any]) -> tuple[int, int]:
        kernel_id = self._text(header, "kernel_id")
        secret = self._text(header, "kernel_secret")
        known = self._kernel_secrets.get(kernel_id)
        if known is None:
            return 0, 0
        if not secrets.compare_digest(known, secret):
            raise AgentError("LeaseError", "wrong kernel_secret: refused")
        count = nbytes = 0
        for session in [s for s in self.sessions.values() if s.kernel_id == kernel_id]:
            parked = self.parking.get(session.session_id)
            nbytes += parked.nbytes if parked else (
                session.worker.figures().get("device_bytes", 0) if session.worker else 0)
            count += 1
            self._end(session, "its kernel shut down")
        self._forget_secret(kernel_id)
        return count, nbytes

    # }}}

    # {{{ worker reports

    def on_worker(self, worker: WorkerHandle, header: dict[str, Any]) -> None:
        kind = header.get("t")
        if kind == W.READY:
            pending = self._pending_open.pop(worker.worker_id, None)
            if pending is not None:
                self._send_open(worker, pending)
            return
        session = self.sessions.get(worker.session_id or "")
        if session is None or session.worker is not worker:
            return
        if kind == W.OPENED:
            session.state = SessionState.ACTIVE
            if session.resumed:
                self.metrics.restored(int(header.get("restored_bytes") or 0),
                                      self._clock() - session.moving_since)
            if session.adopting:  # here to be kept, not used: park it (the offer is answered)
                self._after_open.pop(worker.worker_id, None)
                session.adopting = False
                self.park(session, "it moved here from an agent that shut down")
                return
            done = self._after_open.pop(worker.worker_id, None)
            if done is not None:
                done()
            for route, request in session.waiting:
                self._welcome(session, route, request)
            session.waiting.clear()
        elif kind == W.OPEN_FAILED:
            error = header.get("e") if isinstance(header.get("e"), dict) else {}
            self._after_open.pop(worker.worker_id, None)
            for route, request in session.waiting:
                self.send(route, {"t": P.ERROR, "rid": request.get("rid"), "e": error})
            session.waiting.clear()
            session.worker = None
            self.sessions.pop(session.session_id, None)
            if error.get("kind") == "StateLost":
                self.parking.remember(session.session_id, str(error.get("msg")))
        elif kind == W.PARKED:
            self._parked(session, header)
        elif kind == W.PARK_FAILED:
            error = header.get("e") if isinstance(header.get("e"), dict) else {}
            self._end(session, f"parking it failed: {error.get('msg')}", lost=True)
        elif kind == W.GONE:
            if session.state is SessionState.ACTIVE:  # a parking worker's client leaves too
                session.gone_at = self._clock()
        elif kind == W.BACK:
            session.gone_at = None
        elif kind == W.FATAL:
            worker.ended_by = "sticky_cuda_error"
            self.metrics.worker_restarted("sticky_cuda_error")
            error = header.get("e") if isinstance(header.get("e"), dict) else {}
            self._end(session, str(error.get("msg") or "a fatal GPU error"), lost=True)

    def _parked(self, session: Session, header: dict[str, Any]) -> None:
        chunks = header.get("chunks") if isinstance(header.get("chunks"), list) else []
        parked = self.parking.put(session.session_id, session.kernel_id, chunks,
                                  header.get("log") or [], ttl=session.park_ttl)
        # the batches its worker ran (all before the park: it reads its supervisor first), from
        # its own report: the client sends again, after the restore, those it sent and saw no
        # reply to past this
        ran = header.get("batches")
        if type(ran) is not int or ran < 0:
            ran = None
        if session.worker is not None:
            session.worker.ended_by = "parked"  # it ends by itself now; its bytes are parked
        session.state, session.worker, session.lease_id = SessionState.PARKED, None, None
        for route, request in session.waiting:
            self.send(route, {"t": P.PARKED, "rid": request.get("rid"),
                              "session": session.session_id, "bytes": parked.nbytes,
                              "batches": ran})
        if not session.waiting and session.route is not None:
            self.send(session.route, {"t": P.LOST, "session": session.session_id,
                                      "parked": True, "batches": ran,
                                      "bytes": parked.nbytes, "e": P.error("LeaseError", (
                                          f"this session was parked ({session.park_reason}) "
                                          "before these calls ran: the next GPU call leases "
                                          "again and restores it"))})
        session.waiting.clear()
        self.metrics.parked(parked.nbytes, self._clock() - session.moving_since)
        log.info("session %s parked (%d bytes, %d on disk)", session.session_id,
                 parked.nbytes, parked.disk_bytes)
        self._tell(self.settle([]))

    def worker_exited(self, worker: WorkerHandle, code: int) -> None:
        """A worker's process ended: if it still served a session, that session is lost."""
        session = self.sessions.get(worker.session_id or "")
        if session is None or session.worker is not worker:
            return
        if session.state is SessionState.PARKING and code == 0:
            # a parking worker ends by itself once it has written the session: its report
            # may still be on the way; the tick waits for it (PARK_REPORT_S)
            session.worker_exited_at = self._clock()
            return
        self.metrics.worker_restarted("hung" if worker.ended_by and "watchdog" in
                                      worker.ended_by else "crashed")
        why = worker.ended_by or (f"its GPU worker process died (exit code {code}"
                                  f"{', killed by a signal' if code < 0 else ''})")
        session.worker = None
        self._end(session, why, lost=True)

    # }}}

    def tick(self) -> None:
        now = self._clock()
        self._tell(self.settle(self.leases.expire()))
        self._reclaim(now)
        self._account(now)
        self.leases.forget(FORGET_ENDED_S)
        for session_id in self.parking.expire():
            self._forget_session_id(session_id)
        for session in list(self.sessions.values()):
            worker = session.worker
            if worker is None:
                continue
            if session.state is SessionState.PARKING:
                exited = session.worker_exited_at
                if exited is not None and now - exited > PARK_REPORT_S:
                    self._end(session, "its worker ended without reporting the park",
                              lost=True)
                continue
            if session.gone_at is not None and now - session.gone_at > self.limits.disconnect_grace:
                self._end(session, "its client went away without saying bye")
                self._release_with_process(session)
                continue
            busy_since = worker.figures().get("busy_since_ns", 0)
            if busy_since and now - busy_since / 1e9 > self.limits.watchdog:
                worker.ended_by = (
                    f"a call ran longer than this agent's watchdog allows "
                    f"({self.limits.watchdog:g} s, harp-agent --watchdog): the session was "
                    "ended to free the GPU")
                self.workers.end(worker, worker.ended_by, kill=True)
        reaped = self.workers.reap(now, self.limits.worker_start_timeout)
        for worker, code in reaped:
            self.worker_exited(worker, code)
        if reaped:
            self._tell(self.settle([]))
        self.workers.ensure_spares()

    def _reclaim(self, now: float) -> None:
        """Reclaim on demand: while kernels wait and no slot is free, a holder whose session has
        had no GPU work for its ``reclaim_after`` is parked at once (a running batch is never
        interrupted: a busy holder is reclaimed once it has idled that long)."""
        waiting = len(self.leases.queue)
        if not waiting or self.leases.free_slots:
            return
        idle: list[tuple[float, Lease]] = []
        for lease in self.leases.holders:
            idle_s = self.idle_seconds(lease, now)
            if idle_s is not None and idle_s >= self._reclaim_after(lease):
                idle.append((idle_s, lease))
        parking = sum(1 for s in self.sessions.values() if s.state is SessionState.PARKING)
        for _idle_s, lease in sorted(idle, key=lambda x: -x[0])[:max(waiting - parking, 0)]:
            log.info("reclaiming lease %s of kernel %s: idle while %d wait", lease.lease_id,
                     lease.kernel_id, waiting)
            self.metrics.reclaimed()
            self._tell(self.settle(self.leases.revoke(lease.lease_id, "reclaimed")))

    def idle_seconds(self, lease: Lease, now: float) -> float | None:
        """How long a held lease's GPU has had no work (None while a batch runs)."""
        sessions = self._sessions_of_lease(lease.lease_id)
        if not sessions:
            return now - (lease.granted_at or now)  # held, never used: idle since the grant
        idle = float("inf")
        for session in sessions:
            if session.state is not SessionState.ACTIVE or session.worker is None:
                return None
            figures = session.worker.figures()
            if figures.get("busy_since_ns"):
                return None
            last = figures.get("last_end_ns") or 0
            idle = min(idle, now - last / 1e9 if last else now - session.moving_since)
        return idle

    def _reclaim_after(self, lease: Lease) -> float:
        asked = lease.info.get("reclaim_after") if isinstance(lease.info, dict) else None
        agent = self.limits.reclaim_after
        if type(asked) in (int, float) and 0 <= asked < agent:
            return float(asked)
        return agent

    def _account(self, now: float) -> None:
        """The figures the metrics keep: slot-seconds held (and held idle while someone
        waits), leases, sessions, parked bytes."""
        elapsed, self._last_tick = now - self._last_tick, now
        holders = self.leases.holders
        waiting = bool(self.leases.queue)
        idle = sum(1 for lease in holders if waiting and (
            self.idle_seconds(lease, now) or 0) > self._reclaim_after(lease))
        self.metrics.gpu_seconds(len(holders) * elapsed, idle * elapsed)
        self.metrics.leases(len(holders), len(self.leases.queue))
        states = [s.state for s in self.sessions.values()]
        self.metrics.sessions(sum(st is not SessionState.PARKED for st in states),
                              sum(st is SessionState.PARKED for st in states))
        self.metrics.parked_bytes(self.parking.memory_bytes, self.parking.disk_bytes)

    def _release_with_process(self, session: Session) -> None:
        """A lease held by the vanished process itself (``harp run``) ends with it."""
        for lease in self.leases.holders:
            if lease.kernel_id == session.kernel_id and lease.info.get("holder") == "process":
                self._tell(self.settle(self.leases.revoke(lease.lease_id)))

    # {{{ helpers

    def _sessions_of_lease(self, lease_id: str) -> list[Session]:
        return [s for s in self.sessions.values()
                if s.lease_id == lease_id and s.state is not SessionState.PARKED]

    def _session_of_route(self, route: bytes) -> Session | None:
        for session in self.sessions.values():
            if session.route == route and session.state is SessionState.ACTIVE:
                return session
        return None

    def _make_room(self, kernel_id: str) -> None:
        """Keep the session bounds: a kernel's oldest parked states beyond its share, and the
        agent's oldest parked states beyond its total, are dropped (their owners told)."""
        parked = sorted((s for s in self.sessions.values() if s.state is SessionState.PARKED),
                        key=lambda s: s.started)
        mine = [s for s in parked if s.kernel_id == kernel_id]
        for session in mine[:max(len(mine) - self.limits.sessions_per_kernel + 1, 0)]:
            self.parking.drop(session.session_id, "its kernel made more sessions than an agent "
                              "keeps for one kernel (harp-agent --sessions-per-kernel)")
            self._forget_session(session)
            parked.remove(session)
        excess = len(self.sessions) - self.limits.max_sessions + 1
        for session in parked[:max(excess, 0)]:
            self.parking.drop(session.session_id, "the agent keeps at most "
                              f"{self.limits.max_sessions} sessions (harp-agent --max-sessions)")
            self._forget_session(session)
        if len(self.sessions) >= self.limits.max_sessions:
            raise AgentError("SessionError", f"this agent already serves "
                             f"{self.limits.max_sessions} sessions: try another agent")

    def _free_slot(self, wanted_base: int | None) -> int:
        used = {s.slot for s in self.sessions.values()}
        if wanted_base is not None:
            slot, rem = divmod(wanted_base - P.ADDRESS_SPACE_BASE, P.SESSION_RANGE_SIZE)
            if rem == 0 and 0 <= slot < ADDRESS_RANGES and slot not in used:
                return slot
        free = [slot for slot in range(ADDRESS_RANGES) if slot not in used]
        if not free:
            raise AgentError("SessionError", "this agent has no free address range left")
        # a random range makes it unlikely that a session moving here finds its range taken
        return free[secrets.randbelow(len(free))]

    def _forget_session_id(self, session_id: str) -> None:
        session = self.sessions.get(session_id)
        if session is not None:
            self._forget_session(session)

    def _forget_session(self, session: Session) -> None:
        self.sessions.pop(session.session_id, None)
        self._forget_secret(session.kernel_id)

    def _forget_secret(self, kernel_id: str) -> None:
        """A kernel's secret is kept while it has leases or sessions here, not longer."""
        if not any(s.kernel_id == kernel_id for s in self.sessions.values()) and not any(
                lease.kernel_id == kernel_id for lease in self._active_leases()):
            self._kernel_secrets.pop(kernel_id, None)

    def _session_summary(self, s: Session) -> dict[str, Any]:
        parked = self.parking.get(s.session_id)
        figures = s.worker.figures() if s.worker is not None else {}
        last_end = figures.get("last_end_ns") or 0
        return {
            "id": s.session_id, "state": s.state.value,
            "device_bytes": figures.get("device_bytes", 0),
            "parked_bytes": parked.nbytes if parked else 0,
            "idle_s": round(max(time.monotonic() - last_end / 1e9, 0.0), 3) if last_end else 0.0,
            "busy": bool(figures.get("busy_since_ns")),
        }

    # }}}

    # {{{ moving parked state to another agent

    def parked_for(self, header: dict[str, Any]) -> tuple[Session, Any]:
        """The parked session a ``parked_fetch``/``parked_chunk`` names, checked against its
        resume token (only its owner has it)."""
        session = self.sessions.get(self._text(header, "session"))
        token = self._text(header, "resume_token")
        if session is None or not secrets.compare_digest(session.resume_token, token):
            reason = self.parking.dropped.get(str(header.get("session")))
            raise AgentError("StateLost", _lost(reason or "this agent does not have it"))
        parked = self.parking.get(session.session_id)
        if session.state is not SessionState.PARKED or parked is None:
            raise AgentError("SessionError", f"session {session.session_id} is not parked")
        return session, parked

    def manifest(self, header: dict[str, Any]) -> dict[str, Any]:
        session, parked = self.parked_for(header)
        if header.get("kernel_id") != session.kernel_id:
            raise AgentError("LeaseError", "the parked session belongs to another kernel")
        return {"session": session.session_id, "kernel_id": session.kernel_id,
                "range": [session.base, P.SESSION_RANGE_SIZE], "client": session.client,
                "log": parked.log, "chunks": [[c[0], c[1]] for c in parked.chunks]}

    def adoption_offer(self, session: Session) -> dict[str, Any]:
        """What a draining agent tells another about one of its parked sessions (``adopt``
        there): enough to fetch it from here and to know its owner when it comes back."""
        return {"session": session.session_id, "resume_token": session.resume_token,
                "kernel_id": session.kernel_id,
                "kernel_secret": self._kernel_secrets.get(session.kernel_id, ""),
                "range": [session.base, P.SESSION_RANGE_SIZE], "client": session.client}

    def adopt(self, route: bytes, header: dict[str, Any]) -> None:
        """Take over a parked session from a draining agent (``parked_adopt``): a worker fetches
        it from there (which then forgets it) and parks it here; answered with ``parked`` then.
        Refused without a free slot (the fetch passes through a worker's device memory)."""
        if self.draining:
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
        if session_id in self.sessions:
            raise AgentError("SessionError", f"session {session_id} is already here")
        known = self._kernel_secrets.get(kernel_id)
        if known is not None and not secrets.compare_digest(known, secret):
            raise AgentError("LeaseError", f"kernel {kernel_id} is known here with another "
                             "kernel_secret: refused")
        if not self.leases.free_slots:
            raise AgentError("SessionError", "no free slot here to take parked state through")
        self._make_room(kernel_id)
        client = header.get("client") if isinstance(header.get("client"), dict) else {}
        session = Session(session_id, kernel_id, resume_token, self._free_slot(wanted[0]), client,
                          resumed=True, adopting=True)
        if session.base != wanted[0]:
            raise AgentError("SessionError", f"its address range {wanted[0]:#x} is in use here")
        self.sessions[session_id] = session
        self._kernel_secrets[kernel_id] = secret
        self._open(session, route, header, {"fetch": {
            "endpoint": origin, "session": session_id, "resume_token": resume_token,
            "kernel_id": kernel_id, "token": header.get("token")}})
        self._tell(self.settle([]))  # the fetch occupies a slot until it is parked

    def end_all(self, why: str, *, parked_reason: str) -> None:
        """The agent is going away: every session still running ends (its owner told why),
        every lease is revoked, parked state still here is dropped."""
        for session in list(self.sessions.values()):
            if session.state is SessionState.PARKED:
                self.parking.drop(session.session_id, parked_reason)
                self._forget_session(session)
            else:
                self._end(session, why, lost=True)
        for lease in self._active_leases():
            self.revoke(lease.lease_id, "draining")

    def forget_moved(self, header: dict[str, Any]) -> int:
        session, parked = self.parked_for(header)
        self.parking.drop(session.session_id, MOVED)
        self._forget_session(session)
        return parked.nbytes

    # }}}

    def status(self, *, everyone: bool, kernel: tuple[str, str] | None = None
               ) -> dict[str, Any]:
        """Leases and sessions: everyone's for the operator, else the pool's figures and the
        asking kernel's own (``kernel`` = (kernel_id, kernel_secret) it proved)."""
        now = self._clock()
        own = None
        if kernel is not None:
            known = self._kernel_secrets.get(kernel[0])
            if known is not None and secrets.compare_digest(known, kernel[1]):
                own = kernel[0]

        def visible(kernel_id: str) -> bool:
            return everyone or kernel_id == own

        def holder(lease: Lease) -> dict[str, Any]:
            entry: dict[str, Any] = {"since": _wall(lease.granted_at, self._clock)}
            if visible(lease.kernel_id):
                entry.update(lease_id=lease.lease_id, kernel_id=lease.kernel_id,
                             user=lease.user, info=lease.info,
                             reclaim_after=self._reclaim_after(lease))
            return entry

        holders = [holder(lease) for lease in self.leases.holders]
        parked = [{"bytes": p.nbytes, "spilled_bytes": p.disk_bytes,
                   "parked_s": round(now - p.parked_at, 3),
                   **({"session": p.session_id, "kernel_id": p.kernel_id}
                      if visible(p.kernel_id) else {})}
                  for p in self.parking.sessions()]
        return {
            "ttl": self.leases.ttl, "slots": self.leases.slots,
            "free_slots": self.leases.free_slots, "reclaim_after": self.limits.reclaim_after,
            "holders": holders,
            "holder": holders[0] if holders and self.leases.slots == 1 else None,
            "queue": [{"position": i + 1, "waiting_s": round(now - q.requested_at, 3),
                       **({"lease_id": q.lease_id, "kernel_id": q.kernel_id, "user": q.user,
                           "info": q.info} if visible(q.kernel_id) else {})}
                      for i, q in enumerate(self.leases.queue)],
            "parked": parked,
            "park_store": {"memory_bytes": self.parking.memory_bytes,
                           "disk_bytes": self.parking.disk_bytes,
                           "memory_cap": self.parking.memory_cap, "limit": self.parking.limit},
            "sessions": [{"session": s.session_id, "kernel_id": s.kernel_id,
                          "client": s.client, **self._session_summary(s)}
                         for s in self.sessions.values() if visible(s.kernel_id)],
            "refusals": dict(self.refusals),
            "draining": self.draining,
            "worker_restarts": self.workers.restarts,
        }

    def close(self) -> None:
        self.parking.close()


def _take_park_policy(session: Session, lease: Lease) -> None:
    """The kernel's park_ttl and park_limit from its lease info (positive numbers, else none)."""
    info = lease.info if isinstance(lease.info, dict) else {}
    ttl, limit = info.get("park_ttl"), info.get("park_limit")
    session.park_ttl = float(ttl) if type(ttl) in (int, float) and 0 < ttl < 1e12 else None
    session.park_limit = int(limit) if type(limit) in (int, float) and 0 < limit < 1 << 62 \
        else None


def _wall(monotonic_at: float | None, clock: Callable[[], float]) -> float | None:
    if monotonic_at is None:
        return None
    return time.time() - (clock() - monotonic_at)


def _lost(reason: str, *, parked: bool = True) -> str:
    what = "the parked GPU state of this kernel is gone" if parked else (
        "this kernel's GPU session ended")
    return (f"{what}: {reason}. Its device arrays, modules and streams no longer exist; the "
            "kernel's CPU state is intact and other notebooks were not affected, and the next "
            "GPU call starts a fresh session: re-run the cells that create them.")
