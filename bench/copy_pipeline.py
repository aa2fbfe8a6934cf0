"""What a forwarded copy can reach, without the shim: raw pyzmq plus the device copy, whole or in
pieces, and frames copied or zero-copy. The figures behind the shim's choices (its pieces and
its copy bound), measured in one run.

    python bench/copy_pipeline.py [--emulated] [--out FILE]

A server process (pycuda on the GPU; ``--emulated``: NumPy copies into host memory, for a smoke
run) answers a client over TCP loopback:

- host->device: ``put`` messages, the server copying each into device memory before it answers
  (the worker's ``htod``); whole, or in 2-16 pieces sent back to back, so that the server copies
  one while the next is on the wire;
- device->host: ``get`` messages, the server copying device memory into page-locked memory and
  sending it zero-copy, the client copying what arrives into its array (``dtoh_into``); whole or
  in pieces asked for back to back;
- raw pyzmq's own put and get alongside (no device copy, no copy out), the reference the shim's
  targets are ratios to;
- one frame each way copied into ZeroMQ's message or zero-copy, 16 KiB-1 MiB (``multipart``'s
  copy bound).

Each figure is the best of its repetitions (the round trips' p50 for the frame table).
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
from pathlib import Path
from typing import Any

import numpy as np
import zmq

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from forwarding import report  # noqa: E402
from workloads import run_times, size_label  # noqa: E402

SIZES = (64 << 10, 1 << 20, 4 << 20, 16 << 20)
PIECES = (2, 4, 8, 16)
FRAME_SIZES = (16 << 10, 64 << 10, 128 << 10, 256 << 10, 512 << 10, 1 << 20)
STAGING = 4  # page-locked buffers the server rotates through (pieces in flight)


def serve(ports: Any, emulated: bool) -> None:
    if emulated:
        device = np.zeros(max(SIZES), np.uint8)
        name = "emulated (NumPy copies in host memory)"

        def htod(offset: int, data: memoryview) -> None:
            device[offset:offset + len(data)] = np.frombuffer(data, np.uint8)

        def dtoh(out: np.ndarray, offset: int) -> None:
            out[:] = device[offset:offset + len(out)]

        def pinned(nbytes: int) -> np.ndarray:
            return np.empty(nbytes, np.uint8)
    else:
        import pycuda.autoinit  # noqa: F401
        import pycuda.driver as cuda

        base = cuda.mem_alloc(max(SIZES))
        name = cuda.Device(0).name()

        def htod(offset: int, data: memoryview) -> None:
            cuda.memcpy_htod(int(base) + offset, data)

        def dtoh(out: np.ndarray, offset: int) -> None:
            cuda.memcpy_dtoh(out, int(base) + offset)

        def pinned(nbytes: int) -> np.ndarray:
            return cuda.pagelocked_empty(nbytes, np.uint8)
    buffers = [pinned(max(SIZES)) for _ in range(STAGING)]
    blobs = {n: np.ones(n, np.uint8) for n in FRAME_SIZES}
    turn = 0
    socket = zmq.Context.instance().socket(zmq.ROUTER)
    socket.copy_threshold = 0  # a frame sent zero-copy is, whatever its size
    ports.put((socket.bind_to_random_port("tcp://127.0.0.1"), name))
    while True:
        ident, command, *rest = socket.recv_multipart(copy=False)
        kind, *fields = command.bytes.split(b" ")
        if kind == b"stop":
            socket.send_multipart([ident, b"ok"])
            return
        if kind == b"put":  # put MODE OFFSET: MODE raw (no device copy) or dev
            if fields[0] == b"dev":
                htod(int(fields[1]), rest[0].buffer)
            socket.send_multipart([ident, b"ok"])
        elif kind == b"get":  # get MODE OFFSET NBYTES: MODE raw (no device copy) or dev
            nbytes = int(fields[2])
            out = buffers[turn % STAGING][:nbytes]
            turn += 1
            if fields[0] == b"dev":
                dtoh(out, int(fields[1]))
            socket.send_multipart([ident, out], copy=False)
        elif kind == b"frame":  # frame copy|zero NBYTES: one frame back
            socket.send_multipart([ident, blobs[int(fields[1])]], copy=fields[0] == b"copy")
        else:
            socket.send_multipart([ident, b"ok"])


def timed_us(once: Any, reps: int, best: bool) -> float:
    """``once()``'s time in µs over ``reps`` runs after a warm-up: the best, or the p50."""
    times = run_times(once, reps, warmup=max(2, reps // 10))
    return (min(times) if best else float(np.percentile(times, 50))) * 1e6


def best_us(once: Any, reps: int) -> float:
    return timed_us(once, reps, best=True)


def p50_us(once: Any, reps: int) -> float:
    return timed_us(once, reps, best=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--emulated", action="store_true",
                        help="NumPy copies in place of the GPU's (a smoke run)")
    parser.add_argument("--out", help="Markdown file to write (default bench/results/...)")
    args = parser.parse_args()
    ports: Any = multiprocessing.Queue()
    server = multiprocessing.Process(target=serve, args=(ports, args.emulated), daemon=True)
    server.start()
    port, device = ports.get(timeout=120)
    socket = zmq.Context.instance().socket(zmq.DEALER)
    socket.copy_threshold = 0
    socket.connect(f"tcp://127.0.0.1:{port}")
    socket.send(b"ping")
    socket.recv()

    def put(data: np.ndarray, mode: bytes, pieces: int) -> None:
        step = len(data) // pieces
        for i in range(pieces):
            socket.send_multipart([b"put %s %d" % (mode, i * step), data[i * step:(i + 1) * step]],
                                  copy=False)
        for _ in range(pieces):
            socket.recv()

    def get(dest: np.ndarray, mode: bytes, pieces: int, copy_out: bool) -> None:
        step = len(dest) // pieces
        for i in range(pieces):
            socket.send(b"get %s %d %d" % (mode, i * step, step))
        for i in range(pieces):
            frame = socket.recv(copy=False)
            if copy_out:
                dest[i * step:(i + 1) * step] = np.frombuffer(frame.buffer, np.uint8)

    rows = ["| copy | raw pyzmq, whole | whole + device copy | " +
            " | ".join(f"{p} pieces" for p in PIECES) + " |",
            "|---|---|---|" + "---|" * len(PIECES)]
    figures: dict[str, float] = {}
    for nbytes in SIZES:
        data, dest = np.ones(nbytes, np.uint8), np.empty(nbytes, np.uint8)
        reps = 30 if nbytes <= 4 << 20 else 10
        for direction in ("h2d", "d2h"):
            if direction == "h2d":
                raw = best_us(lambda d=data: put(d, b"raw", 1), reps)
                measured = {p: best_us(lambda d=data, p=p: put(d, b"dev", p), reps)
                            for p in (1, *PIECES) if nbytes // p >= 64 << 10}
            else:
                raw = best_us(lambda d=dest: get(d, b"raw", 1, False), reps)
                measured = {p: best_us(lambda d=dest, p=p: get(d, b"dev", p, True), reps)
                            for p in (1, *PIECES) if nbytes // p >= 64 << 10}
            label = f"{direction.upper()} {size_label(nbytes)}"
            figures[f"{direction}_{size_label(nbytes)}_raw_us"] = raw
            cells = []
            for p in (1, *PIECES):
                if p in measured:
                    figures[f"{direction}_{size_label(nbytes)}_{p}_us"] = measured[p]
                    cells.append(f"{measured[p]:.0f} µs ({raw / measured[p]:.2f}x)")
                else:
                    cells.append("")
            rows.append(f"| {label} | {raw:.0f} µs | " + " | ".join(cells) + " |")
    rows += ["", "One frame each way, round trip p50 (µs): copied into ZeroMQ's message or "
             "zero-copy (pyzmq releases a zero-copy frame from its garbage-collector thread).", "",
             "| frame | put, copied | put, zero-copy | get, copied | get, zero-copy |",
             "|---|---|---|---|---|"]
    for nbytes in FRAME_SIZES:
        data = np.ones(nbytes, np.uint8)
        cells = []
        for kind in ("put", "get"):
            for copy in (True, False):
                if kind == "put":
                    def once(d: np.ndarray = data, c: bool = copy) -> None:
                        socket.send_multipart([b"frame-put", d], copy=c)
                        socket.recv(copy=False)
                else:
                    def once(n: int = nbytes, c: bool = copy) -> None:
                        socket.send(b"frame %s %d" % (b"copy" if c else b"zero", n))
                        socket.recv(copy=False)
                value = p50_us(once, 1000)
                figures[f"frame_{kind}_{'copy' if copy else 'zero'}_{size_label(nbytes)}"] = value
                cells.append(f"{value:.1f}")
        rows.append(f"| {size_label(nbytes)} | " + " | ".join(cells) + " |")
    socket.send(b"stop")
    socket.recv()
    server.join(5)
    report("copy-pipeline", device,
           f"python bench/copy_pipeline.py{' --emulated' if args.emulated else ''}",
           "Raw pyzmq over TCP loopback, a server process making the device copy the agent's "
           "worker makes (host->device from the received frame; device->host into page-locked "
           "memory, sent zero-copy and copied into the client's array on arrival), whole or in "
           "pieces sent back to back; each figure the best of its repetitions, with its ratio "
           "to raw pyzmq's whole put or get (no device copy, no copy out).",
           rows, figures, args.out)


if __name__ == "__main__":
    main()
