"""The agents of the elasticity replay: started with their metrics port, scraped, and watched.

``start_agents`` starts several ``harp-agent`` processes at once (each ``--metrics-port 0``; the
port is read from the line it prints); ``scrape`` reads one agent's Prometheus text;
``StatusWatch`` polls every agent's status while the replay runs and keeps what it saw: how many
held and waited, whether a slot ever had two holders, and the slot-seconds held by a session with
no GPU work past ``reclaim_after`` while someone waited on that agent for a slot that nothing
else was freeing.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from provisioner.lease_client import BlockingLeaseClient

REPO = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           PYTHONUNBUFFERED="1")
START_TIMEOUT_S = 120.0
#: the agents' log level (their stderr goes to a file beside the clients' logs)
LOG_LEVEL = os.environ.get("HARP_BENCH_AGENT_LOG", "")

#: the counters the replay reads, as Prometheus exposes them
COUNTERS = ("harp_reclaims_total", "harp_parks_total", "harp_restores_total",
            "harp_park_bytes_total", "harp_restore_bytes_total", "harp_gpu_seconds_held_total",
            "harp_gpu_seconds_held_idle_total")


@dataclass
class Agent:
    endpoint: str
    process: subprocess.Popen
    metrics_port: int
    slots: int
    log: Path
    device: int = 0

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def start_agents(count: int, args: list[str], logs: Path, label: str, *, executor: str,
                 devices: list[int]) -> list[Agent]:
    """``count`` agents with ``args``, started together; each on ``devices`` in turn."""
    slots = int(args[args.index("--slots") + 1]) if "--slots" in args else 1
    starting = []
    for i in range(count):
        log = logs / f"agent-{label}-{i}.log"
        device = devices[i % len(devices)]
        process = subprocess.Popen(
            [sys.executable, "-m", "gpu_agent.cli", "--listen", "tcp://127.0.0.1:0",
             "--executor", executor, "--device", str(device), "--log-level", "WARNING",
             "--metrics-port", "0", "--metrics-host", "127.0.0.1",
             *(["--log-level", LOG_LEVEL] if LOG_LEVEL else []), *args],
            env=ENV, stdout=subprocess.PIPE, stderr=log.open("w"), text=True)
        starting.append((process, log, device))
    agents = []
    try:
        for process, log, device in starting:
            agents.append(_wait_started(process, log, slots, device))
    except BaseException:
        for process, _, _ in starting:
            process.kill()
        raise
    return agents


def _wait_started(process: subprocess.Popen, log: Path, slots: int, device: int) -> Agent:
    assert process.stdout is not None
    port = None
    lines = []
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        if "metrics on http://" in line:
            port = int(line.split("http://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])
        if line.startswith("harp-agent: serving") and port is not None:
            # the agent prints nothing more on stdout; keep draining it all the same
            threading.Thread(target=process.stdout.read, daemon=True).start()
            return Agent(line.split()[2], process, port, slots, log, device)
    process.kill()
    raise SystemExit("harp-agent did not start:\n" + "".join(lines) + log.read_text())


def scrape(agent: Agent) -> dict[str, float]:
    """The agent's counters (COUNTERS) now."""
    with urllib.request.urlopen(f"http://127.0.0.1:{agent.metrics_port}/metrics",
                                timeout=10) as reply:
        text = reply.read().decode()
    values = dict.fromkeys(COUNTERS, 0.0)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in values and not sample.labels:
                values[sample.name] = float(sample.value)
    return values


def scrape_all(agents: list[Agent]) -> dict[str, float]:
    """The counters summed over ``agents``."""
    total = dict.fromkeys(COUNTERS, 0.0)
    for agent in agents:
        for name, value in scrape(agent).items():
            total[name] += value
    return total


@dataclass
class Sample:
    t: float
    agent: int
    holders: int
    queued: int
    #: sessions with a worker (opening, active, parking): what occupies slots
    occupying: int
    busy: int


@dataclass
class StatusWatch:
    """Polls the agents' status every ``every_s`` until stopped (a thread)."""

    agents: list[Agent]
    every_s: float
    #: a session idle longer than this while someone waits counts as held idle
    idle_threshold_s: float
    samples: list[Sample] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    #: slot-seconds a session with no GPU work for idle_threshold_s held while someone waited
    idle_while_waiting_s: float = 0.0
    polls: int = 0
    errors: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="elasticity-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)

    def _run(self) -> None:
        client = BlockingLeaseClient(timeout=5.0)
        endpoints = [a.endpoint for a in self.agents]
        last: float | None = None
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                try:
                    statuses = client.statuses(endpoints, 5.0)
                except Exception:
                    self.errors += 1
                    statuses = {}
                elapsed = 0.0 if last is None else min(now - last, 5 * self.every_s)
                last = now
                self.polls += 1
                for index, agent in enumerate(self.agents):
                    status = statuses.get(agent.endpoint)
                    if status is None:
                        continue
                    self._note(now, index, agent, status, elapsed)
                self._stop.wait(max(self.every_s - (time.monotonic() - now), 0.0))
        finally:
            client.close()

    def _note(self, now: float, index: int, agent: Agent, status: dict[str, Any],
              elapsed: float) -> None:
        leases = status.get("leases") or {}
        holders = leases.get("holders") or []
        queue = leases.get("queue") or []
        sessions = leases.get("sessions") or []
        occupying = [s for s in sessions if s.get("state") in ("opening", "active", "parking")]
        busy = sum(1 for s in occupying if s.get("busy"))
        self.samples.append(Sample(now, index, len(holders), len(queue), len(occupying), busy))
        kernels = [h.get("kernel_id") for h in holders]
        if len(holders) > agent.slots:
            self.violations.append(f"{agent.endpoint}: {len(holders)} holders of "
                                   f"{agent.slots} slot(s)")
        if len(set(kernels)) < len(kernels):
            self.violations.append(f"{agent.endpoint}: one kernel holds two slots: {kernels}")
        if len(occupying) > agent.slots:
            self.violations.append(f"{agent.endpoint}: {len(occupying)} sessions on the GPU "
                                   f"with {agent.slots} slot(s)")
        # waiters that no slot coming free (free, or its last tenant being parked) will serve:
        # an idle holder past the threshold counts only while one of these waits for its slot
        parking = sum(1 for s in sessions if s.get("state") == "parking")
        uncovered = len(queue) - int(leases.get("free_slots") or 0) - parking
        if uncovered > 0:
            idle = sum(1 for s in occupying if s.get("state") == "active" and not s.get("busy")
                       and float(s.get("idle_s") or 0) > self.idle_threshold_s)
            self.idle_while_waiting_s += min(idle, uncovered) * elapsed
