"""Notebook workloads over a network with a delay: local pycuda vs the shim through a delay relay.

    python bench/network_delay.py [--emulated] [--delays-us 0,50,250,1000] [--out FILE.md]

One run: a local ``harp-agent`` listens on 127.0.0.2 (supervisor and, with ``--worker-ports``,
every worker); ``bench/relay.py`` forwards the same port numbers on 127.0.0.1 to it, adding a
one-way delay to every chunk each way; the workloads of ``bench/notebook_workloads.py`` run with
local pycuda (the baseline; none with ``--emulated``), through the shim straight to the agent
(no relay), and through the shim via the relay at each delay. A raw pyzmq round trip, direct
and through the relay at each delay, says what the relay itself adds.

How the data connection goes through the relay: the agent's workers bind 127.0.0.2 and the
agent advertises them at 127.0.0.1 (``--worker-host 127.0.0.2 --worker-advertise 127.0.0.1``),
where the relay listens on the same port numbers; the driver checks from the relay's counters
that the worker ports carried the data. The no-relay column uses a second agent, started
without ``--worker-advertise``. (``notebook_workloads.py --worker-host-map`` does the same from
the client's side, for an agent without ``--worker-advertise``.)
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import socket
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

AGENT_HOST, RELAY_HOST = "127.0.0.2", "127.0.0.1"
WORKER_PORTS = 16


def free_port_block(count: int, start: int = 47100) -> int:
    """The first port of ``count`` consecutive ports free on both loopback addresses."""
    port = start
    while port + count < 65000:
        try:
            probes = []
            for p in range(port, port + count):
                for host in (AGENT_HOST, RELAY_HOST):
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


def zmq_round_trip_us(endpoint: str, samples: int = 1500) -> dict[str, float]:
    """p50/p99 of a small DEALER->ROUTER request/reply, as bench/raw_zmq.py measures it."""
    context = zmq.Context.instance()
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(endpoint)
    dealer.send(b"ping")
    if not dealer.poll(10_000):
        raise SystemExit(f"no echo from {endpoint}")
    dealer.recv()
    times = []
    for _ in range(samples):
        start = time.perf_counter()
        dealer.send(b"ping")
        dealer.recv()
        times.append((time.perf_counter() - start) * 1e6)
    dealer.close()
    kept = times[samples // 10:]
    return {"p50": float(np.percentile(kept, 50)), "p99": float(np.percentile(kept, 99))}


def start_agent(emulated: bool, supervisor_port: int, worker_ports: str,
                advertise: str | None) -> subprocess.Popen:
    """A harp-agent on AGENT_HOST; its workers advertised at ``advertise`` when given."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpu_agent.cli", "--listen",
         f"tcp://{AGENT_HOST}:{supervisor_port}", "--worker-host", AGENT_HOST,
         "--worker-ports", worker_ports, "--log-level", "WARNING",
         "--executor", "emulated" if emulated else "pycuda",
         *(["--worker-advertise", advertise] if advertise else [])],
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


class RelayProcess:
    """bench/relay.py in its own process (its threads never share the client's GIL)."""

    def __init__(self, delay_us: float, ports: list[int]) -> None:
        forwards = [f"--forward={RELAY_HOST}:{p}={AGENT_HOST}:{p}" for p in ports]
        self.ports = ports
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


def run_workloads(mode: str, *extra: str, timeout: float = 900) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    try:
        proc = subprocess.run([sys.executable, str(HERE / "notebook_workloads.py"), mode, out,
                               *extra], env=ENV, capture_output=True, text=True,
                              timeout=timeout)
        if proc.returncode != 0:
            raise SystemExit(f"notebook_workloads {mode} {extra} failed:\n{proc.stdout}\n"
                             f"{proc.stderr}")
        return json.loads(Path(out).read_text())
    finally:
        os.unlink(out)


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


WORKLOAD_ROWS = (
    ("train_sync_1024", "training loop, matmul-bound (1024), loss .get() every 10 steps"),
    ("train_device_loss_1024", "  same, advisor's rewrite: loss kept on device, one read"),
    ("train_sync_256", "training loop, launch-bound (256), loss .get() every 10 steps"),
    ("train_device_loss_256", "  same, advisor's rewrite: loss kept on device, one read"),
    ("images", "image pipeline, 2 streams, events per batch of 8 frames"),
)


