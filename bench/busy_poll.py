"""Busy polling against sleeping in ZeroMQ: a synchronous 4-byte read with each side polling
for its next message or not, raw pyzmq alongside, in interleaved rounds of one run.

    python bench/busy_poll.py [--emulated] [--us 200] [--rounds 5] [--reads 1500] [--out FILE]

Two local agents serve the shim: one whose workers sleep in ZeroMQ between messages
(``--busy-poll-us 0``) and one whose workers poll for ``--us`` µs first. Each round reads
``--reads`` times through the shim for each of the four pairings (client ``HARP_BUSY_POLL_US``
0 or ``--us``, worker 0 or ``--us``), each in its own process, the order rotated per round, and
a raw pyzmq round trip with and without polling on both sides. The table gives each pairing's
p50 and p99 (medians over the rounds), the CPU each side spent per read, and what it saves
against sleeping on both sides.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import zmq

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from forwarding import ENV, report, start_agent  # noqa: E402
from workloads import cpu_between, cpu_s, tree_cpu  # noqa: E402


def read_loop(endpoint: str, agent_pid: int, reads: int, out: str) -> None:
    """(In its own process) time ``reads`` 4-byte reads through the shim, with the CPU this
    process and the agent's processes (its supervisor and this session's worker) spent."""
    import resource

    from harp_jupyter.shim import activate

    activate(agent=endpoint)
    import pycuda.autoinit  # noqa: F401
    import pycuda.driver as cuda

    word, host = cuda.mem_alloc(4), np.empty(1, np.float32)
    for _ in range(200):
        cuda.memcpy_dtoh(host, word)
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    agent0 = tree_cpu(agent_pid)
    samples = []
    for _ in range(reads):
        start = time.perf_counter()
        cuda.memcpy_dtoh(host, word)
        samples.append((time.perf_counter() - start) * 1e6)
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    agent_cpu = cpu_between(agent0, tree_cpu(agent_pid)) / reads * 1e6
    cpu = (cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime) / reads * 1e6
    Path(out).write_text(json.dumps({"samples": samples, "client_cpu_us": cpu,
                                     "agent_cpu_us": agent_cpu,
                                     "device": cuda.Device(0).name()}))


def _raw_serve(ports: Any, poll_ns: int) -> None:
    from gpu_agent import multipart

    socket = zmq.Context.instance().socket(zmq.ROUTER)
    ports.put(socket.bind_to_random_port("tcp://127.0.0.1"))
    while True:
        ident, body = multipart.receive(socket, poll_ns)
        socket.send_multipart([ident, b"ok"])
        if body.bytes == b"stop":
            return


def raw_round_trips(poll_ns: int, reads: int) -> tuple[list[float], float, float]:
    """Raw pyzmq DEALER/ROUTER round trips, both sides polling ``poll_ns`` first: the round
    trips (µs), and the CPU per round trip of this process and of the server's (µs)."""
    from gpu_agent import multipart

    ports: Any = multiprocessing.Queue()
    server = multiprocessing.Process(target=_raw_serve, args=(ports, poll_ns), daemon=True)
    server.start()
    socket = zmq.Context.instance().socket(zmq.DEALER)
    socket.connect(f"tcp://127.0.0.1:{ports.get(timeout=30)}")
    for _ in range(200):
        socket.send(b"ping")
        multipart.receive(socket, poll_ns)
    samples = []
    client0, server0 = cpu_s(), tree_cpu(server.pid)
    for _ in range(reads):
        start = time.perf_counter()
        socket.send(b"ping")
        multipart.receive(socket, poll_ns)
        samples.append((time.perf_counter() - start) * 1e6)
    client_cpu = (cpu_s() - client0) / reads * 1e6
    server_cpu = cpu_between(server0, tree_cpu(server.pid)) / reads * 1e6
    socket.send(b"stop")
    socket.recv()
    socket.close(linger=0)
    server.join(5)
    return samples, client_cpu, server_cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--emulated", action="store_true", help="agents without a GPU")
    parser.add_argument("--us", type=int, default=200, help="the busy poll tried (µs)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reads", type=int, default=1500)
    parser.add_argument("--out", help="Markdown file to write (default bench/results/...)")
    args = parser.parse_args()
    agents = {w: start_agent(args.emulated, "--busy-poll-us", str(w), "--spares", "1")
              for w in (0, args.us)}
    pairings = [(c, w) for c in (0, args.us) for w in (0, args.us)]
    shim: dict[tuple[int, int], dict[str, list[float]]] = {
        p: {"p50": [], "p99": [], "client_cpu": [], "agent_cpu": []} for p in pairings}
    raw: dict[int, dict[str, list[float]]] = {
        n: {"p50": [], "p99": [], "client_cpu": [], "agent_cpu": []} for n in (0, args.us)}
    device = "?"
    try:
        for r in range(args.rounds):
            order = pairings[r % len(pairings):] + pairings[:r % len(pairings)]
            for client_us, worker_us in order:
                proc, endpoint = agents[worker_us]
                out = f"/tmp/harp-busy-poll-{proc.pid}-{client_us}.json"
                env = dict(ENV, HARP_BUSY_POLL_US=str(client_us))
                subprocess.run([sys.executable, __file__, "--read-loop", endpoint,
                                str(proc.pid), str(args.reads), out], env=env, check=True,
                               timeout=300)
                result = json.loads(Path(out).read_text())
                device = result["device"]
                s = np.array(result["samples"])
                figures = shim[(client_us, worker_us)]
                figures["p50"].append(float(np.percentile(s, 50)))
                figures["p99"].append(float(np.percentile(s, 99)))
                figures["client_cpu"].append(result["client_cpu_us"])
                figures["agent_cpu"].append(result["agent_cpu_us"])
            for poll_us in (0, args.us):
                samples, client_cpu, server_cpu = raw_round_trips(poll_us * 1000, args.reads)
                s = np.array(samples)
                raw[poll_us]["p50"].append(float(np.percentile(s, 50)))
                raw[poll_us]["p99"].append(float(np.percentile(s, 99)))
                raw[poll_us]["client_cpu"].append(client_cpu)
                raw[poll_us]["agent_cpu"].append(server_cpu)
    finally:
        for proc, _endpoint in agents.values():
            proc.kill()
    med = statistics.median
    base = med(shim[(0, 0)]["p50"])
    lines = ["| what | client polls (µs) | worker polls (µs) | p50 (µs) | p99 (µs) | "
             "p50 saved vs sleeping | client CPU / read (µs) | agent CPU / read (µs) |",
             "|---|---|---|---|---|---|---|---|"]
    for poll_us in (0, args.us):
        f = raw[poll_us]
        lines.append(f"| raw pyzmq round trip | {poll_us} | {poll_us} | {med(f['p50']):.1f} | "
                     f"{med(f['p99']):.1f} | | {med(f['client_cpu']):.1f} | "
                     f"{med(f['agent_cpu']):.1f} (its server) |")
    for client_us, worker_us in pairings:
        f = shim[(client_us, worker_us)]
        lines.append(f"| shim 4-byte read | {client_us} | {worker_us} | {med(f['p50']):.1f} | "
                     f"{med(f['p99']):.1f} | {base - med(f['p50']):+.1f} | "
                     f"{med(f['client_cpu']):.1f} | {med(f['agent_cpu']):.1f} |")
    spread = {f"{c}/{w}": [round(x, 1) for x in shim[(c, w)]["p50"]] for c, w in pairings}
    report("busy-poll", device, "python bench/busy_poll.py" + " --emulated" * args.emulated,
           f"{args.rounds} interleaved rounds of {args.reads} reads per pairing; medians over "
           "the rounds. CPU per read: the client process's user+system time, and the agent's "
           "process tree's (its supervisor and workers) over the same reads.",
           lines, {"p50_per_round": spread, "raw": raw}, args.out)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--read-loop":
        read_loop(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
    else:
        main()
