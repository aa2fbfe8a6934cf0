"""Elasticity benchmark (issue 11): how many notebooks a GPU serves, replayed with real clients.

    python bench/elasticity.py [--executor pycuda|emulated] [--agents M] [--sessions N]
        [--duty 0.1] [--duration S] [--slots 4] [--seed 0] [--quick] [--out FILE.md]

N notebook sessions, each a real shim client process (``harp run bench/elasticity_session.py``:
the shim active, the lease kept by the same keeper a kernel without a provisioner uses), replay
seeded traces (bench/elasticity_trace.py: heavy-tailed think times, bursts of real GPU work sized
by a calibration on a dedicated agent, device memory per session from MiB to GiB) against four
policies, each on agents of its own, with the same traces:

1. ``dedicated``: one agent per notebook, held all along (today's practice, no sharing);
2. ``idle-timeout``: M agents, reclaim off (``--reclaim-after`` huge), each kernel's lease
   released after the keeper's idle timeout (today's 60 s, scaled with the trace);
3. ``reclaim``: M agents, reclaim on demand, one lease per GPU;
4. ``reclaim+slots``: M agents, reclaim on demand, ``--slots`` leases per GPU.

It prints a Markdown table against ARCHITECTURE.md section 7 (bench/forwarding.py's ``report``),
and writes it and a PNG plot (waits, slowdowns, per-agent utilisation over time) to
bench/results/. Every figure is measured in this one run: a burst's slowdown is its completion
time (from the moment it wanted the GPU) over the time the same burst class took alone on the
dedicated calibration agent.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from elasticity_policies import (  # noqa: E402
    POLICIES,
    TARGET_WAIT_P95_S,
    TITLES,
    slowdown_target,
)
from elasticity_pool import ENV, Agent, StatusWatch, scrape_all, start_agents  # noqa: E402
from elasticity_trace import (  # noqa: E402
    GiB,
    MiB,
    TraceConfig,
    burst_classes,
    make_traces,
    percentile,
)
from forwarding import report  # noqa: E402

SESSION_SCRIPT = HERE / "elasticity_session.py"
#: keep the agents' and clients' logs even when nothing failed (HARP_BENCH_KEEP=1)
KEEP_LOGS = os.environ.get("HARP_BENCH_KEEP", "") not in ("", "0")
#: the keeper's idle timeout and the agent's reclaim_after by default, for 1 s bursts
IDLE_TIMEOUT_S = 60.0
RECLAIM_AFTER_S = 3.0
#: reclaim off: longer than any replay
NEVER_S = 1e9


@dataclass
class Options:
    executor: str
    agents: int
    sessions: int
    duty: float
    duration_s: float
    burst_s: float
    slots: int
    seed: int
    reclaim_after_s: float
    idle_timeout_s: float
    memory_min: int
    memory_max: int
    scratch_elems: int
    devices: list[int]
    policies: list[str]
    concurrent: bool
    poll_s: float
    grace_s: float
    plot: bool
    command: str


@dataclass
class Client:
    session: int
    process: subprocess.Popen
    out: Path
    log: Path
    ready: threading.Event = field(default_factory=threading.Event)
    lines: list[str] = field(default_factory=list)

    def read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)
            if line.strip() == "ready":
                self.ready.set()


def start_client(mode: str, spec: dict[str, Any], endpoints: list[str], env: dict[str, str],
                 work: Path, name: str, session: int = 0) -> Client:
    """A shim client process, as ``harp run`` starts a script."""
    spec_path, out = work / f"{name}.spec.json", work / f"{name}.out.json"
    spec_path.write_text(json.dumps(spec))
    log = work / f"{name}.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "harp_jupyter.cli", "run", "--agents", ",".join(endpoints),
         str(SESSION_SCRIPT), mode, str(spec_path), str(out)],
        env={**ENV, **env}, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=log.open("w"), text=True)
    client = Client(session, process, out, log)
    threading.Thread(target=client.read, daemon=True).start()
    return client


def client_env(reclaim_after_s: float) -> dict[str, str]:
    return {"HARP_RECLAIM_AFTER": repr(reclaim_after_s), "HARP_AGENT_TIMEOUT": "60"}


def calibrate(opts: Options, agent: Agent, work: Path) -> dict[str, Any]:
    """Size the burst classes and time each alone, on a dedicated agent nobody else uses."""
    spec = {"scratch_elems": opts.scratch_elems, "classes_s": burst_classes(opts.burst_s),
            "calibrate_s": max(0.5, opts.burst_s), "repeats": 3}
    client = start_client("calibrate", spec, [agent.endpoint], client_env(NEVER_S), work,
                          "calibrate")
    try:
        client.process.wait(600)
    except subprocess.TimeoutExpired:
        client.process.kill()
        raise SystemExit("the calibration did not finish within 600 s") from None
    result = json.loads(client.out.read_text()) if client.out.exists() else {}
    if "error" in result or "alone_s" not in result:
        raise SystemExit(f"calibration failed: {result.get('traceback') or result}\n"
                         + client.log.read_text()[-3000:])
    return result


class PolicyRun:
    """One policy: its agents, its clients, what they measured."""

    def __init__(self, name: str, opts: Options) -> None:
        self.name = name
        self.opts = opts
        self.agents: list[Agent] = []
        self.clients: list[Client] = []
        self.results: list[dict[str, Any]] = []
        self.watch: StatusWatch | None = None
        self.metrics: dict[str, dict[str, float]] = {}
        self.t0 = 0.0
        self.finished_at = 0.0
        dedicated = name == "dedicated"
        self.agent_count = opts.sessions if dedicated else opts.agents
        self.slots = opts.slots if name == "reclaim+slots" else 1
        reclaim = name in ("reclaim", "reclaim+slots")
        self.reclaim_after_s = opts.reclaim_after_s if reclaim else NEVER_S
        self.idle_timeout_s = opts.idle_timeout_s if name == "idle-timeout" else None
        self.agent_args = ["--slots", str(self.slots),
                           "--reclaim-after", repr(self.reclaim_after_s)]
        if opts.executor == "emulated":
            # a slot's share of the emulated GPU must hold the largest session, as an H200's
            # 139 GiB hold 2 GiB sessions in any of 4 slots
            memory = max(4 * GiB, 2 * self.slots * opts.memory_max)
            self.agent_args += ["--emulated-memory", str(memory)]

    @property
    def gpus(self) -> int:
        return self.agent_count

    def start_agents(self, logs: Path) -> None:
        self.agents = start_agents(self.agent_count, self.agent_args, logs, self.name,
                                   executor=self.opts.executor, devices=self.opts.devices)

    def start_clients(self, traces: list[dict[str, Any]], n_ops: list[int], work: Path) -> None:
        opts = self.opts
        self.metrics["boot"] = scrape_all(self.agents)
        for trace in traces:
            index = trace["index"]
            endpoints = ([self.agents[index].endpoint] if self.name == "dedicated"
                         else [a.endpoint for a in self.agents])
            spec = {"trace": trace, "n_ops": n_ops, "scratch_elems": opts.scratch_elems,
                    "duration_s": opts.duration_s, "hard_stop_s": opts.duration_s + opts.grace_s,
                    "verify_timeout_s": opts.grace_s + 60.0,
                    "idle_timeout": self.idle_timeout_s,
                    # the idle-timeout policy starts parked; with reclaim a %harp release
                    # could race the agent's own park (README of the report)
                    "release_after_setup": self.name == "idle-timeout"}
            self.clients.append(start_client("replay", spec, endpoints,
                                             client_env(self.reclaim_after_s), work,
                                             f"{self.name}-{index}", index))

    def wait_ready(self, deadline: float) -> None:
        """Wait until every session has set up; one that failed (its result says why) is left
        out of the replay and counts as a session whose data were not intact."""
        for client in self.clients:
            while not client.ready.wait(0.2):
                if client.process.poll() is not None:
                    print(f"elasticity: {self.name}: session {client.session} failed its set-up"
                          f" (see the table's errors)", flush=True)
                    break
                if time.monotonic() > deadline:
                    client.process.kill()
                    break

    def go(self, t0: float) -> None:
        self.t0 = t0
        self.metrics["start"] = scrape_all(self.agents)
        threshold = self.opts.reclaim_after_s
        self.watch = StatusWatch(self.agents, self.opts.poll_s, threshold)
        self.watch.start()
        for client in self.clients:
            if client.process.poll() is None:
                assert client.process.stdin is not None
                client.process.stdin.write(f"go {t0!r}\n")
                client.process.stdin.flush()

    def poll(self, now: float) -> bool:
        """Scrape the window's end once; True once every client has exited."""
        if "window" not in self.metrics and now >= self.t0 + self.opts.duration_s:
            self.metrics["window"] = scrape_all(self.agents)
        done = all(c.process.poll() is not None for c in self.clients)
        if done and not self.finished_at:
            self.finished_at = now
        return done

    def finish(self) -> None:
        assert self.watch is not None
        self.watch.stop()
        if "window" not in self.metrics:
            self.metrics["window"] = scrape_all(self.agents)
        self.metrics["end"] = scrape_all(self.agents)
        for client in self.clients:
            if client.process.poll() is None:
                client.process.kill()
                client.process.wait(10)
            try:
                result = json.loads(client.out.read_text())
            except (OSError, ValueError):
                result = {"error": f"no result (exit code {client.process.returncode})"}
            log = client.log.read_text()
            result["reclaim_notices"] = log.count("parked while idle because another")
            if "error" in result:
                result["log_tail"] = log[-2000:]
            result.setdefault("session", client.session)
            self.results.append(result)
        for agent in self.agents:
            agent.stop()

    def kill(self) -> None:
        for client in self.clients:
            if client.process.poll() is None:
                client.process.kill()
        for agent in self.agents:
            agent.stop()
        if self.watch is not None:
            self.watch.stop()


