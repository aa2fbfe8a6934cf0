"""Lease benchmark: acquire latency on a warm agent, park and restore of 1 GiB of device state.

    python bench/leases.py [--out bench/results/leases-<gpu>.md] [--emulated]

Measured in one run against a local ``harp-agent``, with local pycuda's own 1 GiB copies
(device->host and back: what any park and restore must at least do) and a raw pyzmq round trip
as the baselines, printed as a Markdown table against the targets of ARCHITECTURE.md section 7.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from forwarding import report, row, run_json, run_json_raw, start_agent  # noqa: E402


def table(local: dict, shim: dict, raw: dict) -> list[str]:
    lines = ["| measure | local pycuda / raw pyzmq | HARP | ratio | target | |",
             "|---|---|---|---|---|---|"]
    lines.append(row("lease request round trip p50 / p99 (ms)",
                     f"{raw['rtt_p50_us'] / 1e3:.3f} (raw zmq round trip)",
                     f"{shim['lease_rtt_p50_ms']:.3f} / {shim['lease_rtt_p99_ms']:.3f}",
                     shim["lease_rtt_p50_ms"] / (raw["rtt_p50_us"] / 1e3), "context", None))
    lines.append(row("acquire on a warm agent (a spare worker ready), shim p50 / p99 (ms)", "",
                     f"{shim['acquire_p50_ms']:.2f} / {shim['acquire_p99_ms']:.2f}", None,
                     "≤ 10 ms p50", shim["acquire_p50_ms"] <= 10))
    lines.append(row("acquire right after a release (the spare still starting) p50 (ms)", "",
                     f"{shim['acquire_back_to_back_p50_ms']:.2f}", None, "reported", None))
    for what, key, base in (("park", "park_1GiB_s", "dtoh_1GiB_s"),
                            ("restore", "restore_1GiB_s", "htod_1GiB_s")):
        ratio = shim[key] / local[base] if local else None
        lines.append(row(f"{what} 1 GiB of device state (s)",
                         f"{local[base]:.3f} ({base[:4]} 1 GiB)" if local else "",
                         f"{shim[key]:.3f}", ratio, "≤ 1 s", shim[key] <= 1.0))
    lines.append(row("data intact after 3 park/restore cycles", "", str(shim["data_intact"]),
                     None, "True", shim["data_intact"]))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="Markdown file to write (default bench/results/...)")
    parser.add_argument("--emulated", action="store_true",
                        help="smoke run against an emulated agent (no GPU needed)")
    args = parser.parse_args()
    raw = run_json_raw()
    agent, endpoint = start_agent(args.emulated)
    try:
        local = {} if args.emulated else run_json([str(HERE / "lease_workloads.py"), "local"])
        shim = run_json([str(HERE / "lease_workloads.py"), "shim", endpoint])
    finally:
        agent.kill()
    report("leases", shim["device"],
           f"python bench/leases.py{' --emulated' if args.emulated else ''}",
           "The agent, local pycuda and raw pyzmq were measured in this one run; the shim talks "
           "to the agent over TCP loopback. Acquire is the time from a parked session's next "
           "GPU call to its restored session (lease request, grant, hello, restore of 4 KiB of "
           "state); park and restore move the whole 1 GiB between device and the agent's host "
           "memory.",
           table(local, shim, raw),
           {"local": local, "shim": shim, "raw_zmq_rtt_p50_us": raw["rtt_p50_us"]}, args.out)


if __name__ == "__main__":
    main()
