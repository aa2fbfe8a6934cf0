"""What ``%%harp profile`` costs: a launch-bound and a compute-bound cell, run through the shim
without and with the profile, with local pycuda measured in the same run as the baseline.

    python bench/profiling.py [--out bench/results/profiling-<gpu>.md]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from forwarding import report, run_json, start_agent  # noqa: E402

CELLS = {"launch_bound": "launch-bound cell: 2000 tiny launches + synchronize",
         "compute_bound": "compute-bound cell: 5 kernels of 20M GPU cycles + synchronize"}


def table(local: dict, shim: dict) -> list[str]:
    lines = ["| cell | local pycuda (ms) | HARP (ms) | HARP + %%harp profile (ms) | "
             "profiled / HARP | trace events |", "|---|---|---|---|---|---|"]
    for key, what in CELLS.items():
        plain, profiled = shim[key], shim[f"{key}_profiled"]
        lines.append(f"| {what} | {local[key] * 1e3:.1f} | {plain * 1e3:.1f} "
                     f"({plain / local[key]:.2f}x local) | {profiled * 1e3:.1f} | "
                     f"{profiled / plain:.2f} | {shim[f'{key}_trace_events']} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="Markdown file to write (default bench/results/...)")
    args = parser.parse_args()
    agent, endpoint = start_agent(False)
    try:
        local = run_json([str(HERE / "profile_workloads.py"), "local"])
        shim = run_json([str(HERE / "profile_workloads.py"), "shim", endpoint])
    finally:
        agent.kill()
    report("profiling", shim["device"], "python bench/profiling.py", (
        "Medians of 5 runs after a warm-up. Local pycuda, the shim and the shim under "
        "%%harp profile were measured in this one run against a pycuda agent on the same "
        "machine (TCP loopback). The profiled time includes collecting the CUDA-event "
        "timings and building the timeline, summary and advice (what the user waits for)."),
        table(local, shim), {"local": local, "shim": shim}, args.out)


if __name__ == "__main__":
    main()