# {{{ the figures


def bursts_of(run: PolicyRun) -> list[dict[str, Any]]:
    return [b | {"session": r.get("session")} for r in run.results for b in r.get("bursts", [])]


def max_overlap(run: PolicyRun) -> dict[str, int]:
    """Per agent, the most bursts that ran at once as the clients saw them (granted..done).

    A burst whose session was parked inside it (reclaimed while it stalled between two calls)
    did not hold its slot from granted to done, so it is left out here; the agents' own status
    polls (``max_holders_per_slot``) still see every holder."""
    events: dict[str, list[tuple[float, int]]] = {}
    for b in bursts_of(run):
        if b.get("parked_inside"):
            continue
        events.setdefault(b["agent"], []).extend([(b["t_granted"], 1), (b["t_done"], -1)])
    most = {}
    for agent, marks in events.items():
        level = peak = 0
        for _, step in sorted(marks, key=lambda m: (m[0], m[1])):
            level += step
            peak = max(peak, level)
        most[agent] = peak
    return most


def utilisation(run: PolicyRun, bins: int = 60) -> dict[str, list[float]]:
    """Per agent, the share of each time bin in which at least one burst ran on it."""
    span = run.opts.duration_s
    width = span / bins
    by_agent: dict[str, list[tuple[float, float]]] = {a.endpoint: [] for a in run.agents}
    for b in bursts_of(run):
        by_agent.setdefault(b["agent"], []).append((b["t_granted"] - run.t0,
                                                     b["t_done"] - run.t0))
    out = {}
    for agent, intervals in by_agent.items():
        merged: list[list[float]] = []
        for start, end in sorted(intervals):
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        shares = []
        for i in range(bins):
            lo, hi = i * width, (i + 1) * width
            busy = sum(max(0.0, min(hi, e) - max(lo, s)) for s, e in merged)
            shares.append(busy / width)
        out[agent] = shares
    return out


