"""The control socket between a kernel and its provisioner (docs/leases-design.md).

One ZeroMQ ROUTER per kernel, bound on loopback, with a random key the kernel gets in its
environment. Why a key on a loopback socket: every local user can connect to 127.0.0.1, and this
socket hands out GPU leases. A message with a wrong key gets an ``error`` and changes nothing; the
server keeps serving.

Requests from the kernel are dispatched to async handlers, each in its own task (an ``acquire``
may wait in a queue for minutes while ``status`` must still answer). The server also asks the
kernel things (``park``) and awaits the answer by ``rid``; its rids are strings, the kernel's are
numbers, so the two never mix up.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import zmq
import zmq.asyncio

from gpu_agent import protocol as P

log = logging.getLogger("harp.provisioner.control")


class ControlError(Exception):
    """A request the provisioner answers with an ``error`` {kind, msg} (the kernel raises it)."""

    def __init__(self, kind: str, msg: str) -> None:
        super().__init__(msg)
        self.kind, self.msg = kind, msg


class KernelNotConnected(Exception):
    """The kernel has not talked to this control socket yet, so nothing can be sent to it."""


class ControlRequest:
    """One request from the kernel: its header, and a way to send interim messages
    (``acquire_progress``) before the handler's final answer."""

    def __init__(self, server: ControlServer, routing_id: bytes, header: dict[str, Any]) -> None:
        self.server, self.routing_id, self.header = server, routing_id, header
        self.rid = header.get("rid")

    async def send(self, header: dict[str, Any]) -> None:
        await self.server._send(self.routing_id, {**header, "rid": self.rid})


#: handler(request) -> final reply header (``rid`` added), or None for no reply (``bye``)
Handler = Callable[[ControlRequest], Awaitable[dict[str, Any] | None]]


