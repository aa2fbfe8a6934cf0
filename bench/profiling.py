"""What ``%%harp profile`` costs: a launch-bound and a compute-bound cell, run through the shim
without and with the profile, with local pycuda measured in the same run as the baseline.

    python bench/profiling.py [--out bench/results/profiling-<gpu>.md] [--emulated] [--repeats N]

``--emulated`` runs against an emulated agent (no GPU needed): the cells use memsets for kernels
(bench/profile_workloads.py), there is no local baseline, and the ratio measures what the
notebook and the agent add per profiled call, not CUDA events.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from forwarding import ENV, report, run_json, start_agent  # noqa: E402

CELLS = {"launch_bound": "launch-bound cell: 2000 tiny launches + synchronize",
         "compute_bound": "compute-bound cell: 5 kernels of 20M GPU cycles + synchronize"}
EMULATED_CELLS = {"launch_bound": "launch-bound cell: 2000 small async memsets + synchronize",
                  "compute_bound": "compute-bound cell: 5 memsets of 64 MiB + synchronize"}
#: issue 16's target for the launch-bound cell
PROFILED_RATIO = 1.3


def table(local: dict, shim: dict) -> list[str]:
    lines = ["| cell | local pycuda (ms) | HARP (ms) | HARP + %%harp profile (ms) | "
             "profiled / HARP | trace events |", "|---|---|---|---|---|---|"]
    for key, what in (CELLS if local else EMULATED_CELLS).items():
        plain, profiled = shim[key], shim[f"{key}_profiled"]
        baseline = (f"{local[key] * 1e3:.1f}", f" ({plain / local[key]:.2f}x local)"
                    ) if local else ("", "")
        ratio = round(profiled / plain, 2)  # the verdict is on the figure shown
        verdict = (f" ({'PASS' if ratio <= PROFILED_RATIO else 'MISS'}: target "
                   f"≤ {PROFILED_RATIO}x)" if key == "launch_bound" else "")
        lines.append(f"| {what} | {baseline[0]} | {plain * 1e3:.1f}{baseline[1]} | "
                     f"{profiled * 1e3:.1f} | {ratio:.2f}{verdict} | "
                     f"{shim[f'{key}_trace_events']} |")
    return lines


def split(shim: dict) -> list[str]:
    """Where the launch-bound cell's profiled time goes, step by step (medians, so a step
    can read slightly negative when it costs less than the run's noise)."""
    key = "launch_bound"
    plain = shim[key]
    steps = [("HARP, not profiled", plain, None),
             ("+ the notebook's recording and the agent's call timing (--no-gpu-timing)",
              shim[f"{key}_agent_timing"], plain),
             ("+ GPU timing, one event pair per batch and stream (the default)",
              shim[f"{key}_gpu_timing"], shim[f"{key}_agent_timing"]),
             ("+ the timeline, summary, advice and display bundle (what the user waits for)",
              shim[f"{key}_profiled"], shim[f"{key}_gpu_timing"]),
             ("the same with every GPU op timed (--per-op-gpu-timing)",
              shim[f"{key}_per_op"], None)]
    lines = ["| launch-bound cell, step | ms | step adds (ms) | / HARP |", "|---|---|---|---|"]
    for what, total, before in steps:
        added = "" if before is None else f"{(total - before) * 1e3:+.1f}"
        lines.append(f"| {what} | {total * 1e3:.1f} | {added} | {total / plain:.2f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="Markdown file to write (default bench/results/...)")
    parser.add_argument("--emulated", action="store_true",
                        help="against an emulated agent (no GPU needed; no local baseline)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="runs of each measure after a warm-up (medians; default 5)")
    args = parser.parse_args()
    env = dict(ENV, HARP_BENCH_REPEATS=str(args.repeats))
    agent, endpoint = start_agent(args.emulated)
    try:
        local = {} if args.emulated else run_json([str(HERE / "profile_workloads.py"), "local"],
                                                  env=env)
        shim = run_json([str(HERE / "profile_workloads.py"), "shim", endpoint], env=env)
    finally:
        agent.kill()
    where = ("an emulated agent (memsets for kernels, host NumPy time for GPU time)"
             if args.emulated else "a pycuda agent")
    report("profiling", shim["device"],
           f"python bench/profiling.py{' --emulated' if args.emulated else ''}"
           f"{f' --repeats {args.repeats}' if args.repeats != 5 else ''}", (
               f"Medians of {args.repeats} runs after a warm-up, the variants of a cell taking "
               "turns. "
               + ("" if args.emulated else "Local pycuda, ")
               + ("The shim" if args.emulated else "the shim")
               + f" and the shim under %%harp profile were measured in this one run against "
               f"{where} on the same machine (TCP loopback). The profiled time includes "
               "collecting the GPU timings and building the timeline, summary, advice and the "
               "display bundle the notebook shows (what the user waits for)."),
           [*table(local, shim), "", *split(shim)], {"local": local, "shim": shim}, args.out)

if __name__ == "__main__":
    main()
