"""The worker's one receive point: everything it must hear arrives on its data socket.

A worker's hot path is one blocking ``recv_multipart`` on its data ROUTER: a plain blocking
receive wakes the moment a batch arrives, where a receive in time slices (to look at other
sockets in between) or a ``zmq_poll`` over two sockets costs tens of µs per round trip. What else
the worker must hear comes through ``ControlBridge``, a thread that owns

* the supervisor's control DEALER (``open``, ``park``, ``end``; and the worker's own messages to
  the supervisor, which must leave from the thread that owns that socket),
* the data socket's monitor (a client connection that dropped), and
* the supervisor's liveness (a worker must not outlive it),

and sends what it hears into the data ROUTER through an ``inproc`` endpoint that ROUTER also binds.
It connects under a random routing id (``routing_id``), so the worker's loop tells a bridge message
from a client's by the route ZeroMQ put in front of it: a client cannot send under that id (it does
not know it, and the ROUTER refuses a second peer under an id already connected; inproc is not
reachable from outside the process). The bridge's messages into the worker start with one tag
frame:

    ``CONTROL`` + the supervisor's message as it came      ``DROPPED`` + the dropped connection's fd
    ``ORPHANED`` (the supervisor is gone)                   ``HELLO`` (the bridge is connected)

and the worker sends it ``TELL`` + a message for the supervisor, or ``STOP`` (after its last
tell: the bridge forwards what came before it, closes the control socket, lingering so that the
last tell reaches the supervisor, and ends).
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

log = logging.getLogger("harp.agent.worker")

CONTROL, DROPPED, ORPHANED, HELLO, TELL, STOP = b"c", b"d", b"o", b"h", b"t", b"s"

#: how often the bridge looks whether the supervisor is still there (the kernel's parent-death
#: signal ends most orphans at once; this covers one orphaned while the worker was starting)
SUPERVISOR_CHECK_MS = 50
#: how long the bridge may take, at the worker's end, to hand over its last messages
STOP_TIMEOUT_S = 5.0


class ControlBridge:
    """See the module docstring. Made and started by the worker's main thread, which alone uses
    ``data``; the thread alone uses ``control``, ``monitor`` and its inproc DEALER."""

    def __init__(self, context: zmq.Context, data: zmq.Socket, control: zmq.Socket,
                 monitor: zmq.Socket, supervisor_pid: int, *,
                 check_ms: int = SUPERVISOR_CHECK_MS) -> None:
        self.routing_id = b"harp-bridge:" + secrets.token_bytes(16)
        endpoint = f"inproc://harp-worker-bridge-{secrets.token_hex(8)}"
        data.bind(endpoint)
        self._data = data
        self._control = control
        self._monitor = monitor
        self._inner = context.socket(zmq.DEALER)
        self._inner.setsockopt(zmq.ROUTING_ID, self.routing_id)
        self._inner.setsockopt(zmq.LINGER, 0)
        self._inner.connect(endpoint)
        self._supervisor_pid = supervisor_pid
        self._check_ms = check_ms
        # one writer each (the thread counts what it forwarded, the loop what it handled): the
        # loop knows the supervisor waits for it without a lock
        self._forwarded = 0
        self._handled = 0
        self._thread = threading.Thread(target=self._run, name="harp-worker-bridge",
                                        daemon=True)

    # {{{ the worker's side (main thread)

    def start(self, timeout_ms: int = 10_000) -> None:
        """Start the thread and wait for its ``HELLO`` on the data socket (after it, the ROUTER
        knows the bridge's route and a tell cannot be refused as unroutable)."""
        self._thread.start()
        deadline = time.monotonic() + timeout_ms / 1000
        while True:  # nobody knows the data endpoint yet; a stray connection is ignored
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0 or not self._data.poll(left_ms):
                raise RuntimeError("the worker's control bridge did not start")
            parts = self._data.recv_multipart()
            if parts[0] == self.routing_id and parts[1:] == [HELLO]:
                return

    def is_bridge(self, route: bytes) -> bool:
        return route == self.routing_id

    def handled(self) -> None:
        """The loop took a CONTROL or ORPHANED message."""
        self._handled += 1

    def supervisor_waiting(self) -> bool:
        """Whether a message from the supervisor (or of its death) waits for the loop."""
        return self._forwarded > self._handled

    def tell(self, message: bytes) -> None:
        self._data.send_multipart([self.routing_id, TELL, message])

    def stop(self) -> None:
        """After the last tell: the thread forwards what it has and ends."""
        if not self._thread.is_alive():
            return
        try:
            self._data.send_multipart([self.routing_id, STOP])
        except zmq.ZMQError:
            pass
        self._thread.join(STOP_TIMEOUT_S)

    # }}}

    # {{{ the thread

    def _run(self) -> None:
        try:
            self._inner.send(HELLO)
            self._serve()
        except zmq.ContextTerminated:
            pass
        except Exception:
            log.exception("the worker's control bridge failed")
            self._forward([ORPHANED])
        finally:
            self._inner.close()
            self._monitor.close()
            self._control.close()  # lingers: the last tell still reaches the supervisor

    def _serve(self) -> None:
        poller = zmq.Poller()
        for socket in (self._inner, self._control, self._monitor):
            poller.register(socket, zmq.POLLIN)
        orphaned = False
        while True:
            ready = dict(poller.poll(self._check_ms))
            if self._inner in ready:
                parts = self._inner.recv_multipart(copy=False)
                if parts[0].bytes == STOP:
                    return
                self._control.send_multipart(parts[1:], copy=False)
            if self._control in ready:
                self._forward([CONTROL, *self._control.recv_multipart(copy=False)])
            if self._monitor in ready:
                event = recv_monitor_message(self._monitor)
                if event["event"] == zmq.EVENT_DISCONNECTED:
                    self._inner.send_multipart([DROPPED, str(event["value"]).encode()])
            if not orphaned and os.getppid() != self._supervisor_pid:
                orphaned = True
                self._forward([ORPHANED])

    def _forward(self, parts: list[Any]) -> None:
        self._forwarded += 1
        self._inner.send_multipart(parts, copy=False)

    # }}}
