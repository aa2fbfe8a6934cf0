"""The agent's server: one ZeroMQ ROUTER, many client sessions, one executor.

It receives messages, validates them against ``gpu_agent.protocol``, checks every address a call
names against what the session mapped, runs the calls on the executor and answers every batch with
exactly one reply. Nothing a client sends can stop it from serving the others: a bad message gets
an ``error`` reply and the loop goes on.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import time
from typing import Any

import numpy as np
import zmq

from gpu_agent import protocol as P
from gpu_agent.executors.base import ContextLost, Executor, ExecutorError
from gpu_agent.memory_map import AddressError
from gpu_agent.sessions import ClientSession

log = logging.getLogger("harp.agent")

AGENT_VERSION = "0.1.0"
MAX_SESSIONS = 256


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
    def __init__(self, executor: Executor, endpoint: str, *, token: str | None = None,
                 context: zmq.Context | None = None) -> None:
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
        self.sessions: dict[bytes, ClientSession] = {}
        self.started = time.time()
        self._running = False
        #: set when the agent must be replaced by a new process (see Executor.restart_required)
        self.restart = False

    # {{{ loop

    def serve_forever(self) -> None:
        self._running = True
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop())
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        try:
            while self._running:
                if not poller.poll(200):
                    continue
                while self._running:
                    try:
                        parts = self.socket.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    self.handle(parts)
        finally:
            self.close()

    def stop(self) -> None:
        self._running = False

    def close(self) -> None:
        if not self.executor.restart_required:
            for session in list(self.sessions.values()):
                self._end_session(session)
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
        try:
            if kind == P.BATCH:
                self._on_batch(routing_id, header, frames)
            elif kind == P.HELLO:
                self._on_hello(routing_id, header)
            elif kind == P.STATUS:
                self._send(routing_id, self.status())
            elif kind == P.BYE:
                session = self.sessions.get(routing_id)
                if session:
                    self._end_session(session)
                self._send(routing_id, {"t": P.BYE})
            else:
                raise _CallError("ProtocolError", f"unknown message type {kind!r}")
        except _CallError as e:
            self._send(routing_id, {"t": P.ERROR, "e": P.error(e.kind, str(e), code=e.code)})

    # {{{ hello

    def _on_hello(self, routing_id: bytes, header: dict) -> None:
        if header.get("v") != P.PROTOCOL_VERSION:
            raise _CallError(
                "VersionMismatch",
                f"this agent speaks protocol version {P.PROTOCOL_VERSION}, the client "
                f"{header.get('v')!r}: install the same harp-jupyter version on both sides")
        if self.token is not None:
            given = header.get("token")
            if not isinstance(given, str) or not secrets.compare_digest(given, self.token):
                raise _CallError("AuthError", "wrong or missing token for this agent (HARP_TOKEN)")
        old = self.sessions.get(routing_id)
        if old:
            self._end_session(old)
        slot = self._free_slot(header.get("range"))
        base, size = P.session_range(slot)
        client = header.get("client") if isinstance(header.get("client"), dict) else {}
        try:
            device = self.executor.open_session(base, size)
        except ExecutorError as e:
            raise _CallError(e.kind, str(e), e.code) from None
        session = ClientSession(secrets.token_hex(8), routing_id, slot, base, size, device, client)
        self.sessions[routing_id] = session
        log.info("session %s opened for %s", session.session_id, client)
        self._send(routing_id, {
            "t": P.WELCOME, "v": P.PROTOCOL_VERSION, "session": session.session_id,
            "range": [base, size], "device": self.executor.device_info(),
            "executor": self.executor.name, "emulated": self.executor.emulated,
            "agent": {"version": AGENT_VERSION, "pid": os.getpid(), "endpoint": self.endpoint},
        })

    def _free_slot(self, wanted: Any) -> int:
        used = {s.slot for s in self.sessions.values()}
        if isinstance(wanted, list) and len(wanted) == 2 and isinstance(wanted[0], int):
            slot, rem = divmod(wanted[0] - P.ADDRESS_SPACE_BASE, P.SESSION_RANGE_SIZE)
            if rem == 0 and 0 <= slot < MAX_SESSIONS and slot not in used:
                return slot
        for slot in range(MAX_SESSIONS):
            if slot not in used:
                return slot
        raise _CallError("SessionError", f"this agent already serves {MAX_SESSIONS} sessions")

    def _end_session(self, session: ClientSession) -> None:
        self.sessions.pop(session.routing_id, None)
        try:
            session.device.close()
        except Exception:
            log.exception("closing session %s", session.session_id)
        log.info("session %s closed", session.session_id)

    # }}}

    # {{{ batches

    def _on_batch(self, routing_id: bytes, header: dict, frames: list[Any]) -> None:
        session = self.sessions.get(routing_id)
        seq = header.get("q")
        calls = header.get("c")
        if session is None:
            raise _CallError("SessionError", "batch before hello: this client has no session "
                             "(was the agent restarted?)")
        if type(seq) is not int or type(calls) is not list:
            raise _CallError("ProtocolError", "batch needs an int 'q' and a list 'c'")
        if len(calls) > P.MAX_CALLS_PER_BATCH:
            raise _CallError("ProtocolError", f"batch of {len(calls)} calls: at most "
                             f"{P.MAX_CALLS_PER_BATCH} per batch")
        session.last_seen = time.monotonic()
        session.batches += 1
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
                value = self.executor.run(session.ops[name], *args)
                self._after(session, name, args, value)
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
        self._send(routing_id, {"t": P.REPLY, "q": seq, "r": results, "e": first_error},
                   out_frames)
        if self.executor.restart_required:
            log.error("the device is unusable in this process: restarting the agent")
            self.restart = True
            self.stop()

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
            "t": P.STATUS,
            "executor": self.executor.name,
            "emulated": self.executor.emulated,
            "device": self.executor.device_info(),
            "memory": {"free": free, "total": total},
            "metrics": self.executor.metrics(),
            "sessions": [s.summary() for s in self.sessions.values()],
            "agent": {"version": AGENT_VERSION, "pid": os.getpid(), "endpoint": self.endpoint,
                      "uptime": time.time() - self.started},
        }

    def _send(self, routing_id: bytes, header: dict, frames: list[Any] = ()) -> None:
        try:
            self.socket.send_multipart([routing_id, P.pack_header(header), *frames], copy=False)
        except zmq.ZMQError as e:
            log.warning("could not answer %s: %s", routing_id.hex(), e)