class ControlServer:
    def __init__(self, handlers: Mapping[str, Handler], *,
                 context: zmq.asyncio.Context | None = None) -> None:
        self.handlers = dict(handlers)
        self._context = context or zmq.asyncio.Context.instance()
        self._socket: zmq.asyncio.Socket | None = None
        self._reader: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._asks: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._ask_ids = itertools.count(1)
        #: the kernel's DEALER: where pushes go (the last sender with the right key)
        self._kernel: bytes | None = None
        #: (sender, rid) of recent requests -> final reply, or None while it is being handled.
        #: The kernel resends a request it heard nothing about (a message sent while a restarted
        #: server was reconnecting is lost by ZeroMQ); this makes each request run once.
        self._answers: OrderedDict[tuple[bytes, Any], dict[str, Any] | None] = OrderedDict()
        self.endpoint: str | None = None
        self.key: str = ""

    @property
    def port(self) -> int | None:
        return int(self.endpoint.rsplit(":", 1)[1]) if self.endpoint else None

    @property
    def kernel_connected(self) -> bool:
        return self._kernel is not None

    async def start(self, port: int | None = None, key: str | None = None) -> str:
        """Bind and serve; returns the endpoint. ``port`` and ``key`` re-create the socket a
        running kernel already knows (a restarted jupyter_server taking its kernels back)."""
        if self._socket is not None:
            raise RuntimeError("the control server is already started")
        self.key = key or secrets.token_urlsafe(24)
        socket = self._context.socket(zmq.ROUTER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.ROUTER_MANDATORY, 1)  # an unknown peer is an error, not a drop
        try:
            if port:
                await _bind_again(socket, f"tcp://127.0.0.1:{port}")
            else:
                port = socket.bind_to_random_port("tcp://127.0.0.1")
        except zmq.ZMQError:
            socket.close(0)
            raise
        self._socket = socket
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self._reader = asyncio.ensure_future(self._read())
        return self.endpoint

    async def close(self) -> None:
        """Stop serving; idempotent. Pending asks and handlers are cancelled."""
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.cancel()
        for task in list(self._tasks):
            task.cancel()
        for future in self._asks.values():
            future.cancel()
        self._asks.clear()
        self._answers.clear()
        socket, self._socket = self._socket, None
        if socket is not None:
            socket.close(0)
        self._kernel = None

    # {{{ to the kernel

    async def push(self, header: dict[str, Any]) -> None:
        """Send a message to the kernel, expecting no answer."""
        if self._kernel is None:
            raise KernelNotConnected("the kernel has not connected to its control socket")
        await self._send(self._kernel, header)

    def push_soon(self, header: dict[str, Any]) -> None:
        """``push`` from synchronous code on the server's loop (a keeper's callback); a kernel
        that is not connected is not told."""
        if self._kernel is None:
            return
        task = asyncio.ensure_future(self.push(header))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def ask(self, header: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Send ``header`` to the kernel and return its answer (same rid); TimeoutError when it
        does not answer within ``timeout`` s, KernelNotConnected when it never connected."""
        if self._kernel is None:
            raise KernelNotConnected("the kernel has not connected to its control socket")
        rid = f"p{next(self._ask_ids)}"
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._asks[rid] = future
        try:
            await self._send(self._kernel, {**header, "rid": rid})
            return await asyncio.wait_for(future, timeout)
        finally:
            self._asks.pop(rid, None)

    # }}}

    async def _send(self, routing_id: bytes, header: dict[str, Any]) -> None:
        socket = self._socket
        if socket is None:
            return
        try:
            await socket.send_multipart([routing_id, P.pack_header(header)])
        except zmq.ZMQError as e:  # the kernel went away (EHOSTUNREACH); nobody to tell
            log.debug("control: could not send %s: %s", header.get("t"), e)

    async def _read(self) -> None:
        assert self._socket is not None
        while True:
            parts = await self._socket.recv_multipart()
            if len(parts) < 2:
                continue
            routing_id = parts[0]
            try:
                header = P.unpack_header(parts[1])
            except P.ProtocolError as e:
                await self._send(routing_id, _error(None, "ProtocolError", str(e)))
                continue
            rid = header.get("rid")
            given = header.get("key")
            if not (isinstance(given, str) and secrets.compare_digest(given, self.key)):
                await self._send(routing_id, _error(
                    rid, "AuthError", "wrong or missing control key (HARP_CONTROL_KEY)"))
                continue
            self._kernel = routing_id
            future = self._asks.get(rid) if isinstance(rid, str) else None
            if future is not None:
                if not future.done():
                    future.set_result(header)
                continue
            if rid is not None:
                seen = (routing_id, rid)
                if seen in self._answers:
                    answer = self._answers[seen]
                    if answer is not None:
                        await self._send(routing_id, answer)
                    continue
                self._answers[seen] = None
                while len(self._answers) > _REMEMBERED_ANSWERS:
                    self._answers.popitem(last=False)
            task = asyncio.ensure_future(self._dispatch(routing_id, header))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _dispatch(self, routing_id: bytes, header: dict[str, Any]) -> None:
        request = ControlRequest(self, routing_id, header)
        handler = self.handlers.get(header["t"])
        try:
            if handler is None:
                raise ControlError("ProtocolError", f"unknown control message {header['t']!r}")
            reply = await handler(request)
        except ControlError as e:
            reply = _error(request.rid, e.kind, e.msg)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bug in a handler must not leave the kernel waiting forever
            log.exception("control: handling %s failed", header["t"])
            reply = _error(request.rid, "RuntimeError",
                           f"the provisioner failed on {header['t']}: {type(e).__name__}: {e}")
        if reply is not None:
            reply = {**reply, "rid": request.rid}
            if (routing_id, request.rid) in self._answers:
                self._answers[(routing_id, request.rid)] = reply
            await self._send(routing_id, reply)


_REMEMBERED_ANSWERS = 256


def _error(rid: Any, kind: str, msg: str) -> dict[str, Any]:
    return {"t": "error", "rid": rid, "e": {"kind": kind, "msg": msg}}


async def _bind_again(socket: zmq.asyncio.Socket, endpoint: str, patience: float = 5.0) -> None:
    """Bind to a port a previous socket had: ZeroMQ closes sockets in its I/O thread, so the
    port may still be taken for a moment after the previous owner closed it."""
    deadline = asyncio.get_running_loop().time() + patience
    while True:
        try:
            socket.bind(endpoint)
            return
        except zmq.ZMQError as e:
            if e.errno != zmq.EADDRINUSE or asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.05)