def summarise(run: PolicyRun, calib: dict[str, Any]) -> dict[str, Any]:
    opts = run.opts
    alone = calib["alone_s"]
    bursts = bursts_of(run)
    censored = [c for r in run.results for c in r.get("censored", [])]
    waits = [b["t_granted"] - b["t_want"] for b in bursts]
    slowdowns = [(b["t_done"] - b["t_want"]) / alone[b["size_class"]] for b in bursts]
    # a burst still waiting at the hard stop counts with what it had waited (a lower bound)
    all_waits = waits + [c["waited_s"] for c in censored]
    restores = [b["restore_s"] for b in bursts if b["restored"]]

    def delta(key: str, frm: str = "start", to: str = "window") -> float:
        return run.metrics[to][key] - run.metrics[frm][key]

    per_hour = 3600.0 / opts.duration_s
    intact = sum(1 for r in run.results if r.get("verified") and not r.get("checks_failed")
                 and "error" not in r)
    gpu_s = opts.duration_s * run.gpus * run.slots
    assert run.watch is not None
    overlap = max_overlap(run)
    return {
        "policy": run.name, "agents": run.gpus, "slots": run.slots,
        "sessions": opts.sessions,
        "sessions_per_gpu": opts.sessions / run.gpus,
        "reclaim_after_s": None if run.reclaim_after_s >= NEVER_S else run.reclaim_after_s,
        "idle_timeout_s": run.idle_timeout_s,
        "bursts": len(bursts), "censored": len(censored),
        "sessions_censored": sorted({r["session"] for r in run.results if r.get("censored")}),
        "sessions_without_burst": sorted(r["session"] for r in run.results
                                         if not r.get("bursts")),
        "wait_s": {q: percentile(all_waits, q) for q in (50, 95, 99, 100)},
        "slowdown": {q: percentile(slowdowns + [c["waited_s"] / alone[0] for c in censored], q)
                     for q in (50, 95, 99)},
        "restore_s_p50": percentile(restores, 50), "restores_in_bursts": len(restores),
        "lease_retries": sum(b["lease_retries"] for b in bursts),
        "dropped_by_reclaim": sum(b.get("dropped_by_reclaim", 0) for b in bursts),
        "setups_redone": sum(r.get("setups_redone", 0) for r in run.results),
        "idle_held_while_waiting_metric_s": delta("harp_gpu_seconds_held_idle_total", to="end"),
        "idle_held_while_waiting_polled_s": run.watch.idle_while_waiting_s,
        "gpu_seconds_held": delta("harp_gpu_seconds_held_total"),
        "gpu_busy_share": sum(b["t_done"] - b["t_granted"] for b in bursts) / gpu_s,
        "reclaims": delta("harp_reclaims_total", frm="boot", to="end"),
        "reclaim_notices": sum(r.get("reclaim_notices", 0) for r in run.results),
        "parked_gib_per_hour": delta("harp_park_bytes_total") / GiB * per_hour,
        "restored_gib_per_hour": delta("harp_restore_bytes_total") / GiB * per_hour,
        "parks": delta("harp_parks_total", frm="boot", to="end"),
        "restores": delta("harp_restores_total", frm="boot", to="end"),
        "status_polls": run.watch.polls, "status_errors": run.watch.errors,
        "max_holders_per_slot": max((s.holders / run.slots for s in run.watch.samples),
                                    default=0.0),
        "max_sessions_on_gpu": max((s.occupying for s in run.watch.samples), default=0),
        "max_queued": max((s.queued for s in run.watch.samples), default=0),
        "slot_violations": run.watch.violations[:10],
        "max_bursts_at_once_per_agent": max(overlap.values(), default=0),
        "sessions_intact": intact,
        "errors": [{"session": r.get("session"), "error": r.get("error"),
                    "checks_failed": r.get("checks_failed"), "log": r.get("log_tail")}
                   for r in run.results if "error" in r or r.get("checks_failed")
                   or not r.get("verified")],
        "replay_wall_s": run.finished_at - run.t0,
    }


