"""The agent's supervisor: the one process that listens on the network and never touches CUDA.

It owns the client-facing ROUTER socket, the workers' control socket, the lease table, the park
store's books and the status. It validates every message (hostile until checked: a size bound
before anything is read, the token before anything is done), hands leases and session lifecycle
to ``Tenancy``, and never waits: not on a tenant's work (that runs in workers), not on another
agent (workers move parked state themselves), not on a disk (workers write parked state). A bad
message gets an ``error`` reply and the loop goes on serving everyone else.
"""

from __future__ import annotations

import logging
import mmap
import os
import secrets
import signal
import time
from collections.abc import Callable
from functools import partial
from typing import Any, ClassVar

import zmq

from gpu_agent import nvml
from gpu_agent import protocol as P
from gpu_agent.curve import ServerKeys, serve_encrypted
from gpu_agent.drain import Drain
from gpu_agent.errors import AgentError
from gpu_agent.lease_desk import DRAINING_REFUSAL
from gpu_agent.limits import AgentLimits
from gpu_agent.metrics import AgentMetrics
from gpu_agent.parking import ParkStore
from gpu_agent.tenancy import Tenancy
from gpu_agent.workers import WorkerConfig, WorkerPool

log = logging.getLogger("harp.agent")

AGENT_VERSION = "0.3.0"
TICK_S = 0.05
GPU_SAMPLE_S = 5.0
#: /healthz fails when the loop has not turned for this long (a wedged supervisor)
HEALTHY_WITHIN_S = 30.0
#: messages that prove themselves: a status probe answers anyone (with nothing but liveness),
#: and a renew or release carries the lease's own token (``token`` there), which only a client
#: that presented the agent's token when it asked for the lease can have
_OWN_PROOF = frozenset({P.STATUS, P.LEASE_RENEW, P.LEASE_RELEASE})
#: refusal kinds as the metrics count them (a bounded set of labels)
_REFUSAL_KIND = {"AuthError": "unauthorized", "VersionMismatch": "protocol_version",
                 "ProtocolError": "bad_message", "MemoryError": "over_memory_cap",
                 "SessionError": "unknown_session", "StateLost": "unknown_session"}


