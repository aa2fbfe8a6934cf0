"""A session's life in its worker: opened, welcomed, parked or ended, as its worker reports.

``SessionLifecycle`` gives a session a worker with an ``open`` order (new, restored from the park
store or fetched from another agent), welcomes the waiting client once the worker has it, orders
parks, ends sessions, and follows what workers report and their exits; on the tick it enforces
the watchdog, the disconnect grace and the wait for a park's report. Nothing here waits: every
order is answered when its worker reports back.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from gpu_agent import protocol as P
from gpu_agent import worker_link as W
from gpu_agent.errors import AgentError
from gpu_agent.lease_desk import LeaseDesk
from gpu_agent.limits import AgentLimits
from gpu_agent.metrics import AgentMetrics
from gpu_agent.parking import ParkStore
from gpu_agent.sizes import format_bytes
from gpu_agent.tenants import Outbox, Session, SessionBook, SessionState, lost_message
from gpu_agent.workers import WorkerHandle, WorkerPool

log = logging.getLogger("harp.agent.tenancy")

#: how long a parking worker that has exited may take to have its report read
PARK_REPORT_S = 5.0

OpenOrder = tuple[dict[str, Any], Callable[[], None] | None]


class SessionLifecycle:
    """See the module docstring."""

    def __init__(self, book: SessionBook, desk: LeaseDesk, workers: WorkerPool,
                 parking: ParkStore, limits: AgentLimits, outbox: Outbox,
                 metrics: AgentMetrics, *, agent_info: dict[str, Any],
                 device_info: Callable[[], dict[str, Any]], clock: Callable[[], float]) -> None:
        self.book = book
        self.desk = desk
        self.workers = workers
        self.parking = parking
        self.limits = limits
        self.outbox = outbox
        self.metrics = metrics
        self.agent_info = agent_info
        self.device_info = device_info
        self._clock = clock
        #: open orders for workers not ready yet, and what to do once a worker opened
        self._pending_open: dict[str, OpenOrder] = {}
        self._after_open: dict[str, Callable[[], None]] = {}
        desk.park_session = self.park

    # {{{ orders to workers

    def open(self, session: Session, route: bytes, header: dict[str, Any],
             extra: dict[str, Any], on_done: Callable[[], None] | None = None) -> None:
        """Give ``session`` a worker; ``header``'s request is answered when it has opened."""
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

    def _send_open(self, worker: WorkerHandle, order: OpenOrder) -> None:
        fields, on_done = order
        self.workers.send(worker, W.OPEN, **fields)
        if on_done is not None:
            self._after_open[worker.worker_id] = on_done

    def welcome(self, session: Session, route: bytes, header: dict[str, Any]) -> None:
        worker = session.worker
        assert worker is not None and worker.endpoint is not None
        self.outbox.send(route, {
            "t": P.WELCOME, "v": P.PROTOCOL_VERSION, "rid": header.get("rid"),
            "session": session.session_id, "resume_token": session.resume_token,
            "resumed": session.resumed, "range": [session.base, P.SESSION_RANGE_SIZE],
            "device": self.device_info(),
            "executor": self.agent_info["executor"], "emulated": self.agent_info["emulated"],
            "agent": self.agent_info, "worker": worker.endpoint, "attach": session.attach,
            "slot": {"slots": self.desk.leases.slots, "memory": self.workers.config.memory_cap},
            "max_frame": self.workers.config.max_frame,
        })

    def park(self, session: Session, why: str) -> None:
        """Start parking an active session (its worker writes its memory, then ends). If it
        can't fit the park store, its state is dropped and its owner told (StateLost)."""
        if session.state is not SessionState.ACTIVE or session.worker is None:
            return
        figures = session.worker.figures()
        nbytes = figures.get("device_bytes", 0) + figures.get("code_bytes", 0)
        try:
            plan = self.parking.plan(session.session_id, nbytes, session.park_limit)
        except AgentError as e:
            self.end(session, f"its GPU state could not be parked: {e}", lost=True)
            return
        for evicted in plan.evicted:
            self.book.forget_id(evicted)
        session.state, session.park_reason = SessionState.PARKING, why
        session.moving_since = self._clock()
        self.workers.send(session.worker, W.PARK, memory_dir=self.parking.memory_dir,
                          memory_room=plan.memory_room, disk_dir=self.parking.disk_dir)
        log.info("parking session %s (%s): %s", session.session_id, format_bytes(nbytes), why)

    def end(self, session: Session, why: str, *, lost: bool = False) -> None:
        """End a session: its worker ends (freeing its memory), its state is forgotten. With
        ``lost`` its owner is told why, now and at its next resume."""
        if session.worker is not None:
            self.workers.end(session.worker, why)
            session.worker = None
        self.parking.cancel(session.session_id)
        self.parking.drop(session.session_id, why)
        if lost:
            self.parking.remember(session.session_id, why)
            error = P.error("StateLost", lost_message(why, parked=session.state in (
                SessionState.PARKING, SessionState.PARKED)))
            for route, request in session.waiting:
                self.outbox.send(route, {"t": P.ERROR, "rid": request.get("rid"), "e": error})
            if session.route is not None:
                self.outbox.send(session.route, {"t": P.LOST, "session": session.session_id,
                                                 "e": error})
        else:
            self.parking.dropped.pop(session.session_id, None)
        session.waiting.clear()
        self.book.remove(session)
        log.info("session %s ended: %s", session.session_id, why)
        self.desk.update()

    # }}}

    # {{{ worker reports

    def on_worker(self, worker: WorkerHandle, header: dict[str, Any]) -> None:
        kind = header.get("t")
        if kind == W.READY:
            pending = self._pending_open.pop(worker.worker_id, None)
            if pending is not None:
                self._send_open(worker, pending)
            return
        session = self.book.get(worker.session_id or "")
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
                self.welcome(session, route, request)
            session.waiting.clear()
        elif kind == W.OPEN_FAILED:
            error = header.get("e") if isinstance(header.get("e"), dict) else {}
            reason = str(error.get("msg"))
            if error.get("kind") == "StateLost":  # what is gone, and what the owner can do
                error = {**error, "msg": lost_message(reason)}
            self._after_open.pop(worker.worker_id, None)
            for route, request in session.waiting:
                self.outbox.send(route, {"t": P.ERROR, "rid": request.get("rid"), "e": error})
            session.waiting.clear()
            session.worker = None
            self.book.remove(session)
            if error.get("kind") == "StateLost":
                self.parking.remember(session.session_id, reason)
        elif kind == W.PARKED:
            self._parked(session, header)
        elif kind == W.PARK_FAILED:
            error = header.get("e") if isinstance(header.get("e"), dict) else {}
            self.end(session, f"parking it failed: {error.get('msg')}", lost=True)
        elif kind == W.GONE:
            if session.state is SessionState.ACTIVE:  # a parking worker's client leaves too
                session.gone_at = self._clock()
        elif kind == W.BACK:
            session.gone_at = None
        elif kind == W.FATAL:
            worker.ended_by = "sticky_cuda_error"
            self.metrics.worker_restarted("sticky_cuda_error")
            error = header.get("e") if isinstance(header.get("e"), dict) else {}
            self.end(session, str(error.get("msg") or "a fatal GPU error"), lost=True)

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
            self.outbox.send(route, {"t": P.PARKED, "rid": request.get("rid"),
                                     "session": session.session_id, "bytes": parked.nbytes,
                                     "batches": ran})
        if not session.waiting and session.route is not None:
            self.outbox.send(session.route, {
                "t": P.LOST, "session": session.session_id, "parked": True, "batches": ran,
                "bytes": parked.nbytes, "e": P.error("LeaseError", (
                    f"this session was parked ({session.park_reason}) before these calls ran: "
                    "the next GPU call leases again and restores it"))})
        session.waiting.clear()
        self.metrics.parked(parked.nbytes, self._clock() - session.moving_since)
        log.info("session %s parked (%s, %s on disk)", session.session_id,
                 format_bytes(parked.nbytes), format_bytes(parked.disk_bytes))
        self.desk.update()

    def worker_exited(self, worker: WorkerHandle, code: int) -> None:
        """A worker's process ended: if it still served a session, that session is lost."""
        session = self.book.get(worker.session_id or "")
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
        self.end(session, why, lost=True)

    # }}}

    def watch(self, now: float) -> None:
        """The tick's part for sessions: a park report that never came, a client gone past its
        grace, a call past the watchdog; then exited workers, and the spares kept ready."""
        for session in list(self.book.sessions.values()):
            worker = session.worker
            if worker is None:
                continue
            if session.state is SessionState.PARKING:
                exited = session.worker_exited_at
                if exited is not None and now - exited > PARK_REPORT_S:
                    self.end(session, "its worker ended without reporting the park", lost=True)
                continue
            grace = self.limits.disconnect_grace
            if session.gone_at is not None and now - session.gone_at > grace:
                self.end(session, f"its client's connection dropped without a bye and did not "
                         f"come back within {grace:g} s (harp-agent --disconnect-grace)",
                         lost=True)
                self.desk.release_with_process(session)
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
            self.desk.update()
        self.workers.ensure_spares()

