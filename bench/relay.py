"""A TCP relay that adds a fixed one-way delay in each direction: a stand-in for a network.

    python bench/relay.py --delay-us 250 --forward 127.0.0.1:5600=127.0.0.2:5600 [--forward ...]

Each ``--forward LISTEN=TARGET`` listens on LISTEN and connects every accepted connection to
TARGET. Every chunk read from one side is stamped with the time it arrived and written to the
other side no earlier than ``arrival + delay``, in arrival order: the delay is per chunk, not a
pause of the whole stream, so a stream of back-to-back messages is delayed once, like a link
with that latency (and no bandwidth limit of its own). One thread per direction of each
connection reads, stamps and writes; with nothing waiting it blocks in ``recv``, otherwise it
sleeps in ``select`` until the next chunk is due and spins (yielding the GIL) for the last
``--spin-us`` of the wait, with the thread's timer slack
set to 1 ns so that sub-millisecond delays are kept. At most ``--max-pending`` bytes wait in
one direction; past it that side is not read (TCP back-pressure) until chunks go out.

The CLI prints ``relay: ready`` once every listener is bound, runs until its stdin closes, then
prints one JSON line of what each forward carried (connections, bytes each way).
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import json
import os
import select
import selectors
import socket
import sys
import threading
import time
from dataclasses import dataclass, field

#: the largest chunk one read takes
CHUNK_BYTES = 1 << 20
_PR_SET_TIMERSLACK = 29


def _precise_timer_slack() -> None:
    """Make this thread's sleeps end when asked (Linux rounds them up by 50 µs by default)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_TIMERSLACK, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass


@dataclass
class ForwardStats:
    """What one forward (one listening address) carried, all connections together."""

    listen: str
    target: str
    connections: int = 0
    bytes_to_target: int = 0
    bytes_from_target: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def as_dict(self) -> dict[str, object]:
        return {"listen": self.listen, "target": self.target, "connections": self.connections,
                "bytes_to_target": self.bytes_to_target,
                "bytes_from_target": self.bytes_from_target}


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


class DelayRelay:
    """Forwards connections from each listen address to its target, delaying every chunk by
    ``one_way_delay_s`` in each direction (see the module docstring)."""

    def __init__(self, forwards: list[tuple[tuple[str, int], tuple[str, int]]],
                 one_way_delay_s: float, *, spin_s: float = 100e-6,
                 max_pending_bytes: int = 64 << 20) -> None:
        if one_way_delay_s < 0:
            raise ValueError("the delay cannot be negative")
        self.one_way_delay_s = one_way_delay_s
        self.spin_s = spin_s
        self.max_pending_bytes = max_pending_bytes
        self._selector = selectors.DefaultSelector()
        self._listeners: list[socket.socket] = []
        self.stats: list[ForwardStats] = []
        self._closing = threading.Event()
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        for listen, target in forwards:
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(listen)
            listener.listen(64)
            bound = listener.getsockname()
            stats = ForwardStats(f"{bound[0]}:{bound[1]}", f"{target[0]}:{target[1]}")
            self._listeners.append(listener)
            self.stats.append(stats)
            self._selector.register(listener, selectors.EVENT_READ, (target, stats))
        self._acceptor = threading.Thread(target=self._accept_loop, name="relay-accept",
                                          daemon=True)

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """The bound listen addresses, in the order given (port 0 resolved)."""
        return [listener.getsockname() for listener in self._listeners]

    def start(self) -> DelayRelay:
        self._acceptor.start()
        return self

    def close(self) -> None:
        self._closing.set()
        self._acceptor.join(2)
        for listener in self._listeners:
            listener.close()
        with self._connections_lock:
            for connection in list(self._connections):
                try:
                    connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                connection.close()
            self._connections.clear()
        self._selector.close()

    def __enter__(self) -> DelayRelay:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _accept_loop(self) -> None:
        while not self._closing.is_set():
            for key, _events in self._selector.select(timeout=0.1):
                listener: socket.socket = key.fileobj  # type: ignore[assignment]
                target, stats = key.data
                try:
                    client, _ = listener.accept()
                except OSError:
                    continue
                try:
                    upstream = socket.create_connection(target, timeout=5)
                except OSError:
                    client.close()
                    continue
                upstream.settimeout(None)
                for sock in (client, upstream):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                with stats.lock:
                    stats.connections += 1
                with self._connections_lock:
                    self._connections.update((client, upstream))
                done = [0]
                for source, sink, to_target in ((client, upstream, True),
                                                (upstream, client, False)):
                    threading.Thread(target=self._pump, args=(source, sink, stats, to_target,
                                                              done),
                                     name="relay-pump", daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, stats: ForwardStats,
              to_target: bool, done: list[int]) -> None:
        """Read ``source``, write each chunk to ``sink`` once it is due, in order."""
        _precise_timer_slack()
        delay, spin = self.one_way_delay_s, self.spin_s
        pending: collections.deque[tuple[float, bytes]] = collections.deque()
        pending_bytes = 0
        source_open = True
        try:
            while source_open or pending:
                now = time.perf_counter()
                while pending and pending[0][0] <= now:  # everything due goes out, in order
                    _due, chunk = pending.popleft()
                    pending_bytes -= len(chunk)
                    sink.sendall(chunk)
                    now = time.perf_counter()
                if not source_open and not pending:
                    break
                wait = pending[0][0] - now if pending else None
                if wait is not None and wait <= spin:
                    while time.perf_counter() < pending[0][0]:
                        os.sched_yield()  # releases the GIL: the other pumps keep going
                    continue
                readable = source_open and pending_bytes < self.max_pending_bytes
                if wait is not None:  # something is waiting: read only until it is due
                    ready, _, _ = select.select([source] if readable else [], [], [],
                                                wait - spin)
                    if not ready:
                        continue
                # nothing waiting: a plain blocking read (one system call, not select + recv)
                chunk = source.recv(CHUNK_BYTES)
                if not chunk:
                    source_open = False
                    continue
                pending.append((time.perf_counter() + delay, chunk))
                pending_bytes += len(chunk)
                with stats.lock:
                    if to_target:
                        stats.bytes_to_target += len(chunk)
                    else:
                        stats.bytes_from_target += len(chunk)
            sink.shutdown(socket.SHUT_WR)  # pass the half-close on, after the last chunk
        except OSError:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        finally:
            with stats.lock:
                done[0] += 1
                both_done = done[0] == 2
            if both_done:
                with self._connections_lock:
                    for sock in (source, sink):
                        self._connections.discard(sock)
                        sock.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delay-us", type=float, required=True,
                        help="one-way delay added in each direction, microseconds")
    parser.add_argument("--forward", action="append", required=True, metavar="LISTEN=TARGET",
                        help="HOST:PORT=HOST:PORT (repeat for each port)")
    parser.add_argument("--spin-us", type=float, default=100.0,
                        help="spin (yielding) for this last part of each wait instead of sleeping")
    parser.add_argument("--max-pending", type=int, default=64 << 20,
                        help="bytes that may wait in one direction before reading pauses")
    args = parser.parse_args()
    forwards = []
    for spec in args.forward:
        listen, _, target = spec.partition("=")
        forwards.append((_address(listen), _address(target)))
    relay = DelayRelay(forwards, args.delay_us * 1e-6, spin_s=args.spin_us * 1e-6,
                       max_pending_bytes=args.max_pending)
    with relay:
        print("relay: ready", flush=True)
        sys.stdin.read()  # until the driver closes our stdin
    print(json.dumps([s.as_dict() for s in relay.stats]), flush=True)


if __name__ == "__main__":
    main()
