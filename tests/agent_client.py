"""RawClient: the protocol spoken by hand (no shim), to send what the shim never would.

It is its own kernel: ``hello`` first takes a lease (waiting for the grant when the slot is still
draining), then attaches to the session's worker as the shim does; ``batch`` goes to the worker,
``request`` to the supervisor. ``close`` gives the lease back.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from typing import Any

import zmq

from gpu_agent import protocol as P


class RawClient:
    def __init__(self, endpoint: str, *, timeout_ms: int = 10_000,
                 kernel_id: str | None = None) -> None:
        self.endpoint = endpoint
        self.socket = zmq.Context.instance().socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.RCVTIMEO, timeout_ms)
        self.socket.connect(endpoint)
        self.timeout_ms = timeout_ms
        self.data: zmq.Socket | None = None
        self.seq = 0
        self.kernel_id = kernel_id or f"raw-{secrets.token_hex(6)}"
        self.lease: dict | None = None
        self.welcome: dict | None = None
        #: messages the supervisor pushed while a reply was awaited
        self.pushed: list[dict] = []

    def take_lease(self, wait: bool = True, **extra: Any) -> dict:
        reply, _ = self.request({"t": P.LEASE_REQUEST, "rid": 1, "kernel_id": self.kernel_id,
                                 "kernel_secret": "secret", "user": "test", **extra})
        assert reply["t"] == P.LEASE, reply
        self.lease = reply["lease"]
        deadline = time.monotonic() + 20
        while wait and self.lease["state"] == "queued" and time.monotonic() < deadline:
            push = self.next_push(P.LEASE)
            if push["lease"]["id"] == self.lease["id"]:
                self.lease = {**push["lease"], "token": self.lease["token"]}
        return self.lease

    def release(self) -> dict:
        assert self.lease is not None
        reply, _ = self.request({"t": P.LEASE_RELEASE, "rid": 2, "lease_id": self.lease["id"],
                                 "token": self.lease["token"]})
        self.lease = None
        return reply

    def send_raw(self, *frames: bytes) -> dict:
        self.socket.send_multipart(list(frames))
        header, _ = P.decode(self.socket.recv_multipart())
        return header

    def request(self, header: dict, *frames: bytes) -> tuple[dict, list[Any]]:
        """Send to the supervisor and return its answer (pushes that come first are kept)."""
        self.socket.send_multipart(P.encode(header, frames))
        while True:
            reply, got = P.decode(self.socket.recv_multipart())
            if reply.get("rid") is None and reply["t"] in (P.LEASE, P.LOST) and (
                    header.get("rid") is not None or header["t"] == P.HELLO):
                self.pushed.append(reply)
                continue
            return reply, got

    def next_push(self, kind: str) -> dict:
        """The next pushed message of ``kind`` (from those kept, else from the socket)."""
        for i, message in enumerate(self.pushed):
            if message["t"] == kind:
                return self.pushed.pop(i)
        while True:
            reply, _ = P.decode(self.socket.recv_multipart())
            if reply["t"] == kind:
                return reply
            self.pushed.append(reply)

    def hello(self, **extra: Any) -> dict:
        if self.lease is None:
            lease = self.take_lease(token=extra.get("token"))
            assert lease["state"] == "held", f"another client of this test holds the GPU: {lease}"
        reply = self.request({"t": P.HELLO, "v": P.PROTOCOL_VERSION, "client": {},
                              "lease": [self.lease["id"], self.lease["token"]], **extra})[0]
        if reply["t"] == P.WELCOME:
            self.attach(reply)
        return reply

    def attach(self, welcome: dict) -> None:
        if self.data is not None:
            self.data.close(0)
        self.welcome = welcome
        self.data = zmq.Context.instance().socket(zmq.DEALER)
        self.data.setsockopt(zmq.LINGER, 0)
        self.data.setsockopt(zmq.RCVTIMEO, self.timeout_ms)
        self.data.connect(welcome["worker"])
        self.data.send(P.pack_header({"t": P.ATTACH, "session": welcome["session"],
                                      "attach": welcome["attach"]}))
        reply, _ = P.decode(self.data.recv_multipart())
        assert reply["t"] == P.ATTACHED, reply

    def batch(self, *calls: list[Any], frames: tuple[bytes, ...] = ()) -> tuple[dict, list[Any]]:
        self.seq += 1
        header = {"t": P.BATCH, "q": self.seq, "c": list(calls)}
        if self.data is None:
            return self.request(header, *frames)
        self.data.send_multipart(P.encode(header, frames))
        return P.decode(self.data.recv_multipart())

    def status(self, **extra: Any) -> dict:
        return self.request({"t": P.STATUS, "rid": 9, **extra})[0]

    def close(self) -> None:
        if self.lease is not None:
            try:
                self.release()
            except zmq.Again:
                pass
        if self.data is not None:
            self.data.close(0)
        self.socket.close(0)


def wait_for(condition: Callable[[], Any], timeout: float = 20.0, what: str = "") -> Any:
    """``condition()``'s first truthy value, polled until ``timeout`` seconds have passed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what or condition}")


def stored(client: RawClient, data: bytes) -> int:
    """``data`` written at the start of ``client``'s session (one granule allocated); its base."""
    base = client.welcome["range"][0] if client.welcome else client.hello()["range"][0]
    reply, _ = client.batch(["alloc", base, P.GRANULARITY], ["htod", base, data, None])
    assert reply["e"] is None, reply
    return base


def result_bytes(reply: dict, frames: list[Any], index: int = 0) -> bytes:
    """The bytes call ``index`` of a batch produced: inline in the reply when small, else the
    frame it names."""
    value = dict(reply["r"])[index]
    return bytes(frames[value.index - 1]) if isinstance(value, P.FrameRef) else bytes(value)


def read_back(client: RawClient, base: int, n: int) -> bytes:
    reply, frames = client.batch(["dtoh", base, n, None])
    assert reply["e"] is None, reply
    return result_bytes(reply, frames)
