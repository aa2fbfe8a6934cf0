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


def main() -> None:
    ports: Any = multiprocessing.Queue()
    server = multiprocessing.Process(target=serve, args=(ports,), daemon=True)
    server.start()
    socket = zmq.Context.instance().socket(zmq.DEALER)
    socket.connect(f"tcp://127.0.0.1:{ports.get(timeout=30)}")
    socket.send(b"ping")  # the connection is up once the first answer came
    socket.recv()
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
        for name, once in (
            ("h2d", lambda d=data: (socket.send_multipart([b"put", d], copy=False),
                                    socket.recv())),
            ("d2h", lambda n=nbytes: (socket.send(b"get%d" % n), socket.recv(copy=False))),
        ):
            times = run_times(once, reps)
            results[copy_key(name, nbytes)] = data.nbytes / min(times) / 1e9
    socket.send(b"stop")
    socket.recv()
    server.join(5)
    with open(sys.argv[1], "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