class Supervisor:
    _handlers: ClassVar[dict[str, Callable[..., None]]]

    def __init__(self, endpoint: str, workers: WorkerConfig, limits: AgentLimits, *,
                 token: str | None = None, device: dict[str, Any] | None = None,
                 spares: int = 1, curve: ServerKeys | None = None,
                 pool: Callable[[], list[str]] = list, advertise: str | None = None,
                 context: zmq.Context | None = None) -> None:
        self.token = token
        self.limits = limits
        self.context = context or zmq.Context.instance()
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        # bounded before anything is read: ZeroMQ drops a larger message (and its connection)
        self.socket.setsockopt(zmq.MAXMSGSIZE, limits.max_control_message)
        # one connection may hold every queued lease, and each queue move tells each of them:
        # room for that many small pushes plus its unread replies, and no more
        self.socket.setsockopt(zmq.SNDHWM, limits.max_queue + limits.unread_replies)
        self.socket.setsockopt(zmq.RCVHWM, 64)
        self.authenticator = serve_encrypted(self.context, [self.socket], curve) \
            if curve is not None else None
        self.socket.bind(endpoint)
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.workers = WorkerPool(self.context, workers, spares=spares)
        memory, limit = limits.park_budget()
        parking = ParkStore(memory, limit, limits.park_ttl, memory_dir=limits.park_memory_dir,
                            spill_dir=limits.park_dir)
        self.device = device or {}
        self.agent_info = {"version": AGENT_VERSION, "pid": os.getpid(),
                           "endpoint": self.endpoint, "executor": workers.executor,
                           "emulated": workers.executor == "emulated"}
        self.metrics = AgentMetrics(health=self._healthy, ready=self._ready)
        self.metrics.info(AGENT_VERSION, workers.executor, str(self.device.get("name", "")),
                          limits.slots)
        self.tenancy = Tenancy(self.workers, parking, limits, endpoint=self.endpoint,
                               agent_info=self.agent_info, device_info=self.device_info,
                               metrics=self.metrics)
        self.drain = Drain(self.tenancy, grace=limits.drain_grace,
                           advertise=advertise or self.endpoint, peers=pool, token=token,
                           curve=curve, context=self.context)
        self._signals = 0
        self._last_loop = time.monotonic()
        self._next_gpu_sample = 0.0
        self.started = time.time()
        self._running = False
        self._next_tick = 0.0
        self.workers.ensure_spares()

    # {{{ loop

    def serve_forever(self) -> None:
        self._running = True
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        poller.register(self.workers.socket, zmq.POLLIN)
        try:
            while self._running:
                events = dict(poller.poll(int(TICK_S * 1000)))
                # worker reports first, then the tick (which sees exits): a report written
                # before a worker's exit is read before the exit is acted on
                for worker, header in self.workers.receive():
                    self._guarded(partial(self.tenancy.lifecycle.on_worker, worker, header))
                if self.socket in events:
                    for _ in range(256):  # then let the workers and the clock have a turn
                        try:
                            parts = self.socket.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self.handle(parts)
                now = self._last_loop = time.monotonic()
                if now >= self._next_tick:
                    self._next_tick = now + TICK_S
                    self._guarded(self.tenancy.tick)
                    if self._signals and not self.drain.active:
                        self._guarded(self.drain.begin)
                    if self.drain.active and self.drain.tick():
                        self._running = False
                if now >= self._next_gpu_sample:
                    self._next_gpu_sample = now + GPU_SAMPLE_S
                    self._guarded(self._sample_gpu)
                self._flush()
        finally:
            self.close()

    def wait_ready(self, timeout: float) -> None:
        """Block (at start-up only) until the first worker has its context: from then on the
        agent can serve a session at once. RuntimeError when none comes."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.workers.socket.poll(100):
                for worker, header in self.workers.receive():
                    self.tenancy.lifecycle.on_worker(worker, header)
            if any(w.ready for w in self.workers.workers.values()):
                self.device = self.device_info()
                return
            for _worker, code in self.workers.reap(time.monotonic(), timeout):
                raise RuntimeError(f"its first GPU worker exited (code {code}) before it was "
                                   "ready: see the worker's messages above")
        raise RuntimeError(f"no GPU worker was ready within {timeout:g} s")

    def device_info(self) -> dict[str, Any]:
        """The device as a session sees it: the worker's facts, its memory the slot's."""
        ready = [w for w in self.workers.workers.values() if w.ready and w.device]
        device = ready[0].device if ready else self.device
        return {**device, "total_memory": self.workers.config.memory_cap}

    def _guarded(self, step: Callable[[], None]) -> None:
        try:
            step()
        except Exception:  # a bug must not take the supervisor down
            log.exception("supervisor step failed")

    def _sample_gpu(self) -> None:
        bus = self.device.get("pci_bus_id")
        figures = nvml.read(bus) if bus and bus != "emulated" else {}
        if figures:
            self.metrics.gpu(figures["utilization_gpu"] / 100, figures["memory_used"],
                             figures["memory_total"])

    def _healthy(self) -> bool:
        """The loop turned recently (/healthz, on the metrics port's thread)."""
        return time.monotonic() - self._last_loop < HEALTHY_WITHIN_S

    def _ready(self) -> bool:
        """A worker is ready for the next session (/readyz)."""
        return self._running and not self.drain.active and not self._signals and any(
            w.ready and w.ended_by is None
                                     for w in list(self.workers.workers.values()))

    def serve_metrics(self, host: str, port: int) -> int:
        """Serve /metrics, /healthz and /readyz; the port bound."""
        return self.metrics.serve(host, port)

    def stop(self) -> None:
        self._running = False

    def _on_signal(self, *_: Any) -> None:
        """SIGTERM or SIGINT: drain (on the loop, not in the handler); a second one: stop."""
        self._signals += 1
        if self._signals > 1:
            self.stop()

    def close(self) -> None:
        self.metrics.close()
        self.drain.close()
        self.workers.close()
        if self.authenticator is not None:
            self.authenticator.stop()
        self.tenancy.close()
        self.socket.close(0)

    # }}}

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
        self._flush()

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
                               "agent": {"version": AGENT_VERSION}, "auth": "token needed",
                               "draining": self.drain.active})
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

    def _flush(self) -> None:
        for route, header, frames in self.tenancy.outbox.take():
            self._send(route, header, frames)

    def _send(self, route: bytes, header: dict[str, Any], frames: list[Any] = ()) -> None:
        try:
            self.socket.send_multipart([route, P.pack_header(header), *frames], copy=False,
                                       flags=zmq.NOBLOCK)
        except zmq.ZMQError as e:
            # a client that leaves its replies unread loses them, nobody else waits for it
            log.info("could not answer %s: %s", route.hex(), e)


Supervisor._handlers = {
    P.HELLO: Supervisor._on_hello,
    P.STATUS: Supervisor._on_status,
    P.BYE: Supervisor._on_bye,
    P.PARK: Supervisor._on_park,
    P.LEASE_REQUEST: Supervisor._on_lease_request,
    P.LEASE_RENEW: Supervisor._on_lease_renew,
    P.LEASE_RELEASE: Supervisor._on_lease_release,
    P.DROP_PARKED: Supervisor._on_drop_parked,
    P.PARKED_FETCH: Supervisor._on_parked_fetch,
    P.PARKED_CHUNK: Supervisor._on_parked_chunk,
    P.PARKED_FORGET: Supervisor._on_parked_forget,
    P.PARKED_ADOPT: Supervisor._on_parked_adopt,
}
