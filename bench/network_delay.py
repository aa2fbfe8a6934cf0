"""Notebook workloads over a network with a delay: local pycuda vs the shim through a delay relay.

    python bench/network_delay.py [--rounds 5] [--delays-us 0,50,250,1000] [--emulated]
                                  [--out FILE.md]

One run, every configuration measured side by side: local pycuda (the baseline; none with
``--emulated``), the shim straight to a ``harp-agent`` on 127.0.0.2 ("no relay"), and the shim
through ``bench/relay.py`` at each one-way delay. Each configuration is one long-lived process
of ``bench/notebook_workloads.py`` (its own session, so the agent runs with one slot per shim
configuration); the driver runs the workloads **interleaved**: each round runs every workload
once in every configuration, in an order rotated from round to round and workload to workload,
so that a slow spell of this machine lands on every configuration alike. Each figure is the
median over the rounds with its spread; what a delay adds per sync point is taken round by
round against the +0 µs relay of the same round (paired), then the median.

Each delay has its relay process on its own loopback address (127.0.0.10, .11, ...), forwarding
the same port numbers to the agent: the agent's supervisor port, its workers' port range and an
echo server's port (the raw pyzmq round trip through that relay, the relay's own cost). The
clients reach their worker through their relay with ``--worker-host-map`` (the agent advertises
its workers at 127.0.0.2); the relays' byte counts at the end show that the data went through
them. The ports are one block found free on every address at the start (the relays must listen
on the agent's own port numbers) and are printed with the results.

Besides wall time, each run reports the client's CPU time (its whole process) and the agent
workers' CPU time (from /proc, every worker of the agent summed; on a GPU it includes CUDA's
spin-waits at synchronizations): whether the two sides overlapped or took turns.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import zmq

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from forwarding import ENV, report  # noqa: E402

AGENT_HOST = "127.0.0.2"
WORKER_PORTS = 16
LOCAL, DIRECT = "local", "no relay"
RTT_SAMPLES = 300
SYNC_READ_SAMPLES = 150

WORKLOAD_ROWS = (
    ("train_sync_1024", "training loop, matmul-bound (1024), loss .get() every 10 steps"),
    ("train_device_loss_1024", "  same, advisor's rewrite: loss kept on device, one read"),
    ("train_sync_256", "training loop, launch-bound (256), loss .get() every 10 steps"),
    ("train_device_loss_256", "  same, advisor's rewrite: loss kept on device, one read"),
    ("images", "image pipeline, 2 streams, events per batch of 8 frames"),
)


def relay_host(index: int) -> str:
    return f"127.0.0.{10 + index}"


def delay_name(delay_us: float) -> str:
    return f"+{delay_us:g} µs"


# {{{ processes: echo server, agent, relays, workload clients


def free_port_block(count: int, hosts: list[str], start: int = 47100) -> int:
    """The first port of ``count`` consecutive ports free on every host."""
    port = start
    while port + count < 65000:
        probes: list[socket.socket] = []
        try:
            for p in range(port, port + count):
                for host in hosts:
                    s = socket.socket()
                    probes.append(s)
                    s.bind((host, p))
            return port
        except OSError:
            port += count
        finally:
            for s in probes:
                s.close()
    raise SystemExit("no block of free ports found")


def echo_server(endpoint: str) -> None:
    socket_ = zmq.Context.instance().socket(zmq.ROUTER)
    socket_.bind(endpoint)
    while True:
        ident, message = socket_.recv_multipart()
        socket_.send_multipart([ident, message])
        if message == b"stop":
            return


class EchoClient:
    """A DEALER to the echo server along one path; ``sample`` gives round trips in µs."""

    def __init__(self, endpoint: str) -> None:
        self.socket = zmq.Context.instance().socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(endpoint)
        self.socket.send(b"ping")
        if not self.socket.poll(10_000):
            raise SystemExit(f"no echo from {endpoint}")
        self.socket.recv()

    def sample(self, samples: int) -> list[float]:
        times = []
        for _ in range(samples):
            start = time.perf_counter()
            self.socket.send(b"ping")
            self.socket.recv()
            times.append((time.perf_counter() - start) * 1e6)
        return times


def start_agent(emulated: bool, supervisor_port: int, worker_ports: str,
                slots: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpu_agent.cli", "--listen",
         f"tcp://{AGENT_HOST}:{supervisor_port}", "--worker-host", AGENT_HOST,
         "--worker-ports", worker_ports, "--slots", str(slots), "--log-level", "WARNING",
         "--executor", "emulated" if emulated else "pycuda"],
        env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("harp-agent: serving"):
            return proc
    proc.kill()
    raise SystemExit("agent did not start:\n" + "".join(lines))


def stop_agent(agent: subprocess.Popen) -> None:
    """SIGTERM first, so that the agent ends its workers; SIGKILL if it does not end."""
    agent.terminate()
    try:
        agent.wait(20)
    except subprocess.TimeoutExpired:
        agent.kill()
        agent.wait()


def workers_cpu_s(agent_pid: int) -> float:
    """User + system CPU seconds of the agent's child processes (its workers), now."""
    ticks = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == agent_pid:
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


