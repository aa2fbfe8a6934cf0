"""The supervisor's client socket: every message a client sends the agent, checked and answered.

``ClientRequests`` owns the client-facing ROUTER socket. Every message is hostile until checked:
a size bound before anything is read (the socket's), the token before anything is done; then it
goes to the piece of ``Tenancy`` whose job it is, and what is owed to clients is sent without
ever waiting on a client (one that leaves its replies unread loses them). A bad message gets an
``error`` reply and the agent goes on serving everyone else.
"""

from __future__ import annotations

import logging
import mmap
import secrets
import time
from collections.abc import Callable
from typing import Any, ClassVar

import zmq
from zmq.auth.thread import ThreadAuthenticator

from gpu_agent import protocol as P
from gpu_agent.curve import ServerKeys, serve_encrypted
from gpu_agent.drain import Drain
from gpu_agent.errors import AgentError
from gpu_agent.lease_desk import DRAINING_REFUSAL
from gpu_agent.limits import AgentLimits
from gpu_agent.metrics import AgentMetrics
from gpu_agent.tenancy import Tenancy
from gpu_agent.workers import WorkerPool

log = logging.getLogger("harp.agent")

#: messages that prove themselves: a status probe answers anyone (with nothing but liveness),
#: and a renew or release carries the lease's own token (``token`` there), which only a client
#: that presented the agent's token when it asked for the lease can have
_OWN_PROOF = frozenset({P.STATUS, P.LEASE_RENEW, P.LEASE_RELEASE})
#: refusal kinds as the metrics count them (a bounded set of labels)
_REFUSAL_KIND = {"AuthError": "unauthorized", "VersionMismatch": "protocol_version",
                 "ProtocolError": "bad_message", "MemoryError": "over_memory_cap",
                 "SessionError": "unknown_session", "StateLost": "unknown_session"}


def bind_client_socket(context: zmq.Context, endpoint: str, limits: AgentLimits,
                       curve: ServerKeys | None
                       ) -> tuple[zmq.Socket, ThreadAuthenticator | None]:
    """The client-facing ROUTER, bounded and bound (encrypted with ``curve``)."""
    socket = context.socket(zmq.ROUTER)
    socket.setsockopt(zmq.LINGER, 0)
    # bounded before anything is read: ZeroMQ drops a larger message (and its connection)
    socket.setsockopt(zmq.MAXMSGSIZE, limits.max_control_message)
    # one connection may hold every queued lease, and each queue move tells each of them:
    # room for that many small pushes plus its unread replies, and no more
    socket.setsockopt(zmq.SNDHWM, limits.max_queue + limits.unread_replies)
    socket.setsockopt(zmq.RCVHWM, 64)
    authenticator = serve_encrypted(context, [socket], curve) if curve is not None else None
    socket.bind(endpoint)
    return socket, authenticator


