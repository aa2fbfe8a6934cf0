"""The worker's control bridge (gpu_agent.worker_bridge) with real ZeroMQ sockets: what the
supervisor, the monitor and the supervisor's death say reaches the data socket under the bridge's
route, the worker's tells reach the supervisor (also the last ones before it stops), and a client
cannot speak under the bridge's route."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager

import zmq

from gpu_agent.worker_bridge import CONTROL, DROPPED, ORPHANED, ControlBridge

DEADLINE_MS = 10_000


@contextmanager
def bridged(supervisor_pid: int | None = None
            ) -> Iterator[tuple[ControlBridge, zmq.Socket, zmq.Socket, str]]:
    """(bridge, the worker's data ROUTER, the supervisor's ROUTER, the data tcp endpoint)."""
    context = zmq.Context()
    supervisor = context.socket(zmq.ROUTER)
    supervisor.setsockopt(zmq.LINGER, 0)
    control_endpoint = f"inproc://supervisor-{secrets.token_hex(4)}"
    supervisor.bind(control_endpoint)
    control = context.socket(zmq.DEALER)
    control.setsockopt(zmq.IDENTITY, b"w1")
    control.setsockopt(zmq.LINGER, 2000)
    control.connect(control_endpoint)
    data = context.socket(zmq.ROUTER)
    data.setsockopt(zmq.LINGER, 0)
    data.setsockopt(zmq.ROUTER_MANDATORY, 1)
    port = data.bind_to_random_port("tcp://127.0.0.1")
    bridge = ControlBridge(context, data, control,
                           data.get_monitor_socket(zmq.EVENT_DISCONNECTED),
                           os.getppid() if supervisor_pid is None else supervisor_pid)
    bridge.start()
    try:
        yield bridge, data, supervisor, f"tcp://127.0.0.1:{port}"
    finally:
        bridge.stop()
        data.close()
        supervisor.close()
        context.term()


def receive(socket: zmq.Socket) -> list[bytes]:
    assert socket.poll(DEADLINE_MS), "nothing arrived"
    return socket.recv_multipart()


def test_the_supervisors_messages_reach_the_data_socket_under_the_bridges_route() -> None:
    with bridged() as (bridge, data, supervisor, _endpoint):
        supervisor.send_multipart([b"w1", b"open-header", b"frame"])
        route, *parts = receive(data)
        assert bridge.is_bridge(route)
        assert parts == [CONTROL, b"open-header", b"frame"]
        assert bridge.supervisor_waiting()
        bridge.handled()
        assert not bridge.supervisor_waiting()


def test_tells_reach_the_supervisor_up_to_the_last_one_before_stop() -> None:
    with bridged() as (bridge, _data, supervisor, _endpoint):
        for i in range(50):
            bridge.tell(b"tell %d" % i)
        bridge.stop()
        got = [receive(supervisor) for _ in range(50)]
        assert got == [[b"w1", b"tell %d" % i] for i in range(50)]


def test_a_dropped_client_connection_is_reported_with_its_fd() -> None:
    with bridged() as (bridge, data, _supervisor, endpoint):
        client = data.context.socket(zmq.DEALER)
        client.setsockopt(zmq.LINGER, 0)
        client.connect(endpoint)
        client.send(b"hello")
        message = data.recv_multipart(copy=False)
        fd = message[0].get(zmq.SRCFD)
        client.close()
        route, *parts = receive(data)
        assert bridge.is_bridge(route)
        assert parts == [DROPPED, str(fd).encode()]


def test_the_supervisors_death_is_reported_once() -> None:
    with bridged(supervisor_pid=os.getppid() + 1_000_000) as (bridge, data, _supervisor, _e):
        route, *parts = receive(data)
        assert bridge.is_bridge(route) and parts == [ORPHANED]
        assert bridge.supervisor_waiting()


def test_a_client_cannot_speak_under_the_bridges_route() -> None:
    with bridged() as (bridge, data, _supervisor, endpoint):
        forger = data.context.socket(zmq.DEALER)
        forger.setsockopt(zmq.LINGER, 0)
        forger.setsockopt(zmq.ROUTING_ID, bridge.routing_id)
        forger.connect(endpoint)
        forger.send_multipart([CONTROL, b"end"])
        honest = data.context.socket(zmq.DEALER)
        honest.setsockopt(zmq.LINGER, 0)
        honest.connect(endpoint)
        honest.send(b"batch")
        received = []
        while not received or received[-1][1:] != [b"batch"]:
            received.append(receive(data))
        # a bounded look for anything more: the forged message is never delivered
        while data.poll(300):
            received.append(data.recv_multipart())
        assert all(not bridge.is_bridge(message[0]) for message in received)
        forger.close()
        honest.close()
