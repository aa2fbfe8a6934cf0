"""A park waiting for the agent's ``parked`` while a notice about another session arrives on
the same connection, against a real emulated agent and the real shim session.

The agent sends a ``lost`` notice to the connection a session last said hello on; the shim
opens a connection per lease, so a real agent does not put a notice about an earlier session
on the connection of a park in progress at a moment a test can choose. A relay on the control
connection (real ZeroMQ, every message passed on unchanged) adds that notice at the one moment
that matters: after the park is sent, before the agent's answer.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import zmq

from gpu_agent import protocol as P
from tests.shim_sessions import get, put, script_session

pytestmark = pytest.mark.timeout(60)


class NoticeRelay:
    """A ROUTER for clients, a DEALER to the agent per client connection; ahead of each
    ``park`` it passes on, it sends that client ``notice``."""

    def __init__(self, agent: str, notice: dict[str, Any]) -> None:
        self._agent = agent
        self._notice = P.pack_header(notice)
        self.notices_sent = 0
        self._context = zmq.Context()
        self._front = self._context.socket(zmq.ROUTER)
        self._front.setsockopt(zmq.LINGER, 0)
        port = self._front.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self._upstream: dict[bytes, zmq.Socket] = {}
        self._routes: dict[zmq.Socket, bytes] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._front, zmq.POLLIN)
        while not self._stop.is_set():
            for socket, _ in poller.poll(20):
                if socket is self._front:
                    route, *parts = socket.recv_multipart()
                    up = self._upstream.get(route)
                    if up is None:
                        up = self._upstream[route] = self._context.socket(zmq.DEALER)
                        up.setsockopt(zmq.LINGER, 0)
                        up.connect(self._agent)
                        self._routes[up] = route
                        poller.register(up, zmq.POLLIN)
                    if P.unpack_header(parts[0]).get("t") == P.PARK:
                        self._front.send_multipart([route, self._notice])
                        self.notices_sent += 1
                    up.send_multipart(parts)
                else:
                    self._front.send_multipart([self._routes[socket],
                                                *socket.recv_multipart()])
        for socket in (self._front, *self._upstream.values()):
            socket.close(0)
        self._context.term()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


@pytest.fixture
def relay(emulated_agent: Any) -> Iterator[NoticeRelay]:
    notice = {"t": P.LOST, "session": "0123456789abcdef",
              "e": P.error("StateLost", "an earlier session's parked state was dropped")}
    relay = NoticeRelay(emulated_agent.endpoint, notice)
    yield relay
    relay.close()


def test_a_park_ignores_a_lost_notice_about_an_earlier_session(relay: NoticeRelay) -> None:
    data = np.arange(1000, dtype=np.float64)
    with script_session([relay.endpoint]) as (session, _source):
        addr = put(session, data)
        info = session.release()
        assert relay.notices_sent == 1  # the notice came while the park waited
        assert info["bytes"] > 0 and not info.get("already"), info
        assert not session.lost
        assert np.array_equal(get(session, addr, data), data)  # restored, with its data
        assert session.restores == 1
