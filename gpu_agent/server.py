"""The agent's server: one ZeroMQ ROUTER, many clients, one executor.

It receives messages, validates them against ``gpu_agent.protocol``, and routes them: lease
requests and session lifecycle go to ``Tenancy`` (the authority over this GPU), batches run on the
executor after every address they name is checked against what the session mapped. Every batch
gets exactly one reply; lease changes are pushed to the holders' connections. Nothing a client
sends can stop it from serving the others: a bad message gets an ``error`` reply and the loop goes
on.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import time
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import zmq

from gpu_agent import profiling
from gpu_agent import protocol as P
from gpu_agent.executors.base import ContextLost, Executor, ExecutorError
from gpu_agent.leases import Lease
from gpu_agent.memory_map import AddressError
from gpu_agent.migration import MigrationError, fetch_parked, forget_parked
from gpu_agent.parking import ParkStore
from gpu_agent.sessions import ACTIVE, ClientSession
from gpu_agent.tenancy import Tenancy, TenancyError

log = logging.getLogger("harp.agent")

AGENT_VERSION = "0.2.0"
TICK_S = 0.25


class _CallError(Exception):
    def __init__(self, kind: str, msg: str, code: str | None = None) -> None:
        super().__init__(msg)
        self.kind, self.code = kind, code


def _extent(desc: list[Any]) -> tuple[int, int]:
    try:
        return P.descriptor_extent(desc)
    except TypeError as e:
        raise _CallError(
            "ProtocolError", f"bad dtype {desc[1]!r} in array descriptor: {e}") from None


class AgentServer:
    _handlers: ClassVar[dict[str, Callable[..., None]]]

    def __init__(self, executor: Executor, endpoint: str, *, token: str | None = None,
                 context: zmq.Context | None = None, lease_ttl: float = 30.0,
                 parking: ParkStore | None = None) -> None:
        self.executor = executor
        self.token = token
        self.context = context or zmq.Context.instance()
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.RCVHWM, 64)
        self.socket.setsockopt(zmq.SNDHWM, 64)
        self.socket.setsockopt(zmq.ROUTER_MANDATORY, 0)
        self.socket.bind(endpoint)
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.tenancy = Tenancy(
            executor, self.endpoint, lease_ttl=lease_ttl,
            parking=parking or ParkStore(memory_cap=8 << 30, limit=64 << 30, ttl=86400.0))
        #: routing id -> id of the session that connection drives
        self.routes: dict[bytes, str] = {}
        #: lease id -> the connection that hears about that lease's changes
        self.lease_routes: dict[str, bytes] = {}
        self.started = time.time()
        self._running = False
        self._next_tick = 0.0
        #: set when the agent must be replaced by a new process (see Executor.restart_required)
        self.restart = False

    @property
    def sessions(self) -> dict[str, ClientSession]:
        return self.tenancy.sessions

    # {{{ loop

    def serve_forever(self) -> None:
        self._running = True
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop())
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        try:
            while self._running:
                if poller.poll(int(TICK_S * 1000)):
                    while self._running:
                        try:
                            parts = self.socket.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self.handle(parts)
                        self._maybe_tick()
                self._maybe_tick()
        finally:
            self.close()

    def _maybe_tick(self) -> None:
        now = time.monotonic()
        if now >= self._next_tick:
            self._next_tick = now + TICK_S
            self._tell(self.tenancy.tick())

    def stop(self) -> None:
        self._running = False

    def close(self) -> None:
        if not self.executor.restart_required:
            self.tenancy.close()
        self.sessions.clear()
        self.socket.close(0)
        self.executor.close()

    # }}}

    def handle(self, parts: list[Any]) -> None:
        routing_id = parts[0].bytes
        try:
            header, frames = P.decode(parts[1:])
        except P.ProtocolError as e:
            log.warning("bad message from %s: %s", routing_id.hex(), e)
            self._send(routing_id, {"t": P.ERROR, "e": P.error("ProtocolError", str(e))})
            return
        kind = header["t"]
        rid = header.get("rid")
        try:
            handler = self._handlers.get(kind)
            if handler is None:
                raise _CallError("ProtocolError", f"unknown message type {kind!r}")
            handler(self, routing_id, header, frames)
        except (_CallError, TenancyError, MigrationError, ExecutorError) as e:
            self._send_error(routing_id, rid, e.kind, str(e), getattr(e, "code", None))
        except Exception as e:  # a bug in a handler must not take the agent down
            log.exception("handling %s failed", kind)
            self._send_error(routing_id, rid, "RuntimeError",
                             f"internal agent error in {kind}: {type(e).__name__}: {e}")
        if self.executor.restart_required and not self.restart:
            log.error("the device is unusable in this process: restarting the agent")
            self.restart = True
            self.stop()

    def _send_error(self, routing_id: bytes, rid: Any, kind: str, msg: str,
                    code: str | None = None) -> None:
        reply: dict[str, Any] = {"t": P.ERROR, "e": P.error(kind, msg, code=code)}
        if rid is not None:
            reply["rid"] = rid
        self._send(routing_id, reply)

    def _check_token(self, header: dict) -> None:
        if self.token is not None:
            given = header.get("token")
            if not isinstance(given, str) or not secrets.compare_digest(given, self.token):
                raise _CallError("AuthError", "wrong or missing token for this agent (HARP_TOKEN)")

    # {{{ leases

    def _on_lease_request(self, routing_id: bytes, header: dict, frames: list[Any]) -> None:
        self._check_token(header)
        lease, changed = self.tenancy.request(header)
        self.lease_routes[lease.lease_id] = routing_id
        self._send(routing_id, {"t": P.LEASE, "rid": header.get("rid"),
                                "lease": self.tenancy.lease_info(lease, with_token=True)})
        self._tell(self.tenancy.settle(changed))

    def _on_lease_renew(self, routing_id: bytes, header: dict, frames: list[Any]) -> None:
        lease = self.tenancy.renew(header)
        self.lease_routes[lease.lease_id] = routing_id
        self._send(routing_id, {"t": P.LEASE, "rid": header.get("rid"),
                                "lease": self.tenancy.lease_info(lease)})

    def _on_lease_release(self, routing_id: bytes, header: dict, frames: list[Any]) -> None:
        lease, told = self.tenancy.release(header)
        self._send(routing_id, {"t": P.LEASE, "rid": header.get("rid"),
                                "lease": self.tenancy.lease_info(lease)})
        self.lease_routes.pop(lease.lease_id, None)
        self._tell([x for x in told if x is not lease])

    def _on_drop_parked(self, routing_id: bytes, header: dict, frames: list[Any]) -> None:
        self._check_token(header)
        count, nbytes = self.tenancy.drop_kernel(header)
        self._forget_routes()
        self._send(routing_id, {"t": P.DROPPED, "rid": header.get("rid"), "sessions": count,
                                "bytes": nbytes})

    def _tell(self, leases: list[Lease]) -> None:
        """Push each lease's new state to the connection that holds it."""
        for lease in leases:
            route = self.lease_routes.get(lease.lease_id)
            if route is not None:
                self._send(route, {"t": P.LEASE, "lease": self.tenancy.lease_info(lease)})
            if not lease.active:
                self.lease_routes.pop(lease.lease_id, None)

    # }}}

    # {{{ sessions: hello, park, bye, moving parked state

    def _on_hello(self, routing_id: bytes, header: dict, frames: list[Any]) -> None:
        if header.get("v") != P.PROTOCOL_VERSION:
            raise _CallError(
                "VersionMismatch",
                f"this agent speaks protocol version {P.PROTOCOL_VERSION}, the client "
                f"{header.get('v')!r}: install the same harp-jupyter version on both sides")
        self._check_token(header)
        lease = self.tenancy.held(header.get("lease"))
        client = header.get("client") if isinstance(header.get("client"), dict) else {}
        resume = header.get("resume") if isinstance(header.get("resume"), dict) else None
        old = self.sessions.get(self.routes.get(routing_id, ""))
        session = None
        if resume is not None:
            session_id, resume_token = resume.get("session"), resume.get("resume_token")
            if not (isinstance(session_id, str) and isinstance(resume_token, str)):
                raise _CallError("ProtocolError", "resume needs string session and resume_token")
            session = self.tenancy.resume_here(lease, session_id, resume_token, routing_id)
            origin = resume.get("from")
            if session is None and isinstance(origin, str) and origin != self.endpoint:
                manifest, chunks = fetch_parked(origin, session_id, resume_token, self.token)
                session = self.tenancy.adopt(lease, manifest, chunks, routing_id, resume_token)
                try:
                    forget_parked(origin, session_id, resume_token, self.token)
                except MigrationError as e:
                    log.warning("could not tell %s to forget moved session %s: %s",
                                origin, session_id, e)
            if session is None:
                raise _CallError("StateLost", (
                    "the parked GPU state of this kernel is not on this agent and no other agent "
                    "was named to fetch it from: its device arrays, modules and streams no longer "
                    "exist; re-run the cells that create them."))
        if old is not None and old is not session and old.state == ACTIVE:
            self.tenancy.park(old, "its connection said hello again")
        if session is None:
            wanted = header.get("range")
            base = wanted[0] if isinstance(wanted, list) and wanted and type(wanted[0]) is int \
                else None
            session = self.tenancy.open(lease, routing_id, client, base)
        session.client = client or session.client
        self.routes[routing_id] = session.session_id
        self._send(routing_id, {
            "t": P.WELCOME, "v": P.PROTOCOL_VERSION, "session": session.session_id,
            "resume_token": session.resume_token, "resumed": resume is not None,
            "range": [session.base, session.size], "device": self.executor.device_info(),
            "executor": self.executor.name, "emulated": self.executor.emulated,
            "agent": {"version": AGENT_VERSION, "pid": os.getpid(), "endpoint": self.endpoint},
        })

    def _on_park(self, routing_id: bytes, header: dict, frames: list[Any]) -> None:
        session = self.sessions.get(self.routes.pop(routing_id, ""))
        if session is None:
            raise _CallError("SessionError", "park: this connection has no session")
        nbytes = self.tenancy.park(session, "its kernel asked")
        self._send(routing_id, {"t": P.PARKED, "rid": header.get("rid"),
                                "session": session.session_id, "bytes": nbytes})

    def _on_bye(self, routing_id: bytes, header: dict, frames: list[Any]) -> None:
        session = self.sessions.get(self.routes.pop(routing_id, ""))
        if session is not None:
            self.tenancy.end(session)
        self._send(routing_id, {"t": P.BYE})

    def _on_parked_fetch(self, routing_id: bytes, header: dict, frames: list[Any]) -> None:
        self._check_token(header)
        manifest, chunks = self.tenancy.manifest(str(header.get("session")),
                                                 str(header.get("resume_token")))
        self._send(routing_id, {"t": P.PARKED_STATE, "rid": header.get("rid"),
                                "manifest": manifest}, chunks)

    def _on_parked_forget(self, routing_id: bytes, header: dict, frames: list[Any]) -> None:
        self._check_token(header)
        nbytes = self.tenancy.forget_moved(str(header.get("session")),
                                           str(header.get("resume_token")))
        self._send(routing_id, {"t": P.DROPPED, "rid": header.get("rid"),
                                "sessions": int(nbytes > 0), "bytes": nbytes})

    def _on_status(self, routing_id: bytes, header: dict, frames: list[Any]) -> None:
        reply = self.status()
        if header.get("rid") is not None:
            reply["rid"] = header["rid"]
        self._send(routing_id, reply)

    def _forget_routes(self) -> None:
        self.routes = {r: sid for r, sid in self.routes.items() if sid in self.sessions}

    # }}}

    # {{{ batches

    def _on_batch(self, routing_id: bytes, header: dict, frames: list[Any]) -> None:
        session = self.sessions.get(self.routes.get(routing_id, ""))
        seq = header.get("q")
        calls = header.get("c")
        if session is None:
            raise _CallError("SessionError", "batch before hello: this client has no session "
                             "(was the agent restarted?)")
        if session.state != ACTIVE:
            self._send(routing_id, {"t": P.REPLY, "q": seq, "r": [], "e": P.error(
                "LeaseError", "this session's lease ended and its GPU state was parked before "
                "these calls arrived: they did not run (the next GPU call leases again and "
                "restores the parked state)", index=0)})
            return
        if type(seq) is not int or type(calls) is not list:
            raise _CallError("ProtocolError", "batch needs an int 'q' and a list 'c'")
        if len(calls) > P.MAX_CALLS_PER_BATCH:
            raise _CallError("ProtocolError", f"batch of {len(calls)} calls: at most "
                             f"{P.MAX_CALLS_PER_BATCH} per batch")
        session.last_seen = time.monotonic()
        session.batches += 1
        level = header.get("p")
        timer = profiling.BatchTimer(level) if type(level) is int and level > 0 else None
        results: list[list[Any]] = []
        out_frames: list[Any] = []
        first_error: dict | None = None
        for index, call in enumerate(calls):
            if session.lost:
                first_error = first_error or P.error("ContextLost", session.lost, index=index)
                break
            op = call[0] if type(call) is list and call and type(call[0]) is str else None
            try:
                name, args = P.validate_call(call)
                args = self._resolve_frames(args, frames)
                self._check_addresses(session, name, args)
                if timer is not None:
                    value = self._run_timed(session, timer, seq, index, name, args)
                else:
                    value = self.executor.run(session.ops[name], *args)
                self._after(session, name, args, value)
                session.record(name, args)
                session.calls += 1
                if P.OPS[name].result:
                    if isinstance(value, bytes | bytearray | memoryview | np.ndarray):
                        out_frames.append(value)
                        value = P.FrameRef(len(out_frames))
                    results.append([index, value])
            except P.ProtocolError as e:
                first_error = first_error or P.error("ProtocolError", str(e), index=index, op=op)
            except AddressError as e:
                first_error = first_error or P.error("HandleError", str(e), index=index, op=op)
            except _CallError as e:
                first_error = first_error or P.error(e.kind, str(e), index=index, op=op,
                                                     code=e.code)
            except ContextLost as e:
                self._context_lost(session, str(e))
                first_error = first_error or P.error("ContextLost", str(e), index=index, op=op,
                                                     code=e.code)
            except ExecutorError as e:
                first_error = first_error or P.error(e.kind, str(e), index=index, op=op,
                                                     code=e.code)
            except Exception as e:  # an executor bug must not take the agent down
                log.exception("call %s failed", op)
                first_error = first_error or P.error(
                    "RuntimeError", f"internal agent error in {op}: {type(e).__name__}: {e}",
                    index=index, op=op)
        session.last_active = time.monotonic()
        if not session.lost:
            try:
                session.device.batch_done()
            except Exception:
                log.exception("batch_done")
        reply = {"t": P.REPLY, "q": seq, "r": results, "e": first_error}
        if timer is not None:
            reply["p"] = timer.reply()
        self._send(routing_id, reply, out_frames)

    def _run_timed(self, session: ClientSession, timer: profiling.BatchTimer, seq: int,
                   index: int, name: str, args: list[Any]) -> Any:
        token = None
        if timer.gpu and name in profiling.GPU_WORK:
            token = session.device.gpu_timer_start(name, profiling.stream_of(name, args))
        started = profiling.now_ns()
        value = self.executor.run(session.ops[name], *args)
        timer.calls.append([index, started, profiling.now_ns()])
        if token is not None:
            session.device.gpu_timer_end(token, seq, index)
        return value

    @staticmethod
    def _resolve_frames(args: list[Any], frames: list[Any]) -> list[Any]:
        resolved = list(args)
        for i, value in enumerate(args):
            if type(value) is P.FrameRef:
                if not 1 <= value.index <= len(frames):
                    raise P.ProtocolError(f"frame {value.index} is not in this message "
                                          f"({len(frames)} frames)")
                frame = frames[value.index - 1]
                resolved[i] = frame.buffer if hasattr(frame, "buffer") else memoryview(frame)
        return resolved

    @staticmethod
    def _check_addresses(session: ClientSession, name: str, args: list[Any]) -> None:
        ranges = session.ranges
        if name == "alloc":
            ranges.check_new(args[0], args[1])
        elif name == "free":
            if not ranges.starts_at(args[0]):
                ranges.remove(args[0])  # raises the clear error
        elif name == "htod":
            ranges.check(args[0], args[0] + len(args[1]))
        elif name == "dtoh":
            ranges.check(args[0], args[0] + args[1])
        elif name == "dtod":
            ranges.check(args[0], args[0] + args[2])
            ranges.check(args[1], args[1] + args[2])
        elif name == "memset":
            ranges.check(args[0], args[0] + args[2] * args[3])
        elif name == "data_read":
            ranges.check(args[0], args[0] + args[3])
        elif name == "data_write":
            ranges.check(*_extent(args[0]))
        elif name in ("array", "elementwise_call", "reduction_call"):
            descriptors = [x for x in args if P.is_descriptor(x)]
            for operands in (a for a in args if type(a) is list and not P.is_descriptor(a)):
                descriptors += [x for x in operands if P.is_descriptor(x)]
            if name == "array" and P.is_descriptor(args[3].get("out2")):
                descriptors.append(args[3]["out2"])
            for desc in descriptors:
                ranges.check(*_extent(desc))

    @staticmethod
    def _after(session: ClientSession, name: str, args: list[Any], value: Any) -> None:
        if name == "alloc":
            session.ranges.add(args[0], args[1])
        elif name == "free":
            session.ranges.remove(args[0])
        elif name == "get_global":
            session.ranges.add_external(value[0], value[1])

    def _context_lost(self, culprit: ClientSession, message: str) -> None:
        log.error("device context reset after an error in session %s: %s",
                  culprit.session_id, message)
        for session in self.sessions.values():
            session.ranges = type(session.ranges)(session.base, session.size)
            if session is not culprit:
                session.lost = (
                    "the GPU context was reset after a fatal error in another session; this "
                    "session's device memory, modules and streams are gone. Re-run your GPU setup.")
            else:
                session.lost = (
                    f"{message}. The GPU context was lost: this session's device memory, "
                    "modules and streams are gone. Fix the kernel and re-run from the start.")

    # }}}

    def status(self) -> dict[str, Any]:
        free, total = self.executor.mem_info()
        return {
            "leases": self.tenancy.status(),
            "t": P.STATUS,
            "executor": self.executor.name,
            "emulated": self.executor.emulated,
            "device": self.executor.device_info(),
            "memory": {"free": free, "total": total, "used": total - free},
            "metrics": self.executor.metrics(),
            "data": self.executor.data_status(),
            "sessions": [s.summary() for s in self.sessions.values()],
            "agent": {"version": AGENT_VERSION, "pid": os.getpid(), "endpoint": self.endpoint,
                      "uptime": time.time() - self.started},
        }

    def _send(self, routing_id: bytes, header: dict, frames: list[Any] = ()) -> None:
        try:
            self.socket.send_multipart([routing_id, P.pack_header(header), *frames], copy=False)
        except zmq.ZMQError as e:
            log.warning("could not answer %s: %s", routing_id.hex(), e)


AgentServer._handlers = {
    P.BATCH: AgentServer._on_batch,
    P.HELLO: AgentServer._on_hello,
    P.STATUS: AgentServer._on_status,
    P.BYE: AgentServer._on_bye,
    P.PARK: AgentServer._on_park,
    P.LEASE_REQUEST: AgentServer._on_lease_request,
    P.LEASE_RENEW: AgentServer._on_lease_renew,
    P.LEASE_RELEASE: AgentServer._on_lease_release,
    P.DROP_PARKED: AgentServer._on_drop_parked,
    P.PARKED_FETCH: AgentServer._on_parked_fetch,
    P.PARKED_FORGET: AgentServer._on_parked_forget,
}