# }}}

# {{{ the table


def fmt(value: float | None, digits: int = 2, unit: str = "") -> str:
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:.0f}{unit}"
    return f"{value:.{digits}f}{unit}"


def table(summaries: list[dict[str, Any]], opts: Options) -> list[str]:
    target_slow = slowdown_target(opts.duty)
    names = [TITLES[s["policy"]] for s in summaries]
    lines = ["| measure | " + " | ".join(names) + " | target |",
             "|---|" + "---|" * len(summaries) + "---|"]

    def add(what: str, cells: list[str], target: str = "") -> None:
        lines.append(f"| {what} | " + " | ".join(cells) + f" | {target} |")

    def lower(s: dict[str, Any]) -> str:
        return "≥ " if s["censored"] else ""

    add("agents x slots (sessions per GPU)",
        [f"{s['agents']} x {s['slots']} ({s['sessions_per_gpu']:.0f})" for s in summaries],
        f"{opts.sessions // max(opts.agents, 1)} per GPU")
    add("reclaim_after / keeper idle timeout (s)",
        [f"{fmt(s['reclaim_after_s'])} / {fmt(s['idle_timeout_s'])}" for s in summaries])
    add("bursts run (still waiting at the end)",
        [f"{s['bursts']} ({s['censored']})" for s in summaries], "none waiting")
    for q, label in ((50, "p50"), (95, "p95"), (99, "p99"), (100, "max")):
        add(f"lease wait {label} (s)",
            [lower(s) + fmt(s["wait_s"][q], 3) for s in summaries],
            f"≤ {TARGET_WAIT_P95_S:g} s" if q == 95 else "")
    for q in (50, 95):
        add(f"burst slowdown p{q} (completion / alone)",
            [lower(s) + fmt(s["slowdown"][q], 2, "x") for s in summaries],
            f"≤ {target_slow:g}x" if q == 95 else "")
    add("restore inside a burst's wait, p50 (s)", [fmt(s["restore_s_p50"], 3) for s in summaries])
    add("GPU-s held idle past reclaim_after while someone waited (agents' metric)",
        [fmt(s["idle_held_while_waiting_metric_s"], 1) for s in summaries], "0")
    add(f"GPU-s held idle > {opts.reclaim_after_s:g} s while someone waited (status polls)",
        [fmt(s["idle_held_while_waiting_polled_s"], 1) for s in summaries], "reported")
    add("reclaims, set-up included (notices the reclaimed scripts printed)",
        [f"{s['reclaims']:.0f} ({s['reclaim_notices']})" for s in summaries])
    add("parked / restored per hour (GiB)",
        [f"{fmt(s['parked_gib_per_hour'], 1)} / {fmt(s['restored_gib_per_hour'], 1)}"
         for s in summaries])
    add("GPU busy share (bursts' time / slot-time)",
        [f"{100 * s['gpu_busy_share']:.0f}%" for s in summaries])
    add("calls that met a lease the agent had just ended (LeaseLostError): a burst's first "
        "call / later calls (run again) / setups started over",
        [f"{s['lease_retries']} / {s['dropped_by_reclaim']} / {s['setups_redone']}"
         for s in summaries], "0 / 0 / 0")
    add("most holders of one slot / bursts at once on one agent (status polls, clients)",
        [f"{s['max_holders_per_slot']:.0f} / {s['max_bursts_at_once_per_agent']}"
         for s in summaries], "≤ 1 / ≤ slots")
    add("sessions whose data were intact after every burst and at the end",
        [f"{s['sessions_intact']} / {s['sessions']}" for s in summaries], "all")
    verdicts = []
    for s in summaries:
        misses = []
        if s["censored"] or (s["wait_s"][95] or 0) > TARGET_WAIT_P95_S:
            misses.append("wait")
        if s["censored"] or (s["slowdown"][95] or 0) > target_slow:
            misses.append("slowdown")
        if s["idle_held_while_waiting_metric_s"] > 0.05 or (
                s["reclaim_after_s"] is None and s["idle_held_while_waiting_polled_s"] > 0.05):
            misses.append("idle held")
        if s["sessions_intact"] != s["sessions"] or s["slot_violations"]:
            misses.append("state")
        verdicts.append("PASS" if not misses else "MISS (" + ", ".join(misses) + ")")
    add("against the targets", verdicts)
    return lines


