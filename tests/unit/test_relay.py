"""bench/relay.py keeps the byte order and delays every chunk by at least the configured delay.

Only lower bounds on time are asserted: how much later than that a chunk arrives depends on the
machine's load and is never checked."""

from __future__ import annotations

import importlib.util
import socket
import sys
import threading
import time
from pathlib import Path
from types import ModuleType

import pytest

RELAY_PATH = Path(__file__).resolve().parents[2] / "bench" / "relay.py"


@pytest.fixture(scope="module")
def relay_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_relay", RELAY_PATH)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_relay"] = module
    spec.loader.exec_module(module)
    return module


class EchoServer:
    """Echoes every byte back and notes when each piece arrived."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = self.listener.getsockname()
        self.received = bytearray()
        self.arrivals: list[float] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        connection, _ = self.listener.accept()
        with connection:
            while data := connection.recv(65536):
                self.arrivals.append(time.perf_counter())
                self.received += data
                connection.sendall(data)

    def close(self) -> None:
        self.listener.close()


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    parts = bytearray()
    while len(parts) < size:
        data = sock.recv(size - len(parts))
        assert data, "connection closed early"
        parts += data
    return bytes(parts)


@pytest.mark.parametrize("delay_s", [0.0, 0.02])
def test_relay_keeps_order_and_delays_each_way(relay_module: ModuleType, delay_s: float) -> None:
    server = EchoServer()
    relay = relay_module.DelayRelay([(("127.0.0.1", 0), server.address)], delay_s)
    with relay:
        client = socket.create_connection(relay.addresses[0], timeout=10)
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        messages = [f"message {i:04d};".encode() * (1 + i % 7) for i in range(200)]
        sent_at = time.perf_counter()
        for i, message in enumerate(messages):  # in bursts, so chunks overlap in the relay
            client.sendall(message)
            if i % 50 == 49:
                time.sleep(0.005)
        expected = b"".join(messages)
        echoed = _recv_exactly(client, len(expected))
        round_trip_s = time.perf_counter() - sent_at
        client.close()
    server.close()
    assert echoed == expected  # order kept both ways, nothing lost or duplicated
    assert bytes(server.received) == expected
    assert server.arrivals[0] - sent_at >= delay_s  # one way: at least the delay
    assert round_trip_s >= 2 * delay_s  # there and back: at least twice the delay
    assert relay.stats[0].connections == 1
    assert relay.stats[0].bytes_to_target == len(expected)
    assert relay.stats[0].bytes_from_target == len(expected)


def test_relay_delays_a_single_round_trip(relay_module: ModuleType) -> None:
    server = EchoServer()
    delay_s = 0.01
    with relay_module.DelayRelay([(("127.0.0.1", 0), server.address)], delay_s) as relay:
        client = socket.create_connection(relay.addresses[0], timeout=10)
        for _ in range(5):  # how long it takes is the benchmark's to measure, not a test's
            client.sendall(b"ping")
            assert _recv_exactly(client, 4) == b"ping"
        client.close()
    server.close()


def test_relay_refuses_a_negative_delay(relay_module: ModuleType) -> None:
    with pytest.raises(ValueError):
        relay_module.DelayRelay([], -1.0)