class RelayProcess:
    """bench/relay.py in its own process (its threads never share a client's GIL)."""

    def __init__(self, delay_us: float, host: str, ports: list[int]) -> None:
        forwards = [f"--forward={host}:{p}={AGENT_HOST}:{p}" for p in ports]
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "relay.py"), "--delay-us", str(delay_us), *forwards],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("relay: ready"):
            self.proc.kill()
            raise SystemExit(f"relay did not start: {line!r}")

    def stop(self) -> list[dict[str, Any]]:
        """Stop it; what each forward carried."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        try:
            out = self.proc.stdout.read()
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return []
        return json.loads(out.strip().splitlines()[-1])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class WorkloadClient:
    """One configuration's bench/notebook_workloads.py process, answering commands."""

    def __init__(self, name: str, *args: str) -> None:
        self.name = name
        self.errors = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "notebook_workloads.py"), *args], env=ENV,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.errors, text=True)
        self.ready: dict[str, Any] = {}

    def wait_ready(self) -> None:
        """Wait for its set-up and warm-up (all clients start at once, then wait here)."""
        self.ready = self._read()

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self.errors.seek(0)
            raise SystemExit(f"{self.name}: bench/notebook_workloads.py ended "
                             f"({self.proc.returncode}):\n{self.errors.read()[-4000:]}")
        return json.loads(line)

    def ask(self, command: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.errors.close()


# }}}

# {{{ the rounds


def rotated(items: list[Any], by: int) -> list[Any]:
    by %= len(items)
    return items[by:] + items[:by]


def run_rounds(rounds: int, clients: dict[str, WorkloadClient], agent_pid: int,
               echoes: dict[str, EchoClient]) -> dict[str, Any]:
    """Every round: each workload once in every configuration, then the probes, each time in
    an order rotated by the round (and the workload)."""
    configs = list(clients)
    workloads = [w for w, _ in WORKLOAD_ROWS if w in clients[configs[0]].ready["workloads"]]
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {
        c: {w: [] for w in workloads} for c in configs}
    sync_read: dict[str, list[float]] = {c: [] for c in configs}
    launch: dict[str, list[float]] = {c: [] for c in configs}
    rtt: dict[str, list[float]] = {p: [] for p in echoes}
    for r in range(rounds):
        for i, workload in enumerate(workloads):
            for config in rotated(configs, r + i):
                before = workers_cpu_s(agent_pid)
                result = clients[config].ask({"run": workload})
                result["workers_cpu_s"] = (workers_cpu_s(agent_pid) - before
                                           if config != LOCAL else None)
                runs[config][workload].append(result)
        for config in rotated(configs, r):
            sync_read[config] += clients[config].ask(
                {"probe": "sync_read", "samples": SYNC_READ_SAMPLES})["us"]
            us = clients[config].ask({"probe": "launch"})["us"]
            if us is not None:
                launch[config].append(us)
        for path in rotated(list(echoes), r):
            rtt[path] += echoes[path].sample(RTT_SAMPLES)
        print(f"round {r + 1}/{rounds} done", file=sys.stderr, flush=True)
    return {"runs": runs, "sync_read_us": sync_read, "launch_us": launch, "rtt_us": rtt}


# }}}

# {{{ tables


def paired(later: list[float], earlier: list[float], scale: float = 1.0) -> list[float]:
    """Round by round: (later - earlier) * scale, one figure per round (never the difference of
    the medians, which the rounds' drift would swamp)."""
    return [(a - b) * scale for a, b in zip(later, earlier, strict=True)]


def _median(values: list[float]) -> float:
    return statistics.median(values)


def _spread(values: list[float]) -> str:
    """± half the range, as a percentage of the median."""
    m = _median(values)
    return f"±{(max(values) - min(values)) / 2 / m * 100:.0f}%" if m else ""


def tables(measured: dict[str, Any], configs: list[str], delays: list[float],
           rounds: int) -> list[str]:
    runs = measured["runs"]
    base_name = LOCAL if LOCAL in runs else DIRECT
    shims = [c for c in configs if c != LOCAL]
    workloads = [(w, label) for w, label in WORKLOAD_ROWS if w in runs[base_name]]
    sync_points = {w: runs[base_name][w][0]["sync_points"] for w, _ in workloads}

    def walls(config: str, workload: str) -> list[float]:
        return [x["s"] for x in runs[config][workload]]

    lines = [
        f"Wall time of each workload, median of {rounds} interleaved rounds, as a ratio to "
        f"**{'local pycuda' if base_name == LOCAL else 'the shim without relay'}** (seconds "
        "and the spread, ± half the range over the rounds, in brackets); sync points = the "
        "times the notebook waits for the GPU.",
        "",
        f"| workload | sync points | {base_name} (s) | " + " | ".join(shims) + " |",
        "|---|---|---|" + "---|" * len(shims),
    ]
    for w, label in workloads:
        b = _median(walls(base_name, w))
        cells = [f"{_median(walls(c, w)) / b:.2f}x ({_median(walls(c, w)):.3f} "
                 f"{_spread(walls(c, w))})" for c in shims]
        lines.append(f"| {label} | {sync_points[w]} | {b:.3f} {_spread(walls(base_name, w))} | "
                     + " | ".join(cells) + " |")

    zero = delay_name(0.0)
    later = [d for d in delays if d > 0]
    if zero in runs and later:
        lines += [
            "",
            "What each delay added per sync point, paired round by round: (t(delay) - t(+0 µs)"
            " of the same round) / sync points, in ms, the median over the rounds [lowest, "
            "highest]; one more round trip per sync point would add 2 x delay:",
            "",
            "| workload | " + " | ".join(f"{delay_name(d)} (2x = {2 * d / 1000:g} ms)"
                                        for d in later) + " |",
            "|---|" + "---|" * len(later),
        ]
        for w, label in workloads:
            cells = []
            for d in later:
                added = paired(walls(delay_name(d), w), walls(zero, w), 1e3 / sync_points[w])
                cells.append(f"{_median(added):.2f} [{min(added):.2f}, {max(added):.2f}]")
            lines.append(f"| {label.strip()} | " + " | ".join(cells) + " |")

    pairs = [(w[len("train_sync_"):], w, f"train_device_loss_{w[len('train_sync_'):]}")
             for w, _ in workloads if w.startswith("train_sync_")]
    if pairs:
        lines += [
            "",
            "The advisor's rewrite: the original loop's time over the rewritten loop's, paired "
            "round by round (median [lowest, highest]); above 1 the rewrite is faster:",
            "",
            "| model | " + " | ".join(configs) + " |",
            "|---|" + "---|" * len(configs),
        ]
        for size, original, rewritten in pairs:
            cells = []
            for c in configs:
                gain = [a / b for a, b in zip(walls(c, original), walls(c, rewritten),
                                              strict=True)]
                cells.append(f"{_median(gain):.2f}x [{min(gain):.2f}, {max(gain):.2f}]")
            lines.append(f"| {size} | " + " | ".join(cells) + " |")

    lines += [
        "",
        "Where the time goes (medians): wall s / the client process's CPU s / the agent "
        "workers' CPU s / batches sent. Wall near the larger of the two CPU figures: the two "
        "sides overlapped; near their sum: they took turns. Few batches for many calls: the "
        "calls waited in the client before the agent saw them.",
        "",
        "| workload | " + " | ".join(shims) + " |",
        "|---|" + "---|" * len(shims),
    ]
    for w, label in workloads:
        cells = []
        for c in shims:
            xs = runs[c][w]
            cells.append(f"{_median([x['s'] for x in xs]):.3f} / "
                         f"{_median([x['cpu_s'] for x in xs]):.3f} / "
                         f"{_median([x['workers_cpu_s'] for x in xs]):.3f} / "
                         f"{_median([x['batches'] for x in xs]):.0f}")
        lines.append(f"| {label.strip()} | " + " | ".join(cells) + " |")

    rtt, reads, launch = measured["rtt_us"], measured["sync_read_us"], measured["launch_us"]

    def pct(values: list[float], q: float) -> float:
        return float(np.percentile(values, q))

    lines += [
        "",
        "Round trips, all rounds together (p50 µs; p99 in brackets):",
        "",
        "| measure | " + " | ".join(configs) + " |",
        "|---|" + "---|" * len(configs),
        "| raw pyzmq round trip | " + " | ".join(
            f"{pct(rtt[c], 50):.1f} ({pct(rtt[c], 99):.1f})" if c in rtt else ""
            for c in configs) + " |",
        "| 4-byte sync read (`memcpy_dtoh`) | " + " | ".join(
            f"{pct(reads[c], 50):.1f} ({pct(reads[c], 99):.1f})" for c in configs) + " |",
    ]
    if any(launch.values()):
        lines.append("| small-kernel launch, async (µs each, median of rounds) | " + " | ".join(
            f"{_median(launch[c]):.2f}" if launch[c] else "" for c in configs) + " |")
    if zero in rtt:
        lines += ["", f"The relay's own cost at +0 µs: "
                  f"{pct(rtt[zero], 50) - pct(rtt[DIRECT], 50):.1f} µs per raw round trip "
                  "(p50, through the relay minus direct; two relay hops per round trip)."]
    return lines


def check_same_results(runs: dict[str, Any], reference: str) -> list[str]:
    """Where a configuration's losses or checksum differ from the reference's."""
    notes = []
    for config, by_workload in runs.items():
        for workload, results in by_workload.items():
            a = runs[reference][workload][0]
            for b in results:
                if "losses" in a and not np.allclose(a["losses"], b["losses"], rtol=1e-3):
                    notes.append(f"{config}: {workload} losses differ")
                    break
                if "checksum" in a and not np.isclose(a["checksum"], b["checksum"],
                                                      rtol=1e-5):
                    notes.append(f"{config}: {workload} checksum differs")
                    break
    return notes


def compact(runs: dict[str, Any]) -> dict[str, Any]:
    """The per-round figures for the raw JSON (the losses are checked, not kept)."""
    keys = ("s", "cpu_s", "thread_cpu_s", "workers_cpu_s", "batches", "shim_sync_points",
            "parks")
    return {c: {w: {k: [x[k] for x in xs] for k in keys if k in xs[0]}
                for w, xs in by_w.items()}
            for c, by_w in runs.items()}


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{cpu}, {os.cpu_count()} logical CPUs, Linux {platform.release()}, "
            f"load average at the end {load} (shared machine)")