# }}}


def run_policies(runs: list[PolicyRun], traces: list[dict[str, Any]], n_ops: list[int],
                 work: Path) -> None:
    """Start the clients of ``runs`` together, replay, and collect."""
    opts = runs[0].opts
    for run in runs:
        run.start_clients(traces, n_ops, work)
    deadline = time.monotonic() + 300 + opts.sessions * 5
    for run in runs:
        run.wait_ready(deadline)
    t0 = time.monotonic() + 0.5
    for run in runs:
        run.go(t0)
    end = t0 + opts.duration_s + 2 * opts.grace_s + 180
    pending = list(runs)
    while pending and time.monotonic() < end:
        now = time.monotonic()
        pending = [run for run in pending if not run.poll(now)]
        time.sleep(0.1)
    for run in runs:
        run.poll(time.monotonic())
        run.finish()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    opts, out = parse(argv)
    work = Path(tempfile.mkdtemp(prefix="harp-elasticity-"))
    config = TraceConfig(opts.sessions, opts.duty, opts.duration_s, opts.burst_s,
                         opts.memory_min, opts.memory_max, opts.seed)
    traces = [t.to_json() for t in make_traces(config)]
    runs = [PolicyRun(name, opts) for name in opts.policies]
    started = time.monotonic()
    try:
        if opts.concurrent:  # every agent starts at once: the start-up is most of a quick run
            threads = [threading.Thread(target=run.start_agents, args=(work,)) for run in runs]
            for thread in threads:
                thread.start()
        calibration_agent = start_agents(1, ["--slots", "1"], work, "calibration",
                                         executor=opts.executor, devices=opts.devices)[0]
        if opts.concurrent:
            for thread in threads:
                thread.join()
            missing = [run.name for run in runs if len(run.agents) != run.agent_count]
            if missing:
                raise SystemExit(f"the agents of {', '.join(missing)} did not start")
        try:
            calib = calibrate(opts, calibration_agent, work)
        finally:
            calibration_agent.stop()
        print(f"elasticity: calibrated on {calib['device']}: {calib['per_op_s'] * 1e6:.1f} µs "
              f"per operation; classes {[round(x, 3) for x in calib['alone_s']]} s alone",
              flush=True)
        groups = [runs] if opts.concurrent else [[run] for run in runs]
        for group in groups:
            for run in group:
                if not run.agents:
                    run.start_agents(work)
            print(f"elasticity: replaying {', '.join(r.name for r in group)} "
                  f"({opts.duration_s:g} s)...", flush=True)
            run_policies(group, traces, calib["n_ops"], work)
    except BaseException:
        for run in runs:
            run.kill()
        raise
    summaries = [summarise(run, calib) for run in runs]
    emulated = bool(calib["emulated"])
    device = ("emulated" if emulated else calib["device"])
    raw = {"options": {k: v for k, v in vars(opts).items() if k != "command"},
           "calibration": calib, "summaries": summaries,
           "wall_s": time.monotonic() - started}
    stem = out or default_out(opts, emulated, calib["device"])
    plot_path = Path(stem).with_suffix(".png")
    plotted = False
    if opts.plot:
        try:
            from elasticity_plot import plot
        except ImportError as e:  # matplotlib is the bench extra's
            print(f"elasticity: no plot ({e}); pip install -e '.[bench]'", flush=True)
        else:
            plot(runs, utilisation, bursts_of, calib, opts, plot_path, emulated)
            plotted = True
    if any(s["errors"] for s in summaries) or KEEP_LOGS:
        print(f"elasticity: the logs are kept in {work}", flush=True)
    else:
        shutil.rmtree(work, ignore_errors=True)
    report("elasticity", f"{device}" + (" (EMULATED: NumPy on the CPU, no GPU)" if emulated
                                         else f" ({describe_gpus(opts)})"),
           opts.command, intro(opts, calib, emulated, plot_path if plotted else None),
           table(summaries, opts), raw, str(stem))
    return raw


