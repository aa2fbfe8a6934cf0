"""Where a synchronous copy's time goes: each side's stages, next to raw pyzmq, in one run.

    python bench/copy_stages.py [--emulated] [--rounds 3] [--reps 200] [--out FILE]

``bench/forwarding.py`` says how fast a copy is; this says why. It starts a local ``harp-agent``
whose processes carry ``bench/stage_stamps``'s instrument (the worker notes when each receive,
batch, call and send began and ended) and, in a process of its own, the shim, which notes its
own sends and receives, all on CLOCK_MONOTONIC. Each operation (a 4-byte read; an upload of 4
KiB, 64 KiB and 1 MiB followed by a synchronize; a download of the same sizes) runs ``--reps``
times; raw pyzmq's round trip, put and get of the same sizes run in the same rounds
(``bench/raw_zmq.py``'s server). For each operation the table gives the median over the reps of:

- **client sends done**: when the notebook's last send of the operation returned;
- **first batch starts**: when the worker began the first batch (the wire and its wake-up);
- **worker per batch**: one batch's run (the call itself in brackets) and its reply's send,
  the worker's own time per batch (its receive, a few µs once a message is there, is left
  out: the stamps cannot tell it from the wait for the message);
- **batch to batch**: from one batch's start to the next's, the pace the worker was fed at;
- **reply after**: from the worker's last batch's end to the notebook having the answer.

A copy in pieces (``harp_jupyter.shim.host_copies.copy_pieces``) is a pipeline: its pace is its
slowest stage, so the table also gives what each piece costs the notebook (its copy and send,
from one send's start to the next) and the wire (raw pyzmq's time at that size less its round
trip, per piece). Each round runs every side, in rotated order; each operation's figures come
from the round of its lowest median.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from bisect import bisect_left, bisect_right
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import raw_zmq  # noqa: E402
from forwarding import ENV, report, start_agent  # noqa: E402
from workloads import run_times, size_label  # noqa: E402

KiB, MiB = 1 << 10, 1 << 20
SIZES = (4 * KiB, 64 * KiB, MiB)
#: an operation's stamps: (what, began ns, ended ns, detail)
Stamp = tuple[str, int, int, Any]
#: how long to wait for a worker's stamps after its session ended
STAMPS_WAIT_S = 30.0


# {{{ the two sides

def shim_side(endpoint: str, reps: int, out: str) -> None:
    """(In its own process) every operation through the shim, with the notebook's stamps."""
    from harp_jupyter.shim import activate, transport
    from harp_jupyter.shim.session import get_session

    activate(agent=endpoint)
    import pycuda.autoinit  # noqa: F401
    import pycuda.driver as cuda

    stamps: list[Stamp] = []
    clock = time.perf_counter_ns
    send, recv = transport.AgentConnection.send, transport.AgentConnection.recv

    def stamped_send(self: Any, header: dict[str, Any], *rest: Any, **named: Any) -> Any:
        began = clock()
        sent = send(self, header, *rest, **named)
        stamps.append(("C.send", began, clock(), header.get("q")))
        return sent

    def stamped_recv(self: Any, *rest: Any, **named: Any) -> Any:
        began = clock()
        received = recv(self, *rest, **named)
        stamps.append(("C.recv", began, clock(), received[0].get("q")))
        return received

    transport.AgentConnection.send = stamped_send  # type: ignore[method-assign]
    transport.AgentConnection.recv = stamped_recv  # type: ignore[method-assign]
    word, scalar = cuda.mem_alloc(4), np.empty(1, np.float32)
    operations: dict[str, Callable[[], Any]] = {
        "read 4 B": lambda: cuda.memcpy_dtoh(scalar, word)}
    for nbytes in SIZES:
        host, dev = np.ones(nbytes, np.uint8), cuda.mem_alloc(nbytes)
        operations[f"upload {size_label(nbytes)}"] = (
            lambda d=dev, h=host: (cuda.memcpy_htod(d, h), cuda.Context.synchronize()))
        operations[f"download {size_label(nbytes)}"] = (
            lambda d=dev, h=host: cuda.memcpy_dtoh(h, d))
    marks: dict[str, list[tuple[int, int]]] = {}
    for name, once in operations.items():
        run_times(once, 0, warmup=30)
        marks[name] = []
        for _ in range(reps):
            began = clock()
            once()
            marks[name].append((began, clock()))
    get_session().close()
    Path(out).write_text(json.dumps({"device": cuda.Device(0).name(), "marks": marks,
                                     "stamps": stamps}))


