"""LeaseClient: asks GPU agents for leases (docs/leases-design.md, "Messages to the agent").

The async core keeps one DEALER per agent and a reader task per socket that matches replies to
requests by ``rid`` and queues the ``lease`` messages an agent pushes (grant, queue moves,
revoke, expiry) per lease. ``BlockingLeaseClient`` is the thin synchronous wrapper for callers
without an event loop (the shim when no provisioner holds its lease): it runs the same core on
its own loop in a daemon thread.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import zmq
import zmq.asyncio
from zmq.utils.monitor import recv_monitor_message

from gpu_agent import protocol as P
from provisioner.wire_security import CLIENT_KEY_ENV, SERVER_KEY_ENV, client_keys

DEFAULT_TIMEOUT_S = 5.0
T = TypeVar("T")
log = logging.getLogger("harp.provisioner.lease_client")

#: on_push(endpoint, lease_info) for every lease change an agent pushes
PushCallback = Callable[[str, dict[str, Any]], None]


class AgentUnreachable(Exception):
    """An agent did not answer in time (dead, or not listening there)."""


class LeaseRefused(Exception):
    """An agent answered a lease message with an error."""

    def __init__(self, kind: str, msg: str) -> None:
        super().__init__(f"{kind}: {msg}")
        self.kind, self.msg = kind, msg


class _AgentLink:
    """One DEALER to one agent, with its reader task."""

    def __init__(self, endpoint: str, context: zmq.asyncio.Context,
                 on_message: Callable[[str, dict[str, Any]], None]) -> None:
        self.endpoint = endpoint
        self.socket = context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        keys = client_keys()
        self._monitor: zmq.Socket | None = None
        if keys is not None:
            keys.apply(self.socket)
            monitor = self.socket.get_monitor_socket(
                zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)
            self._monitor = zmq.Socket.shadow(monitor.underlying)
            self._monitor_owner = monitor
        self.socket.connect(endpoint)
        self._on_message = on_message
        self.reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        while True:
            parts = await self.socket.recv_multipart()
            try:
                header, _frames = P.decode(parts)
            except P.ProtocolError:
                continue
            try:
                self._on_message(self.endpoint, header)
            except Exception:  # a failing callback must not stop the replies of everyone else
                log.exception("handling %s from %s failed", header.get("t"), self.endpoint)

    def handshake_failure(self) -> str | None:
        """Why the CurveZMQ handshake failed, if it did (read without waiting)."""
        if self._monitor is None:
            return None
        why = None
        while True:
            try:
                event = recv_monitor_message(self._monitor, zmq.NOBLOCK)["event"]
            except zmq.Again:
                return why
            why = ("it refused this client's CurveZMQ key: its operator must add the public "
                   f"half of {CLIENT_KEY_ENV} to the agent's --curve-client-keys-dir"
                   if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH else
                   f"the CurveZMQ handshake failed: the agent's key is not the one in "
                   f"{SERVER_KEY_ENV}, or one side encrypts and the other does not")

    def close(self) -> None:
        self.reader.cancel()
        if self._monitor is not None:
            self.socket.disable_monitor()
            self._monitor_owner.close(0)
        self.socket.close(0)


class LeaseClient:
    """Lease requests to any number of agents; see the module docstring."""

    def __init__(self, *, token: str | None = None, on_push: PushCallback | None = None,
                 timeout: float = DEFAULT_TIMEOUT_S,
                 context: zmq.asyncio.Context | None = None) -> None:
        """``context``: a shared zmq.asyncio context (many provisioners in one server need not
        start an I/O thread each); without one the client owns a context of its own."""
        self.token = token
        self.timeout = timeout
        self.on_push = on_push
        #: (kernel_id, kernel_secret) of the one kernel this client leases for, when it does:
        #: its status requests then prove it, and see that kernel's own leases and parked state
        self.kernel: tuple[str, str] | None = None
        self._own_context = context is None
        self._context = zmq.asyncio.Context() if context is None else context
        self._links: dict[str, _AgentLink] = {}
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        #: why agents asked by the last ``statuses`` did not answer
        self.unanswered: dict[str, str] = {}
        #: rids of status requests per endpoint, oldest first: an agent that does not echo
        #: ``rid`` in its ``status`` reply still answers them in order (ZeroMQ keeps order)
        self._status_rids: dict[str, deque[int]] = {}
        self._pushes: dict[str, asyncio.Queue[dict[str, Any]]] = {}
        self._rids = itertools.count(1)

    def _link(self, endpoint: str) -> _AgentLink:
        link = self._links.get(endpoint)
        if link is None:
            link = self._links[endpoint] = _AgentLink(endpoint, self._context, self._on_message)
        return link

    def _on_message(self, endpoint: str, header: dict[str, Any]) -> None:
        rid = header.get("rid")
        if rid is None and header.get("t") == P.STATUS:
            rid = self._oldest_status_rid(endpoint)
        future = self._waiting.pop(rid, None)  # type: ignore[arg-type]
        if future is not None:
            if not future.done():
                future.set_result(header)
            return
        if header.get("t") == P.LEASE and isinstance(header.get("lease"), dict):
            lease = header["lease"]
            self._pushes.setdefault(str(lease.get("id")), asyncio.Queue()).put_nowait(lease)
            if self.on_push is not None:
                self.on_push(endpoint, lease)

    def _oldest_status_rid(self, endpoint: str) -> int | None:
        rids = self._status_rids.get(endpoint)
        while rids:
            rid = rids.popleft()
            if rid in self._waiting:
                return rid
        return None

    async def _request(self, endpoint: str, header: dict[str, Any],
                       timeout: float | None = None) -> dict[str, Any]:
        rid = next(self._rids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[rid] = future
        if header["t"] == P.STATUS:
            self._status_rids.setdefault(endpoint, deque()).append(rid)
        link = self._link(endpoint)
        limit = timeout or self.timeout
        try:
            # the send is inside the time limit too: a DEALER may block where it has no peer
            reply = await asyncio.wait_for(
                self._send_and_wait(link, {**header, "rid": rid}, future), limit)
        except (TimeoutError, zmq.ZMQError):
            # a dead agent's queued messages would be delivered late to a new one: start over
            refused = link.handshake_failure()
            if self._links.get(endpoint) is link:
                del self._links[endpoint]
                link.close()
            if refused is not None:
                raise AgentUnreachable(
                    f"the GPU agent at {endpoint} is there, but {refused}") from None
            raise AgentUnreachable(
                f"the GPU agent at {endpoint} did not answer within {limit:g} s: is harp-agent "
                "running there?") from None
        finally:
            self._waiting.pop(rid, None)
            rids = self._status_rids.get(endpoint)
            if rids and rid in rids:
                rids.remove(rid)
        if reply.get("t") == P.ERROR:
            error = reply.get("e") if isinstance(reply.get("e"), dict) else {}
            raise LeaseRefused(str(error.get("kind")), str(error.get("msg")))
        return reply

    @staticmethod
    async def _send_and_wait(link: _AgentLink, header: dict[str, Any],
                             future: asyncio.Future[dict[str, Any]]) -> dict[str, Any]:
        await link.socket.send(P.pack_header(header))
        return await future

    # {{{ the messages

    async def status(self, endpoint: str, timeout: float | None = None) -> dict[str, Any]:
        """The agent's ``status`` (device, memory, ``leases``: holder, queue, parked)."""
        header: dict[str, Any] = {"t": P.STATUS}
        if self.token is not None:
            header["token"] = self.token
        if self.kernel is not None:
            header.update(scope="kernel", kernel_id=self.kernel[0], kernel_secret=self.kernel[1])
        return await self._request(endpoint, header, timeout)

    async def statuses(self, endpoints: list[str],
                       timeout: float | None = None) -> dict[str, dict[str, Any]]:
        """The status of every agent that answers, in ``endpoints`` order; why the others did
        not is kept in ``unanswered`` (endpoint -> message) for the caller's error."""
        results = await asyncio.gather(*(self.status(e, timeout) for e in endpoints),
                                       return_exceptions=True)
        self.unanswered = {e: str(r) for e, r in zip(endpoints, results, strict=True)
                           if isinstance(r, Exception)}
        return {e: r for e, r in zip(endpoints, results, strict=True) if isinstance(r, dict)}

    async def request(self, endpoint: str, kernel_id: str, kernel_secret: str, user: str = "",
                      *, ttl: float | None = None, info: dict[str, Any] | None = None
                      ) -> dict[str, Any]:
        reply = await self._request(endpoint, {
            "t": P.LEASE_REQUEST, "kernel_id": kernel_id, "kernel_secret": kernel_secret,
            "user": user, "ttl": ttl, "info": info or {}, "token": self.token})
        return reply["lease"]

    async def renew(self, endpoint: str, lease_id: str, token: str) -> dict[str, Any]:
        reply = await self._request(endpoint, {"t": P.LEASE_RENEW, "lease_id": lease_id,
                                               "token": token})
        return reply["lease"]

    async def release(self, endpoint: str, lease_id: str, token: str) -> dict[str, Any]:
        reply = await self._request(endpoint, {"t": P.LEASE_RELEASE, "lease_id": lease_id,
                                               "token": token})
        self._pushes.pop(lease_id, None)
        return reply["lease"]

    async def drop_parked(self, endpoint: str, kernel_id: str,
                          kernel_secret: str) -> dict[str, Any]:
        return await self._request(endpoint, {"t": P.DROP_PARKED, "kernel_id": kernel_id,
                                              "kernel_secret": kernel_secret,
                                              "token": self.token})

    async def parked_bytes(self, endpoint: str, kernel_id: str, kernel_secret: str,
                           timeout: float | None = None) -> int | None:
        """The bytes the agent holds parked for this kernel (its own sessions, proved by its
        secret); None while one of them is still being parked or none is parked there."""
        reply = await self._request(endpoint, {
            "t": P.STATUS, "scope": "kernel", "kernel_id": kernel_id,
            "kernel_secret": kernel_secret, "token": self.token}, timeout)
        leases = reply.get("leases") if isinstance(reply.get("leases"), dict) else {}
        sessions = [s for s in leases.get("sessions") or [] if isinstance(s, dict)
                    and s.get("kernel_id") == kernel_id]
        if not sessions or any(s.get("state") != "parked" for s in sessions):
            return None
        return sum(int(s.get("parked_bytes") or 0) for s in sessions)

    async def wait_change(self, endpoint: str, lease: dict[str, Any],
                          timeout: float | None = None) -> dict[str, Any]:
        """The next state the agent pushes for ``lease`` (a queued one moves or is granted).
        Without a push within ``timeout`` (default: a third of its ttl) it renews, which also
        keeps a queued lease alive, and returns the renewed state."""
        queue = self._pushes.setdefault(str(lease["id"]), asyncio.Queue())
        try:
            return await asyncio.wait_for(queue.get(), timeout or (lease.get("ttl") or 30) / 3)
        except TimeoutError:
            renewed = await self.renew(endpoint, lease["id"], lease["token"])
            return {**renewed, "token": lease["token"]}

    # }}}

    async def close(self) -> None:
        for link in self._links.values():
            link.close()
        self._links.clear()
        for future in self._waiting.values():
            future.cancel()
        self._waiting.clear()
        if self._own_context:
            self._context.term()


