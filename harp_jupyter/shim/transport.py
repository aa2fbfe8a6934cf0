"""AgentConnection: the shim's ZeroMQ DEALER to one GPU agent.

It knows messages, not CUDA: the handshake (hello -> welcome), sending a header with raw frames
(zero-copy for large buffers, with a MessageTracker where the caller must know when a buffer may be
reused), and receiving with a liveness rule, so that a dead agent gives ``GPULostError`` instead
of a hang:

* ZeroMQ heartbeats run between the two ZeroMQ I/O threads, so a busy agent (a long kernel, a
  large compile) still answers them; an agent that is gone or frozen does not, and the connection
  is dropped after ``timeout`` seconds. A killed agent's connection drops at once (TCP reset).
* A socket monitor reports the drop; any drop of an established connection loses the session
  (messages in flight may be lost, and a restarted agent would not know the session), so
  every later send or receive raises ``GPULostError`` naming the endpoint.
* An agent never reached within ``timeout`` seconds also raises ``GPULostError``.
* While a receive waits longer than ``timeout`` with the connection up, the connection sends a
  ``status`` probe (its reply is kept in ``last_status``) and goes on waiting: the agent is alive
  and working.

Not thread-safe: the caller serialises all use (the shim does it with one lock).
"""

from __future__ import annotations

import getpass
import os
import socket as pysocket
import time
from collections.abc import Sequence
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from gpu_agent import multipart, protocol
from harp_jupyter.shim.errors import (
    AuthError,
    Error,
    GPULostError,
    ProtocolError,
    error_from_agent,
)
from provisioner.wire_security import CLIENT_KEY_ENV, SERVER_KEY_ENV, WireKeyError, client_keys

DEFAULT_TIMEOUT_S = 10.0
_POLL_SLICE_MS = 200
_BYE_LINGER_MS = 200


def busy_poll_from_env() -> int:
    """HARP_BUSY_POLL_US in nanoseconds: how long a receive polls before it sleeps (by default
    ``multipart.BUSY_POLL_US`` where the machine has the CPUs for it, else 0)."""
    text = os.environ.get("HARP_BUSY_POLL_US", "")
    try:
        value = int(text) if text else multipart.default_busy_poll_us()
    except ValueError:
        raise ValueError(f"HARP_BUSY_POLL_US must be a whole number of microseconds, not "
                         f"{text!r}") from None
    return min(max(value, 0), multipart.MAX_BUSY_POLL_US) * 1000


def timeout_from_env() -> float:
    text = os.environ.get("HARP_AGENT_TIMEOUT", "")
    try:
        value = float(text) if text else DEFAULT_TIMEOUT_S
    except ValueError:
        raise ValueError(f"HARP_AGENT_TIMEOUT must be a number of seconds, not {text!r}") from None
    return value if value > 0 else DEFAULT_TIMEOUT_S


def client_description() -> dict[str, Any]:
    try:
        user = getpass.getuser()
    except Exception:
        user = None
    info: dict[str, Any] = {"pid": os.getpid(), "host": pysocket.gethostname(), "user": user}
    kernel_id = os.environ.get("HARP_KERNEL_ID")
    if kernel_id:
        info["kernel_id"] = kernel_id
    return info