def raw_side(reps: int) -> dict[str, list[float]]:
    """Raw pyzmq's time (µs) for each operation, ``reps`` times each."""
    server, socket = raw_zmq.start_server()
    times = {"read 4 B": run_times(lambda: raw_zmq.round_trip(socket), reps, 30)}
    for nbytes in SIZES:
        data = np.ones(nbytes, np.uint8)
        times[f"upload {size_label(nbytes)}"] = run_times(
            lambda d=data: raw_zmq.put(socket, d), reps, 30)
        times[f"download {size_label(nbytes)}"] = run_times(
            lambda n=nbytes: raw_zmq.get(socket, n), reps, 30)
    raw_zmq.stop_server(server, socket)
    return {name: [t * 1e6 for t in values] for name, values in times.items()}


def agent_with_stamps(emulated: bool, folder: str) -> tuple[subprocess.Popen, str]:
    """``start_agent`` with ``bench/stage_stamps`` in its processes, writing into ``folder``."""
    return start_agent(emulated, env=dict(
        ENV, PYTHONPATH=os.pathsep.join([str(HERE / "stage_stamps"), ENV["PYTHONPATH"]]),
        HARP_STAGE_STAMPS=folder))


def worker_stamps(folder: Path, deadline_s: float = STAMPS_WAIT_S) -> list[Stamp]:
    """The stamps of the worker that ran batches (written as it ended), polled for."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        for path in folder.glob("proc-*.json"):
            stamps = [tuple(s) for s in json.loads(path.read_text())]
            if any(s[0] == "W.run" for s in stamps):
                return stamps  # type: ignore[return-value]
        time.sleep(0.05)
    raise SystemExit(f"no worker stamps in {folder} within {deadline_s:g} s")

# }}}

# {{{ what the stamps say


def stages(marks: list[tuple[int, int]], client: list[Stamp], worker: list[Stamp]
           ) -> dict[str, float]:
    """Medians over the reps (µs from each rep's start) of one operation's stages."""
    client, worker = sorted(client, key=lambda s: s[1]), sorted(worker, key=lambda s: s[1])
    rows: dict[str, list[float]] = {key: [] for key in (
        "total", "client_sent", "first_batch", "worker_run", "worker_op", "worker_per_batch",
        "batch_to_batch", "send_to_send", "reply_after", "batches")}
    for began, ended in marks:
        mine, theirs = _within(client, began, ended), _within(worker, began, ended)
        sends, runs = _only(mine, "C.send"), _only(theirs, "W.run")
        if not sends or not runs:
            continue
        ops, replies = _only(theirs, "W.op"), _only(theirs, "W.send")
        us = 1e-3
        rows["total"].append((ended - began) * us)
        rows["client_sent"].append((sends[-1][2] - began) * us)
        rows["first_batch"].append((runs[0][1] - began) * us)
        run = float(np.median([(r[2] - r[1]) * us for r in runs]))
        rows["worker_run"].append(run)
        rows["worker_op"].append(float(np.median([(o[2] - o[1]) * us for o in ops]))
                                 if ops else 0.0)
        rows["worker_per_batch"].append(
            run + float(np.median([(r[2] - r[1]) * us for r in replies])) if replies
            else float("nan"))
        rows["batch_to_batch"].append(float(np.median(np.diff([r[1] for r in runs]) * us))
                                      if len(runs) > 1 else 0.0)
        rows["send_to_send"].append(float(np.median(np.diff([s[1] for s in sends]) * us))
                                    if len(sends) > 1 else 0.0)
        rows["reply_after"].append((ended - runs[-1][2]) * us)
        rows["batches"].append(float(len(runs)))
    return {key: float(np.median(values)) if values else float("nan")
            for key, values in rows.items()}


def _within(stamps: list[Stamp], began: int, ended: int) -> list[Stamp]:
    """The stamps (sorted by start) that began between ``began`` and ``ended``."""
    return stamps[bisect_left(stamps, began, key=lambda s: s[1]):
                  bisect_right(stamps, ended, key=lambda s: s[1])]


def _only(stamps: list[Stamp], what: str) -> list[Stamp]:
    return [s for s in stamps if s[0] == what]


def best_round(rounds: list[dict[str, dict[str, float]]], key: str = "total"
               ) -> dict[str, dict[str, float]]:
    """Per operation, the figures of the round where its ``key`` was lowest."""
    return {name: min((r[name] for r in rounds), key=lambda f: f[key]) for name in rounds[0]}


def table(raw: dict[str, dict[str, float]], shim: dict[str, dict[str, float]]) -> list[str]:
    lines = ["| operation | raw pyzmq (µs) | through the shim (µs) | ratio to raw | batches | "
             "client sends done | first batch starts | worker per batch (its call) | "
             "batch to batch | reply after | per piece: notebook / wire |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    rtt = raw["read 4 B"]["p50"]
    for name, f in shim.items():
        r = raw[name]["p50"]
        pieces = f["batches"] - (1 if name.startswith("upload") and f["batches"] > 1 else 0)
        per_piece = (f"{f['send_to_send']:.1f} / {(r - rtt) / pieces:.1f}"
                     if pieces > 1 else "")
        # an upload's speed is bytes over time: raw's time over the shim's is its ratio
        lines.append(
            f"| {name} | {r:.1f} | {f['total']:.1f} | {r / f['total']:.2f} | "
            f"{f['batches']:.0f} | {f['client_sent']:.1f} | {f['first_batch']:.1f} | "
            f"{f['worker_per_batch']:.1f} ({f['worker_op']:.1f}) | "
            f"{f['batch_to_batch']:.1f} | {f['reply_after']:.1f} | {per_piece} |")
    return lines

# }}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--emulated", action="store_true",
                        help="an emulated agent (no GPU: the stages' shape, not a GPU's times)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--out", help="default bench/results/copy-stages-<device>.md")
    args = parser.parse_args()
    raw_rounds: list[dict[str, dict[str, float]]] = []
    shim_rounds: list[dict[str, dict[str, float]]] = []
    device = "emulated"
    spawn = multiprocessing.get_context("spawn")
    for index in range(args.rounds):
        sides = ["raw", "shim"] if index % 2 == 0 else ["shim", "raw"]
        for side in sides:
            if side == "raw":
                raw_rounds.append({name: {"p50": float(np.median(times))}
                                   for name, times in raw_side(args.reps).items()})
                continue
            with tempfile.TemporaryDirectory() as folder:
                agent, endpoint = agent_with_stamps(args.emulated, folder)
                try:
                    out = os.path.join(folder, "shim.json")
                    client = spawn.Process(target=shim_side, args=(endpoint, args.reps, out))
                    client.start()
                    client.join(600)
                    if client.exitcode != 0:
                        raise SystemExit(f"the shim's side failed ({client.exitcode})")
                    found = json.loads(Path(out).read_text())
                    worker = worker_stamps(Path(folder))
                finally:
                    agent.terminate()
                    agent.wait(30)
            device = found["device"]
            client_stamps = [tuple(s) for s in found["stamps"]]
            shim_rounds.append({name: stages([tuple(m) for m in marks], client_stamps, worker)
                                for name, marks in found["marks"].items()})
    raw, shim = best_round(raw_rounds, "p50"), best_round(shim_rounds)
    intro = (f"{args.rounds} rounds of {args.reps} reps each side (medians; each operation "
             "from its best round). An upload is the copy and a synchronize. Times are µs from "
             "the operation's start; 'worker per batch' is the worker's own time per batch "
             "(the call's in brackets), 'per piece' what each piece of a copy in pieces costs "
             "the notebook (send to send) and the wire (raw pyzmq's time less its round trip, "
             "per piece): the slowest stage sets a pipeline's pace.")
    report("copy-stages", device, "python bench/copy_stages.py " + " ".join(sys.argv[1:]),
           intro, table(raw, shim), {"raw": raw_rounds, "shim": shim_rounds}, args.out)


if __name__ == "__main__":
    main()