def describe_gpus(opts: Options) -> str:
    devices = sorted(set(opts.devices))
    return (f"{len(devices)} physical GPU(s) {devices}: every policy's agents share them "
            "(several agents on one GPU, each agent standing for one GPU)")


def intro(opts: Options, calib: dict[str, Any], emulated: bool, plot: Path | None) -> str:
    where = ("EMULATED run: the agents' executor is NumPy on this machine's CPUs, so a burst is "
             "CPU work and the figures show the lease machinery (waits, hand-overs, parks), not "
             "a GPU's speed. " if emulated else
             f"Agents on {describe_gpus(opts)}. ")
    order = ("The policies ran at the same time, each on agents of its own (--concurrent). "
             if opts.concurrent else "The policies ran one after another in this run. ")
    return (
        where + order +
        f"{opts.sessions} sessions replayed {opts.duration_s:g} s of seeded traces (seed "
        f"{opts.seed}) at {100 * opts.duty:g}% GPU duty: mean burst {opts.burst_s:g} s, "
        "heavy-tailed think times (lognormal, mean "
        f"{opts.burst_s * (1 - opts.duty) / opts.duty:.3g} s), device memory per session "
        f"{opts.memory_min / MiB:g} MiB to "
        f"{opts.memory_max / MiB:g} MiB. Each session is a real shim client (`harp run`), "
        "leasing through the lease keeper; it checks its data's sum and ends after every burst "
        "and every element at the end. Bursts are in-place gpuarray operations on a "
        f"{opts.scratch_elems * 4 / MiB:g} MiB array, sized by a calibration on a dedicated agent "
        f"({calib['per_op_s'] * 1e6:.1f} µs per operation there); a burst's slowdown is its time "
        "from wanting the GPU to done over the same burst class alone on that agent "
        f"({', '.join(f'{x:.3g}' for x in calib['alone_s'])} s). Waits run from wanting the GPU "
        "to the first reply on a held lease (acquire, queue, restore). reclaim_after "
        f"{opts.reclaim_after_s:g} s and the keeper's idle timeout {opts.idle_timeout_s:g} s "
        "scale with the mean burst (3 s and 60 s for 1 s bursts). '≥': some bursts were still "
        "waiting at the end and count with what they had waited. The agents' idle metric counts "
        "idle time past each lease's reclaim_after only, so it is blind to the idle-timeout "
        "policy (reclaim off); the status-poll row applies one threshold to all."
        + (f" Plot: `{plot.name}`." if plot else ""))