def tables(local: dict[str, Any], direct: dict[str, Any], delayed: dict[float, dict[str, Any]],
           rtt: dict[str, Any]) -> list[str]:
    delays = sorted(delayed)
    base_name = "local pycuda" if local else "shim, no relay"
    base = local or direct
    head = " | ".join(f"+{d:g} µs each way" for d in delays)
    lines = [
        f"Wall time of each workload (median of 3 after a warm-up) as a ratio to **{base_name}**"
        " (seconds in brackets); sync points = the times the notebook waits for the GPU.",
        "",
        f"| workload | sync points | {base_name} (s) | shim, no relay | {head} |",
        "|---|---|---|---|" + "---|" * len(delays),
    ]
    for key, label in WORKLOAD_ROWS:
        if key not in direct:
            continue
        b = base[key]["s"]

        def cell(result: dict[str, Any], k: str = key, b: float = b) -> str:
            return f"{result[k]['s'] / b:.2f}x ({result[k]['s']:.3f})"

        lines.append(f"| {label} | {direct[key]['sync_points']} | {b:.3f} | {cell(direct)} | "
                     + " | ".join(cell(delayed[d]) for d in delays) + " |")
    lines += [
        "",
        "What each delay added per sync point, (t(delay) - t(+0 µs)) / sync points, in ms, "
        "next to the round trip the delay adds (2 x delay):",
        "",
        "| workload | " + " | ".join(f"+{d:g} µs (2x = {2 * d / 1000:g} ms)" for d in delays[1:])
        + " |",
        "|---|" + "---|" * len(delays[1:]),
    ]
    if delays and delays[0] == 0:
        zero = delayed[0]
        for key, label in WORKLOAD_ROWS:
            if key not in direct:
                continue
            n = direct[key]["sync_points"]
            lines.append(f"| {label.strip()} | " + " | ".join(
                f"{(delayed[d][key]['s'] - zero[key]['s']) / n * 1e3:.2f}"
                for d in delays[1:]) + " |")
    lines += [
        "",
        "Round trips (p50 µs; p99 in brackets):",
        "",
        f"| measure | local | no relay | {head} |",
        "|---|---|---|" + "---|" * len(delays),
        f"| raw pyzmq round trip | | {rtt['direct']['p50']:.1f} ({rtt['direct']['p99']:.1f}) | "
        + " | ".join(f"{rtt[d]['p50']:.1f} ({rtt[d]['p99']:.1f})" for d in delays) + " |",
        f"| shim 4-byte sync read | "
        f"{local['sync_read_p50_us']:.1f} | " if local else "| shim 4-byte sync read | | ",
    ]
    lines[-1] += (f"{direct['sync_read_p50_us']:.1f} | "
                  + " | ".join(f"{delayed[d]['sync_read_p50_us']:.1f}" for d in delays) + " |")
    if "launch_us" in direct:
        lines.append(f"| shim small-kernel launch, async (µs each) | {local['launch_us']:.2f} | "
                     f"{direct['launch_us']:.2f} | "
                     + " | ".join(f"{delayed[d]['launch_us']:.2f}" for d in delays) + " |")
    if 0 in rtt:
        lines += ["", f"The relay's own cost at +0 µs: {rtt[0]['p50'] - rtt['direct']['p50']:.1f}"
                  " µs per raw round trip (p50, through the relay minus direct; two relay hops"
                  " per round trip)."]
    return lines