class BlockingLeaseClient:
    """LeaseClient's methods, synchronous; see the module docstring."""

    def __init__(self, *, token: str | None = None, on_push: PushCallback | None = None,
                 timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="harp-lease-client",
                                        daemon=True)
        self._thread.start()
        self._client: LeaseClient = self._run(_make(token, on_push, timeout))
        self._closed = False

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def status(self, endpoint: str, timeout: float | None = None) -> dict[str, Any]:
        return self._run(self._client.status(endpoint, timeout))

    def statuses(self, endpoints: list[str],
                 timeout: float | None = None) -> dict[str, dict[str, Any]]:
        return self._run(self._client.statuses(endpoints, timeout))

    def request(self, endpoint: str, kernel_id: str, kernel_secret: str, user: str = "", *,
                ttl: float | None = None, info: dict[str, Any] | None = None) -> dict[str, Any]:
        return self._run(self._client.request(endpoint, kernel_id, kernel_secret, user,
                                              ttl=ttl, info=info))

    def renew(self, endpoint: str, lease_id: str, token: str) -> dict[str, Any]:
        return self._run(self._client.renew(endpoint, lease_id, token))

    def release(self, endpoint: str, lease_id: str, token: str) -> dict[str, Any]:
        return self._run(self._client.release(endpoint, lease_id, token))

    def drop_parked(self, endpoint: str, kernel_id: str, kernel_secret: str) -> dict[str, Any]:
        return self._run(self._client.drop_parked(endpoint, kernel_id, kernel_secret))

    def wait_change(self, endpoint: str, lease: dict[str, Any],
                    timeout: float | None = None) -> dict[str, Any]:
        return self._run(self._client.wait_change(endpoint, lease, timeout))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._run(self._client.close())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(2)


async def _make(token: str | None, on_push: PushCallback | None, timeout: float) -> LeaseClient:
    return LeaseClient(token=token, on_push=on_push, timeout=timeout)