def default_out(opts: Options, emulated: bool, device: str) -> str:
    slug = "emulated" if emulated else re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")
    return str(HERE / "results" / f"elasticity-{slug}-n{opts.sessions}-m{opts.agents}-"
                                  f"duty{round(opts.duty * 100)}.md")


def parse(argv: list[str] | None) -> tuple[Options, str | None]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--executor", choices=["pycuda", "emulated"], default="pycuda")
    parser.add_argument("--agents", type=int, default=4, help="agents (GPUs) of the shared pool")
    parser.add_argument("--sessions", type=int, default=24, help="notebook sessions")
    parser.add_argument("--duty", type=float, default=0.10, help="GPU duty of each session")
    parser.add_argument("--duration", type=float, default=120.0,
                        help="seconds of trace each policy replays")
    parser.add_argument("--burst", type=float, default=1.0, help="mean burst (s of GPU work)")
    parser.add_argument("--slots", type=int, default=4, help="slots per agent (reclaim+slots)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reclaim-after", type=float, default=None,
                        help="reclaim policies' reclaim_after (default 3 s per 1 s of burst)")
    parser.add_argument("--idle-timeout", type=float, default=None,
                        help="the idle-timeout policy's keeper idle timeout "
                             "(default 60 s per 1 s of burst)")
    parser.add_argument("--memory", default=None, metavar="MIN:MAX",
                        help="device memory per session in MiB (pycuda 16:2048, emulated 1:16)")
    parser.add_argument("--scratch-mib", type=float, default=None,
                        help="the array bursts work on (pycuda 256, emulated 1)")
    parser.add_argument("--gpus", default="0", help="CUDA devices the agents use, in turn")
    parser.add_argument("--policies", default=",".join(POLICIES),
                        help="which policies, a comma list of " + ", ".join(POLICIES))
    parser.add_argument("--concurrent", action="store_true",
                        help="run the policies at the same time (each on its own agents)")
    parser.add_argument("--grace", type=float, default=None,
                        help="how long after --duration a waiting burst may still be served "
                             "(default half the duration)")
    parser.add_argument("--poll", type=float, default=None, help="status poll period (s)")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--quick", action="store_true",
                        help="a few sessions on 2 agents, well under a minute (CI)")
    parser.add_argument("--out", help="Markdown file (the plot goes beside it, .png)")
    a = parser.parse_args(argv)
    if a.quick:
        a.agents, a.sessions, a.slots = 2, 5, 2
        a.duration, a.burst, a.concurrent = 6.0, 0.08, True
        # a loaded 2-core machine stalls a process for tenths of a second: keep reclaim_after
        # above that, or calls that follow a sync point by microseconds meet an ended lease
        a.reclaim_after = 1.0 if a.reclaim_after is None else a.reclaim_after
        a.idle_timeout = 4.0 if a.idle_timeout is None else a.idle_timeout
        a.grace = 15.0 if a.grace is None else a.grace
    emulated = a.executor == "emulated"
    low, high = (1, 16) if emulated else (16, 2048)
    if a.memory:
        low, high = (float(x) for x in a.memory.split(":"))
    scratch = a.scratch_mib or (1.0 if emulated else 256.0)
    policies = [p.strip() for p in a.policies.split(",") if p.strip()]
    unknown = set(policies) - set(POLICIES)
    if unknown:
        parser.error(f"unknown policies {sorted(unknown)}: choose from {', '.join(POLICIES)}")
    if not 0 < a.duty < 1:
        parser.error("--duty is a fraction between 0 and 1")
    shown = " ".join(argv if argv is not None else sys.argv[1:])
    opts = Options(
        executor=a.executor, agents=a.agents, sessions=a.sessions, duty=a.duty,
        duration_s=a.duration, burst_s=a.burst, slots=a.slots, seed=a.seed,
        reclaim_after_s=a.reclaim_after if a.reclaim_after is not None
        else RECLAIM_AFTER_S * a.burst,
        idle_timeout_s=a.idle_timeout if a.idle_timeout is not None
        else IDLE_TIMEOUT_S * a.burst,
        memory_min=int(low * MiB), memory_max=int(high * MiB),
        scratch_elems=int(scratch * MiB) // 4,
        devices=[int(x) for x in a.gpus.split(",")], policies=policies,
        concurrent=a.concurrent,
        poll_s=a.poll if a.poll is not None else min(0.2, max(0.05, a.burst / 4)),
        grace_s=a.grace if a.grace is not None else max(0.5 * a.duration, 20 * a.burst),
        plot=not a.no_plot,
        command=f"python bench/elasticity.py {shown}".strip())
    return opts, a.out


if __name__ == "__main__":
    summary = main()
    bad = [s for s in summary["summaries"] if s["errors"]]
    sys.exit(1 if bad else 0)