class AgentConnection:
    """One DEALER connection to the agent at ``endpoint``; see the module docstring."""

    def __init__(self, endpoint: str, *, token: str | None = None,
                 timeout: float | None = None, label: str | None = None) -> None:
        self.endpoint = endpoint
        #: how messages name the peer: a session's worker is named by its agent's endpoint
        self.label = label or endpoint
        self.token = token if token is not None else os.environ.get("HARP_TOKEN")
        self.timeout = timeout if timeout is not None else timeout_from_env()
        self.busy_poll_ns = busy_poll_from_env()
        self.welcome: dict[str, Any] | None = None
        self.last_status: dict[str, Any] | None = None
        self._lost: str | None = None  # why the connection is lost, once it is
        self._established = False
        self._closed = False
        try:
            keys = client_keys()
        except WireKeyError as e:
            raise GPULostError(str(e)) from None
        self._context = zmq.Context(io_threads=1)
        self._socket = self._context.socket(zmq.DEALER)
        heartbeat_ms = max(100, int(self.timeout * 1000))
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.HEARTBEAT_IVL, max(50, heartbeat_ms // 4))
        self._socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, heartbeat_ms)
        if keys is not None:
            keys.apply(self._socket)
        self._monitor = self._socket.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED
            | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)
        self._receive_timeout_ms = -1
        try:
            self._socket.connect(endpoint)
        except zmq.ZMQError as e:
            self.close()
            raise GPULostError(f"cannot connect to the GPU agent at {self.label!r}: {e}") from None

    # {{{ handshake

    def hello(self, *, lease: tuple[str, str] | None = None,
              resume: dict[str, Any] | None = None,
              address_range: tuple[int, int] | None = None) -> dict[str, Any]:
        """Send hello (with the held lease, and the parked session to resume) and wait for
        welcome; returns the welcome header."""
        header: dict[str, Any] = {"t": protocol.HELLO, "v": protocol.PROTOCOL_VERSION,
                                  "token": self.token, "client": client_description()}
        if lease is not None:
            header["lease"] = list(lease)
        if resume is not None:
            header["resume"] = resume
        if address_range is not None:
            header["range"] = list(address_range)
        self.send(header)
        while True:
            reply, _frames = self.recv(connecting=True)
            kind = reply.get("t")
            if kind == protocol.WELCOME:
                self.welcome = reply
                return reply
            if kind == protocol.ERROR:
                error = reply.get("e") if isinstance(reply.get("e"), dict) else {}
                exc = error_from_agent(error, op="hello")
                exc.args = (f"the GPU agent at {self.label} refused this client: "
                            f"{exc.args[0]}" + self._auth_hint(exc),)
                self._lost = "refused at hello"
                raise exc
            # a stray status reply or similar: keep waiting for the welcome

    def attach(self, session: str, attach_token: str) -> None:
        """Open the session on its worker (this connection's endpoint): the first message on a
        worker connection, answered ``attached`` (or an error)."""
        self.send({"t": protocol.ATTACH, "session": session, "attach": attach_token})
        while True:
            reply, _frames = self.recv(connecting=True)
            if reply.get("t") == protocol.ATTACHED:
                self.welcome = reply
                return
            if reply.get("t") == protocol.ERROR:
                error = reply.get("e") if isinstance(reply.get("e"), dict) else {}
                self._lost = "refused at attach"
                raise error_from_agent(error, op="attach")

    def pushed(self, timeout: float) -> dict[str, Any] | None:
        """The next message the agent pushed on this connection within ``timeout`` seconds (a
        ``lost`` notice, say), or None."""
        try:
            header, _frames = self.recv(timeout)
        except (TimeoutError, GPULostError):
            return None
        return header

    def _auth_hint(self, exc: Error) -> str:
        if isinstance(exc, AuthError):
            return "\n  (the token comes from HARP_TOKEN)"
        return ""

    # }}}

    # {{{ send and receive

    def send(self, header: dict[str, Any], frames: Sequence[Any] = (),
             track: bool = False) -> zmq.MessageTracker | None:
        """Send one message. Frames are buffers sent zero-copy; with ``track`` the returned
        tracker is done once ZeroMQ no longer reads any of them."""
        if self._closed or self._lost is not None:
            self._check_usable()
        head = protocol.pack_header(header)
        if not frames:
            self._socket.send(head, copy=True)
            return None
        if not track:
            multipart.send(self._socket, [head, *frames])
            return None
        zframes = [zmq.Frame(f, copy=False, track=True) for f in frames]
        tracker = zmq.MessageTracker(*(f.tracker for f in zframes))
        self._socket.send_multipart([head, *zframes], copy=False)
        # The tracker completes only when our Frame objects are gone as well.
        del zframes
        return tracker

    def recv(self, timeout: float | None = None, *, connecting: bool = False
             ) -> tuple[dict[str, Any], list[zmq.Frame]]:
        """The next message ``(header, frames)``.

        With ``timeout`` (seconds) raise ``TimeoutError`` when nothing came; without it wait as
        long as the agent is alive (see the module docstring)."""
        if self._closed:
            raise GPULostError(f"the connection to the GPU agent at {self.label} is closed")
        if self.busy_poll_ns and not connecting:
            multipart.busy_poll(self._socket, self.busy_poll_ns)
        start = last_heard = time.monotonic()
        while True:
            now = time.monotonic()
            if self._lost is not None:
                wait_ms = 0  # a reply that arrived before the link died is still delivered
            elif timeout is not None:
                wait_ms = max(0, min(_POLL_SLICE_MS, int((start + timeout - now) * 1000)))
            else:
                wait_ms = _POLL_SLICE_MS
            # A blocking receive with a time limit wakes fastest when the reply comes (no
            # zmq_poll); the link's state is looked at between the slices.
            if wait_ms != self._receive_timeout_ms:
                self._socket.setsockopt(zmq.RCVTIMEO, wait_ms)
                self._receive_timeout_ms = wait_ms
            try:
                parts: list[zmq.Frame] | None = multipart.receive(self._socket)
            except zmq.Again:
                parts = None
            if parts is not None:
                try:
                    header, frames = protocol.unpack_header(parts[0].buffer), parts[1:]
                except protocol.ProtocolError as e:
                    raise ProtocolError(
                        f"the agent at {self.label} sent an undecodable message: {e}") from None
                if header.get("t") == protocol.STATUS:
                    self.last_status = header
                    if not connecting:
                        last_heard = time.monotonic()
                        continue
                return header, frames
            self._read_monitor()
            self._check_usable()
            now = time.monotonic()
            if not self._established and now - start > self.timeout:
                self._lost = "unreachable"
                raise GPULostError(
                    f"no answer from the GPU agent at {self.label} within {self.timeout:g} s."
                    " Is harp-agent running there and reachable from this machine? (The endpoint"
                    " comes from HARP_AGENTS or `harp run --agents`; HARP_AGENT_TIMEOUT sets the"
                    " wait.)")
            if timeout is not None and now - start >= timeout:
                raise TimeoutError
            if self._established and now - last_heard > self.timeout:
                self._probe()
                last_heard = now

    def poll_alive(self) -> None:
        """Read pending monitor events without blocking; raise GPULostError if the link died."""
        self._check_usable()
        self._read_monitor()
        self._check_usable()

    def has_message(self) -> bool:
        """Whether a message can be received without waiting."""
        if self._socket.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            return True
        self.poll_alive()
        return False

    def _probe(self) -> None:
        try:
            self._socket.send(protocol.pack_header({"t": protocol.STATUS}), zmq.NOBLOCK)
        except zmq.Again:
            pass

    def _read_monitor(self) -> None:
        while self._monitor.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            event = recv_monitor_message(self._monitor)["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                if self._established and self._lost is None:
                    # reconnected after a drop we did not see: the session is gone anyway
                    self._lost = "reconnected"
                self._established = True
            elif event == zmq.EVENT_DISCONNECTED and self._established:
                self._lost = self._lost or "disconnected"
            elif event in (zmq.EVENT_HANDSHAKE_FAILED_AUTH,
                           zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL):
                self._lost = "refused" if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH else \
                    "no CurveZMQ handshake"

    def _check_usable(self) -> None:
        if self._closed:
            raise GPULostError(f"the connection to the GPU agent at {self.label} is closed")
        if self._lost is not None:
            raise GPULostError(self.lost_message())

    def lost_message(self) -> str:
        if self._lost == "refused":
            return (f"the GPU agent at {self.label} refused this client's CurveZMQ key: ask its "
                    f"operator to add the public half of {CLIENT_KEY_ENV} to the agent's "
                    "--curve-client-keys-dir")
        if self._lost == "no CurveZMQ handshake":
            return (f"the CurveZMQ handshake with the GPU agent at {self.label} failed: the "
                    f"agent's key is not the one in {SERVER_KEY_ENV}, or one side encrypts and "
                    "the other does not")
        return (f"lost the GPU agent at {self.label} ({self._lost}): the GPU state of this"
                " session (device memory, modules, streams) is gone. The process and its CPU"
                " state are intact; the next GPU call starts a new session, so recreate device"
                " objects. Check that harp-agent is still running there.")

    # }}}

    @property
    def lost(self) -> bool:
        return self._lost is not None

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self, *, bye: bool = False) -> None:
        """Close the socket (linger 0); with ``bye``, first try briefly to end the session."""
        if self._closed:
            return
        linger = 0
        # a short script may end before the handshake event was read: the welcome proves it
        if bye and (self._established or self.welcome is not None) and self._lost is None:
            try:
                self._socket.send(protocol.pack_header({"t": protocol.BYE, "token": self.token}),
                                  zmq.NOBLOCK)
                linger = _BYE_LINGER_MS
            except zmq.ZMQError:
                pass
        self._closed = True
        try:
            self._socket.disable_monitor()
        except zmq.ZMQError:
            pass
        self._monitor.close(linger=0)
        self._socket.close(linger=linger)
        self._context.term()
