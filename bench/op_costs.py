"""What one synchronous operation costs each side besides time: context switches and page faults.

    python bench/op_costs.py [--emulated] [--reps 300] [--out FILE]

A sleeping thread that must be woken (a voluntary context switch) costs microseconds on a
virtual machine, and every message through ZeroMQ wakes its I/O thread on both sides. This
measures, per operation and in one run, the wall time (p50 and best) and, from Linux /proc, the
voluntary and involuntary context switches and minor page faults of the client process (all its
threads) and of the server side: raw pyzmq's ROUTER process (``bench/raw_zmq.py``'s) for a round
trip, a 64 KiB and a 1 MiB put and get; the agent's processes for a 4-byte read, a
synchronize, and a 64 KiB and a 1 MiB upload (then a synchronize) and download through the shim
(the shim's side in a process of its own). A copy the shim cuts into pieces
(``harp_jupyter.shim.host_copies.copy_pieces``) sends a batch per piece, each answered: the
switches per copy against raw pyzmq's say what that costs on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import raw_zmq  # noqa: E402
from forwarding import ENV, report, start_agent  # noqa: E402
from workloads import run_times  # noqa: E402

COUNTERS = ("vcsw", "ivcsw", "minflt")
KiB, MiB = 1 << 10, 1 << 20


def counters(pid: int, descendants: bool) -> dict[str, int]:
    """Voluntary and involuntary context switches (every thread) and minor faults of ``pid``
    and, with ``descendants``, of every process below it (from /proc)."""
    found = dict.fromkeys(COUNTERS, 0)
    todo = [pid]
    while todo:
        proc = todo.pop()
        try:
            found["minflt"] += int(Path(f"/proc/{proc}/stat").read_text()
                                   .rsplit(")", 1)[1].split()[7])
            for task in Path(f"/proc/{proc}/task").iterdir():
                for line in (task / "status").read_text().splitlines():
                    if line.startswith("voluntary_ctxt_switches"):
                        found["vcsw"] += int(line.split()[1])
                    elif line.startswith("nonvoluntary_ctxt_switches"):
                        found["ivcsw"] += int(line.split()[1])
                if descendants:
                    todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
    return found


def measure(once: Callable[[], Any], server_pid: int, reps: int) -> dict[str, float]:
    """``once`` ``reps`` times (after 30 not counted): its p50 and best (µs), and per call
    the counters of this process and of ``server_pid`` with its descendants."""
    run_times(once, 0, warmup=30)
    client, server = counters(os.getpid(), False), counters(server_pid, True)
    times = run_times(once, reps, warmup=0)
    client_after, server_after = counters(os.getpid(), False), counters(server_pid, True)
    figures = {"p50_us": float(np.median(times)) * 1e6, "best_us": min(times) * 1e6}
    for side, before, after in (("client", client, client_after),
                                ("server", server, server_after)):
        for key in COUNTERS:
            figures[f"{side}_{key}"] = (after[key] - before[key]) / reps
    return figures


def raw_ops(reps: int) -> dict[str, dict[str, float]]:
    server, socket = raw_zmq.start_server()
    assert server.pid is not None
    found = {"round trip": measure(lambda: raw_zmq.round_trip(socket), server.pid, reps)}
    for nbytes in (64 * KiB, MiB):
        data = np.ones(nbytes, np.uint8)
        label = size_label(nbytes)
        found[f"put {label}"] = measure(lambda d=data: raw_zmq.put(socket, d), server.pid, reps)
        found[f"get {label}"] = measure(lambda n=nbytes: raw_zmq.get(socket, n), server.pid,
                                        reps)
    raw_zmq.stop_server(server, socket)
    return found


def shim_ops(endpoint: str, agent_pid: int, reps: int, out: str) -> None:
    """(In its own process) the shim's operations, written to ``out`` as JSON."""
    from harp_jupyter.shim import activate

    activate(agent=endpoint)
    import pycuda.autoinit  # noqa: F401
    import pycuda.driver as cuda

    word, host = cuda.mem_alloc(4), np.empty(1, np.float32)
    found = {"4-byte read": measure(lambda: cuda.memcpy_dtoh(host, word), agent_pid, reps),
             "synchronize": measure(cuda.Context.synchronize, agent_pid, reps)}
    for nbytes in (64 * KiB, MiB):
        data, dev = np.ones(nbytes, np.uint8), cuda.mem_alloc(nbytes)
        label = size_label(nbytes)
        found[f"upload {label} + synchronize"] = measure(
            lambda d=dev, h=data: (cuda.memcpy_htod(d, h), cuda.Context.synchronize()),
            agent_pid, reps)
        found[f"download {label}"] = measure(lambda d=dev, h=data: cuda.memcpy_dtoh(h, d),
                                             agent_pid, reps)
    Path(out).write_text(json.dumps(found))


def size_label(nbytes: int) -> str:
    return f"{nbytes // MiB} MiB" if nbytes >= MiB else f"{nbytes // KiB} KiB"


def table(raw: dict[str, dict[str, float]], shim: dict[str, dict[str, float]]) -> list[str]:
    lines = ["| operation | p50 (µs) | best (µs) | client: voluntary / involuntary switches, "
             "faults | server: voluntary / involuntary switches, faults |",
             "|---|---|---|---|---|"]
    for side, ops in (("raw pyzmq", raw), ("shim", shim)):
        for name, f in ops.items():
            lines.append(f"| {side}: {name} | {f['p50_us']:.1f} | {f['best_us']:.1f} | "
                         f"{f['client_vcsw']:.1f} / {f['client_ivcsw']:.1f}, "
                         f"{f['client_minflt']:.1f} | {f['server_vcsw']:.1f} / "
                         f"{f['server_ivcsw']:.1f}, {f['server_minflt']:.1f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--emulated", action="store_true",
                        help="against an emulated agent (no GPU needed)")
    parser.add_argument("--reps", type=int, default=300, help="operations timed per row")
    parser.add_argument("--out", help="Markdown file to write (default bench/results/...)")
    args = parser.parse_args()
    if args.reps < 1:
        parser.error("--reps must be at least 1")
    raw = raw_ops(args.reps)
    agent, endpoint = start_agent(args.emulated)
    try:
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            out = f.name
        subprocess.run([sys.executable, __file__, "--shim-side", endpoint, str(agent.pid),
                        str(args.reps), out], env=ENV, check=True, timeout=600)
        shim = json.loads(Path(out).read_text())
    finally:
        agent.kill()
    command = "python bench/op_costs.py" + (" --emulated" if args.emulated else "")
    device = "HARP emulated device (host memory, no GPU)" if args.emulated else gpu_name()
    report("op-costs", device, command,
           f"Raw pyzmq and the shim (TCP loopback to a local harp-agent), {args.reps} "
           "operations a row after 30 not counted; switches and faults are per operation, "
           "from /proc: the client is the calling process (all its threads), the server raw "
           "pyzmq's ROUTER process or the agent with its workers.",
           table(raw, shim), {"raw_zmq": raw, "shim": shim}, args.out)


def gpu_name() -> str:
    import pycuda.driver as cuda

    cuda.init()
    return str(cuda.Device(0).name())


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--shim-side":
        shim_ops(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
    else:
        main()