class ClientRequests:
    """See the module docstring."""

    _handlers: ClassVar[dict[str, Callable[..., None]]]

    def __init__(self, socket: zmq.Socket, authenticator: ThreadAuthenticator | None,
                 tenancy: Tenancy, drain: Drain, workers: WorkerPool, limits: AgentLimits,
                 metrics: AgentMetrics, *, token: str | None, agent_info: dict[str, Any],
                 device_info: Callable[[], dict[str, Any]]) -> None:
        self.socket = socket
        self.authenticator = authenticator
        self.tenancy = tenancy
        self.drain = drain
        self.workers = workers
        self.limits = limits
        self.metrics = metrics
        self.token = token
        self.agent_info = agent_info
        self.device_info = device_info
        self.started = time.time()

    def receive(self, most: int) -> None:
        """Handle up to ``most`` messages that have arrived (then the loop has other turns)."""
        for _ in range(most):
            try:
                parts = self.socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            self.handle(parts)

    def handle(self, parts: list[Any]) -> None:
        route = parts[0].bytes
        try:
            header, _frames = P.decode(parts[1:])
        except P.ProtocolError as e:
            self._refuse(route, None, e)
            return
        rid = header.get("rid")
        kind = header["t"]
        try:
            handler = self._handlers.get(kind)
            if kind == P.BATCH:
                raise AgentError("SessionError", "batch before hello: batches go to the "
                                 "session's worker, whose endpoint the welcome names")
            if handler is None:
                raise P.ProtocolError(f"the agent takes no {kind!r} message (a batch goes to "
                                      "the session's worker)")
            if kind not in _OWN_PROOF:
                self._check_token(header)
            handler(self, route, header)
        except AgentError as e:
            self._refuse(route, rid, e)
        except Exception as e:  # a bug in a handler must not take the agent down
            log.exception("handling %s failed", kind)
            self._refuse(route, rid, AgentError(
                "RuntimeError", f"the agent failed handling {kind}: {type(e).__name__}: {e} "
                "(a bug in harp-agent: please report it)"))
        self.flush()

    def _refuse(self, route: bytes, rid: Any, error: AgentError) -> None:
        refusals = self.tenancy.refusals
        refusals[error.kind] = refusals.get(error.kind, 0) + 1
        message = str(error)
        self.metrics.refused("queue_full" if "queue is full" in message else "draining"
                             if message == DRAINING_REFUSAL else
                             _REFUSAL_KIND.get(error.kind, "other"))
        reply: dict[str, Any] = {"t": P.ERROR, "e": error.to_wire()}
        if rid is not None:
            reply["rid"] = rid
        self._send(route, reply)

    def _authorised(self, header: dict[str, Any]) -> bool:
        if self.token is None:
            return True
        given = header.get("token")
        return isinstance(given, str) and secrets.compare_digest(given, self.token)

    def _check_token(self, header: dict[str, Any]) -> None:
        if not self._authorised(header):
            raise AgentError("AuthError", "wrong or missing token for this agent (HARP_TOKEN)")

    # {{{ handlers

    def _on_hello(self, route: bytes, header: dict[str, Any]) -> None:
        if header.get("v") != P.PROTOCOL_VERSION:
            raise AgentError("VersionMismatch", (
                f"this agent speaks protocol version {P.PROTOCOL_VERSION}, the client "
                f"{header.get('v')!r}: install the same harp-jupyter version on both sides"))
        self.tenancy.session_desk.hello(route, header)

    def _on_status(self, route: bytes, header: dict[str, Any]) -> None:
        if not self._authorised(header):
            # the liveness probe: alive, and nothing about anyone
            self._send(route, {"t": P.STATUS, "rid": header.get("rid"), "alive": True,
                               "agent": {"version": self.agent_info["version"]},
                               "auth": "token needed", "draining": self.drain.active})
            return
        kernel = (header.get("kernel_id"), header.get("kernel_secret"))
        everyone = header.get("scope") != "kernel"
        reply = self.status(everyone=everyone, kernel=kernel if all(
            isinstance(x, str) for x in kernel) else None)
        if header.get("rid") is not None:
            reply["rid"] = header["rid"]
        self._send(route, reply)

    def _on_park(self, route: bytes, header: dict[str, Any]) -> None:
        self.tenancy.session_desk.park_request(route, header)

    def _on_bye(self, route: bytes, header: dict[str, Any]) -> None:
        self.tenancy.session_desk.bye(route)

    def _on_lease_request(self, route: bytes, header: dict[str, Any]) -> None:
        self.tenancy.lease_desk.request(route, header)

    def _on_lease_renew(self, route: bytes, header: dict[str, Any]) -> None:
        self.tenancy.lease_desk.renew(route, header)

    def _on_lease_release(self, route: bytes, header: dict[str, Any]) -> None:
        self.tenancy.lease_desk.release(route, header)

    def _on_drop_parked(self, route: bytes, header: dict[str, Any]) -> None:
        count, nbytes = self.tenancy.session_desk.drop_kernel(header)
        self._send(route, {"t": P.DROPPED, "rid": header.get("rid"), "sessions": count,
                           "bytes": nbytes})

    def _on_parked_fetch(self, route: bytes, header: dict[str, Any]) -> None:
        self._send(route, {"t": P.PARKED_STATE, "rid": header.get("rid"),
                           "manifest": self.tenancy.handoff.manifest(header)})

    def _on_parked_chunk(self, route: bytes, header: dict[str, Any]) -> None:
        _session, parked = self.tenancy.handoff.parked_for(header)
        addr, offset, size = header.get("addr"), header.get("offset"), header.get("size")
        for chunk_addr, chunk_size, path in parked.chunks:
            if (chunk_addr == addr and type(offset) is int and type(size) is int
                    and 0 <= offset and 0 < size <= self.limits.max_frame
                    and offset + size <= chunk_size):
                with open(path, "rb") as f:
                    # mapped, not read: the bytes are paged in as ZeroMQ sends them
                    view = memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
                self._send(route, {"t": P.PARKED_STATE, "rid": header.get("rid")},
                           [view[offset:offset + size]])
                return
        raise AgentError("ProtocolError", "parked_chunk names no piece of that parked state")

    def _on_parked_adopt(self, route: bytes, header: dict[str, Any]) -> None:
        self.tenancy.handoff.adopt(route, header)

    def _on_parked_forget(self, route: bytes, header: dict[str, Any]) -> None:
        nbytes = self.tenancy.handoff.forget_moved(header)
        self._send(route, {"t": P.DROPPED, "rid": header.get("rid"), "sessions": 1,
                           "bytes": nbytes})

    # }}}

    def status(self, *, everyone: bool = True,
               kernel: tuple[str, str] | None = None) -> dict[str, Any]:
        config = self.workers.config
        device = self.device_info()
        return {
            "t": P.STATUS,
            "leases": self.tenancy.status(everyone=everyone, kernel=kernel),
            "executor": config.executor,
            "draining": self.drain.active,
            "emulated": config.executor == "emulated",
            "device": device,
            "memory": {"slot": config.memory_cap, "total": device.get("total_memory"),
                       "free": config.memory_cap * self.tenancy.leases.free_slots,
                       "used": sum(w.figures().get("device_bytes", 0)
                                   for w in self.workers.workers.values()
                                   if w.ended_by is None)},
            "data": next((w.data for w in self.workers.workers.values() if w.data), {}),
            "workers": {"running": len(self.workers.workers), "restarts": self.workers.restarts,
                        "ready_spares": sum(1 for w in self.workers.workers.values()
                                            if w.ready and w.session_id is None
                                            and w.ended_by is None)},
            "agent": {**self.agent_info, "uptime": time.time() - self.started},
        }

    def flush(self) -> None:
        for route, header, frames in self.tenancy.outbox.take():
            self._send(route, header, frames)

    def _send(self, route: bytes, header: dict[str, Any], frames: list[Any] = ()) -> None:
        try:
            self.socket.send_multipart([route, P.pack_header(header), *frames], copy=False,
                                       flags=zmq.NOBLOCK)
        except zmq.ZMQError as e:
            # a client that leaves its replies unread loses them, nobody else waits for it
            log.info("could not answer %s: %s", route.hex(), e)

    def close(self) -> None:
        if self.authenticator is not None:
            self.authenticator.stop()
        self.socket.close(0)


ClientRequests._handlers = {
    P.HELLO: ClientRequests._on_hello,
    P.STATUS: ClientRequests._on_status,
    P.BYE: ClientRequests._on_bye,
    P.PARK: ClientRequests._on_park,
    P.LEASE_REQUEST: ClientRequests._on_lease_request,
    P.LEASE_RENEW: ClientRequests._on_lease_renew,
    P.LEASE_RELEASE: ClientRequests._on_lease_release,
    P.DROP_PARKED: ClientRequests._on_drop_parked,
    P.PARKED_FETCH: ClientRequests._on_parked_fetch,
    P.PARKED_CHUNK: ClientRequests._on_parked_chunk,
    P.PARKED_FORGET: ClientRequests._on_parked_forget,
    P.PARKED_ADOPT: ClientRequests._on_parked_adopt,
}