def check_same_results(reference: dict[str, Any], other: dict[str, Any], what: str) -> list[str]:
    """Notes where the shim's losses or checksum differ from the reference's."""
    notes = []
    for key, _label in WORKLOAD_ROWS:
        if key not in reference or key not in other:
            continue
        a, b = reference[key], other[key]
        if "losses" in a and not np.allclose(a["losses"], b["losses"], rtol=1e-3):
            notes.append(f"{what}: {key} losses differ from the reference")
        if "checksum" in a and not np.isclose(a["checksum"], b["checksum"], rtol=1e-5):
            notes.append(f"{what}: {key} checksum differs from the reference")
    return notes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--emulated", action="store_true",
                        help="smoke run against an emulated agent (no GPU, no local baseline)")
    parser.add_argument("--delays-us", default="0,50,250,1000",
                        help="one-way delays to add, microseconds, comma-separated")
    parser.add_argument("--out", help="Markdown file to write (default bench/results/...)")
    args = parser.parse_args()
    delays = [float(d) for d in args.delays_us.split(",")]

    first = free_port_block(WORKER_PORTS + 2)
    supervisor_port, echo_port = first, first + 1
    worker_first = first + 2
    worker_range = f"{worker_first}-{worker_first + WORKER_PORTS - 1}"
    relayed_ports = [supervisor_port, echo_port,
                     *range(worker_first, worker_first + WORKER_PORTS)]

    echo = multiprocessing.Process(target=echo_server,
                                   args=(f"tcp://{AGENT_HOST}:{echo_port}",), daemon=True)
    echo.start()
    agent = start_agent(args.emulated, supervisor_port, worker_range, advertise=None)
    relay: RelayProcess | None = None
    rtt: dict[Any, dict[str, float]] = {}
    delayed: dict[float, dict[str, Any]] = {}
    carried: dict[float, list[dict[str, Any]]] = {}
    try:
        rtt["direct"] = zmq_round_trip_us(f"tcp://{AGENT_HOST}:{echo_port}")
        local = {} if args.emulated else run_workloads("local")
        direct = run_workloads("shim", f"tcp://{AGENT_HOST}:{supervisor_port}")
        stop_agent(agent)
        agent = start_agent(args.emulated, supervisor_port, worker_range, advertise=RELAY_HOST)
        for delay in delays:
            relay = RelayProcess(delay, relayed_ports)
            rtt[delay] = zmq_round_trip_us(f"tcp://{RELAY_HOST}:{echo_port}")
            delayed[delay] = run_workloads("shim", f"tcp://{RELAY_HOST}:{supervisor_port}")
            carried[delay] = [f for f in relay.stop() if f["connections"]]
            relay = None
            through_workers = sum(f["bytes_to_target"] + f["bytes_from_target"]
                                  for f in carried[delay]
                                  if int(f["listen"].rpartition(":")[2]) >= worker_first)
            if through_workers < 2 * delayed[delay]["images"]["bytes_each_way"]:
                raise SystemExit(f"+{delay} µs: the workers' ports carried only "
                                 f"{through_workers} bytes: the data went around the relay")
    finally:
        if relay is not None:
            relay.kill()
        stop_agent(agent)
        with zmq.Context.instance().socket(zmq.DEALER) as stopper:
            stopper.setsockopt(zmq.LINGER, 0)
            stopper.connect(f"tcp://{AGENT_HOST}:{echo_port}")
            stopper.send(b"stop")
        echo.join(5)
        if echo.is_alive():
            echo.kill()

    notes = check_same_results(local or direct, direct, "shim, no relay")
    for delay in delays:
        notes += check_same_results(local or direct, delayed[delay], f"+{delay:g} µs")
    intro = (f"Machine: {machine()}. Local pycuda (when there is a GPU), the shim straight to a "
             f"harp-agent on {AGENT_HOST} and the shim through bench/relay.py on {RELAY_HOST} "
             "(every chunk delayed by the given one-way delay, each way, supervisor and "
             "worker connections alike) were measured in this one run. Losses and image "
             "checksums of every shim run "
             + ("match" if not notes else "DIFFER: " + "; ".join(notes))
             + f" {'local pycuda' if local else 'the shim without relay'}.")
    if args.emulated:
        intro += (" EMULATED agent: no GPU, no local baseline, matmuls and the blur are "
                  "elementwise stand-ins run by NumPy on this CPU; the figures test the "
                  "plumbing and the relay, not a GPU.")
    report("network-delay", direct["device"],
           "python bench/network_delay.py" + (" --emulated" if args.emulated else ""),
           intro, tables(local, direct, delayed, rtt),
           {"local": local, "shim_no_relay": direct,
            "shim_delayed": {str(d): r for d, r in delayed.items()},
            "raw_zmq_round_trip_us": {str(k): v for k, v in rtt.items()},
            "relay_carried": {str(d): c for d, c in carried.items()}},
           args.out)


if __name__ == "__main__":
    main()