# }}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--emulated", action="store_true",
                        help="smoke run against an emulated agent (no GPU, no local baseline)")
    parser.add_argument("--delays-us", default="0,50,250,1000",
                        help="one-way delays to add, microseconds, comma-separated")
    parser.add_argument("--rounds", type=int, default=5,
                        help="interleaved rounds (each runs every workload in every "
                             "configuration once)")
    parser.add_argument("--out", help="Markdown file to write (default bench/results/...)")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    started = time.perf_counter()
    delays = [float(d) for d in args.delays_us.split(",")]
    hosts = {delay_name(d): relay_host(i) for i, d in enumerate(delays)}
    delay_of = {delay_name(d): d for d in delays}

    first = free_port_block(WORKER_PORTS + 2, [AGENT_HOST, *hosts.values()])
    supervisor_port, echo_port = first, first + 1
    worker_first = first + 2
    worker_range = f"{worker_first}-{worker_first + WORKER_PORTS - 1}"
    relayed_ports = [supervisor_port, echo_port,
                     *range(worker_first, worker_first + WORKER_PORTS)]

    echo = multiprocessing.Process(target=echo_server,
                                   args=(f"tcp://{AGENT_HOST}:{echo_port}",), daemon=True)
    echo.start()
    agent = start_agent(args.emulated, supervisor_port, worker_range, slots=1 + len(delays))
    relays: dict[str, RelayProcess] = {}
    clients: dict[str, WorkloadClient] = {}
    carried: dict[str, list[dict[str, Any]]] = {}
    try:
        for name, host in hosts.items():
            relays[name] = RelayProcess(delay_of[name], host, relayed_ports)
        echoes = {DIRECT: EchoClient(f"tcp://{AGENT_HOST}:{echo_port}")}
        echoes.update({name: EchoClient(f"tcp://{host}:{echo_port}")
                       for name, host in hosts.items()})
        if not args.emulated:
            clients[LOCAL] = WorkloadClient(LOCAL, "local")
        clients[DIRECT] = WorkloadClient(DIRECT, "shim", f"tcp://{AGENT_HOST}:{supervisor_port}")
        for name, host in hosts.items():
            clients[name] = WorkloadClient(name, "shim", f"tcp://{host}:{supervisor_port}",
                                           f"--worker-host-map={AGENT_HOST}={host}")
        for client in clients.values():
            client.wait_ready()
        configs = list(clients)
        measured = run_rounds(args.rounds, clients, agent.pid, echoes)
        for client in clients.values():
            client.close()
        for name, relay in relays.items():
            carried[name] = [f for f in relay.stop() if f["connections"]]
            through_workers = sum(f["bytes_to_target"] + f["bytes_from_target"]
                                  for f in carried[name]
                                  if int(f["listen"].rpartition(":")[2]) >= worker_first)
            images = measured["runs"][name].get("images")
            if images and through_workers < 2 * images[0]["bytes_each_way"] * args.rounds:
                raise SystemExit(f"{name}: the workers' ports carried only {through_workers} "
                                 "bytes: the data went around the relay")
        relays.clear()
    finally:
        for client in clients.values():
            if client.proc.poll() is None:
                client.proc.kill()
        for relay in relays.values():
            relay.kill()
        stop_agent(agent)
        with zmq.Context.instance().socket(zmq.DEALER) as stopper:
            stopper.setsockopt(zmq.LINGER, 0)
            stopper.connect(f"tcp://{AGENT_HOST}:{echo_port}")
            stopper.send(b"stop")
        echo.join(5)
        if echo.is_alive():
            echo.kill()

    reference = LOCAL if LOCAL in measured["runs"] else DIRECT
    notes = check_same_results(measured["runs"], reference)
    parked = sorted({c for c, by_w in measured["runs"].items() for xs in by_w.values()
                     for x in xs if x.get("parks")})
    device = clients[DIRECT].ready["device"]
    elapsed = time.perf_counter() - started
    intro = (f"Machine: {machine()}. Took {elapsed:.0f} s. Local pycuda (when there is a GPU), "
             f"the shim straight to a harp-agent on {AGENT_HOST} (one slot per shim "
             "configuration) and the shim through bench/relay.py (every chunk delayed by the "
             "given one-way delay, each way, supervisor and worker connections alike; one "
             f"relay per delay, on {', '.join(hosts.values())}) were measured in this one run, "
             f"interleaved over {args.rounds} rounds; ports {first}-{relayed_ports[-1]} "
             f"(supervisor {supervisor_port}, echo {echo_port}, workers {worker_range}). "
             "Losses and image checksums of every run "
             + ("match" if not notes else "DIFFER: " + "; ".join(notes))
             + f" {'local pycuda' if reference == LOCAL else 'the shim without relay'}'s.")
    if parked:
        intro += (f" WARNING: the agent parked the session of {', '.join(parked)} during a "
                  "run: those figures include a restore.")
    if args.emulated:
        intro += (" EMULATED agent: no GPU, no local baseline, matmuls and the blur are "
                  "elementwise stand-ins run by NumPy on this CPU; the figures test the "
                  "plumbing and the relay, not a GPU.")
    command = ("python bench/network_delay.py" + (" --emulated" if args.emulated else "")
               + (f" --rounds {args.rounds}" if args.rounds != 5 else ""))
    report("network-delay", device, command, intro,
           tables(measured, configs, delays, args.rounds),
           {"configurations": {c: clients[c].ready for c in configs},
            "runs": compact(measured["runs"]),
            "sync_read_us_p50": {c: float(np.percentile(v, 50))
                                 for c, v in measured["sync_read_us"].items()},
            "launch_us": measured["launch_us"],
            "raw_zmq_round_trip_us": {p: {"p50": float(np.percentile(v, 50)),
                                          "p99": float(np.percentile(v, 99))}
                                      for p, v in measured["rtt_us"].items()},
            "relay_carried": carried},
           args.out)


if __name__ == "__main__":
    main()
