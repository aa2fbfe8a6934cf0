"""Raw pyzmq baseline: bulk frames over TCP loopback, DEALER to ROUTER, zero-copy both ways.

``python bench/raw_zmq.py OUT.json`` starts its own ROUTER process and measures what plain pyzmq
moves per second at the sizes of ``workloads.COPY_SIZES`` (4 KiB to 256 MiB), in each direction,
and a small request/reply round trip (p50, p99).
"""

from __future__ import annotations

import json
import multiprocessing
import sys
import time
from typing import Any

import numpy as np
import zmq
from workloads import COPY_SIZES, copy_key, run_times


def serve(ports: Any) -> None:
    socket = zmq.Context.instance().socket(zmq.ROUTER)
    ports.put(socket.bind_to_random_port("tcp://127.0.0.1"))
    blobs = {nbytes: np.ones(nbytes, np.uint8) for nbytes, _reps in COPY_SIZES}
    while True:
        ident, command, *_payload = socket.recv_multipart(copy=False)
        kind = command.bytes
        if kind == b"stop":
            socket.send_multipart([ident, b"ok"])
            return
        if kind.startswith(b"get"):
            socket.send_multipart([ident, blobs[int(kind[3:])]], copy=False)
        else:  # put or ping: acknowledge after the frame arrived
            socket.send_multipart([ident, b"ok"])


# {{{ the server in a process of its own, and its operations (other benchmarks use them too)

def start_server() -> tuple[multiprocessing.Process, zmq.Socket]:
    """The ROUTER process and a DEALER connected to it (the connection up: one ping answered)."""
    ports: Any = multiprocessing.Queue()
    server = multiprocessing.Process(target=serve, args=(ports,), daemon=True)
    server.start()
    socket = zmq.Context.instance().socket(zmq.DEALER)
    socket.connect(f"tcp://127.0.0.1:{ports.get(timeout=30)}")
    round_trip(socket)
    return server, socket


def round_trip(socket: zmq.Socket) -> None:
    socket.send(b"ping")
    socket.recv()


def put(socket: zmq.Socket, data: Any) -> None:
    """``data`` to the server, zero-copy, and its answer once the frame arrived."""
    socket.send_multipart([b"put", data], copy=False)
    socket.recv()


def get(socket: zmq.Socket, nbytes: int) -> None:
    """``nbytes`` from the server (one of ``COPY_SIZES``), received zero-copy."""
    socket.send(b"get%d" % nbytes)
    socket.recv(copy=False)


def stop_server(server: multiprocessing.Process, socket: zmq.Socket) -> None:
    socket.send(b"stop")
    socket.recv()
    server.join(5)
    socket.close(0)

# }}}


def main() -> None:
    server, socket = start_server()
    results: dict[str, float] = {}
    samples = []
    for _ in range(3000):
        start = time.perf_counter()
        socket.send(b"ping")
        socket.recv()
        samples.append((time.perf_counter() - start) * 1e6)
    results["rtt_p50_us"] = float(np.percentile(samples[200:], 50))
    results["rtt_p99_us"] = float(np.percentile(samples[200:], 99))
    for nbytes, reps in COPY_SIZES:
        data = np.ones(nbytes, np.uint8)
        for name, once in (("h2d", lambda d=data: put(socket, d)),
                           ("d2h", lambda n=nbytes: get(socket, n))):
            times = run_times(once, reps)
            results[copy_key(name, nbytes)] = data.nbytes / min(times) / 1e9
    stop_server(server, socket)
    with open(sys.argv[1], "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
