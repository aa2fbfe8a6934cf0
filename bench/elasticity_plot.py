"""The elasticity replay's plot: per policy (columns), lease waits, burst slowdowns and each
agent's utilisation over the replay's time (rows). Needs matplotlib (the ``bench`` extra)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from elasticity_policies import TARGET_WAIT_P95_S, TITLES, slowdown_target

#: a policy's run and the replay's options (bench/elasticity.py's PolicyRun and Options; this
#: module reads their fields only, and the replay imports it, not the other way round)
PolicyRun = Any
Options = Any

#: waits below this are drawn at it (a held lease answers in well under a millisecond)
FLOOR_S = 1e-4


def plot(runs: list[PolicyRun], utilisation: Callable[[PolicyRun], dict[str, list[float]]],
         bursts_of: Callable[[PolicyRun], list[dict[str, Any]]], calib: dict[str, Any],
         opts: Options, path: Path, emulated: bool) -> None:

    alone = calib["alone_s"]
    columns = len(runs)
    figure, axes = plt.subplots(3, columns, figsize=(4.2 * columns, 9.5), sharex=True,
                                squeeze=False)
    wait_top = slow_top = 1.0
    for col, run in enumerate(runs):
        bursts = bursts_of(run)
        censored = [c for r in run.results for c in r.get("censored", [])]
        t = [b["t_want"] - run.t0 for b in bursts]
        waits = [max(b["t_granted"] - b["t_want"], FLOOR_S) for b in bursts]
        slow = [(b["t_done"] - b["t_want"]) / alone[b["size_class"]] for b in bursts]
        wait_top = max([wait_top, *waits, *(c["waited_s"] for c in censored)])
        slow_top = max([slow_top, *slow])
        ax = axes[0][col]
        ax.scatter(t, waits, s=9, alpha=0.7, color="tab:blue", label="burst")
        if censored:
            ax.scatter([c["t_want"] - run.t0 for c in censored],
                       [c["waited_s"] for c in censored], marker="^", s=22, color="tab:red",
                       label="still waiting at the end")
        ax.axhline(TARGET_WAIT_P95_S, color="gray", ls="--", lw=0.8)
        ax.set_yscale("log")
        ax.set_title(TITLES[run.name], fontsize=10)
        if col == 0:
            ax.set_ylabel("lease wait (s)")
            ax.legend(fontsize=7, loc="upper left")
        ax = axes[1][col]
        ax.scatter(t, slow, s=9, alpha=0.7, color="tab:purple")
        ax.axhline(slowdown_target(opts.duty), color="gray", ls="--", lw=0.8)
        ax.set_yscale("log")
        if col == 0:
            ax.set_ylabel("burst slowdown (x alone)")
        ax = axes[2][col]
        shares = utilisation(run)
        width = opts.duration_s / max(len(next(iter(shares.values()), [1])), 1)
        for i, (_, series) in enumerate(sorted(shares.items())):
            xs = [(k + 0.5) * width for k in range(len(series))]
            ax.plot(xs, [100 * v for v in series], lw=0.9, label=f"agent {i}")
        ax.set_ylim(0, 105)
        ax.set_xlabel("time in the replay (s)")
        if col == 0:
            ax.set_ylabel("agent busy (% of time)")
        if len(shares) <= 6:
            ax.legend(fontsize=6, loc="upper right")
    for col in range(columns):
        axes[0][col].set_ylim(FLOOR_S / 2, wait_top * 2)
        axes[1][col].set_ylim(0.8, slow_top * 1.5)
    label = "EMULATED (NumPy on CPU, no GPU)" if emulated else calib["device"]
    figure.suptitle(f"Elasticity replay on {label}: {opts.sessions} sessions, "
                    f"{100 * opts.duty:g}% duty, {opts.agents} agents (shared policies), "
                    f"seed {opts.seed}", fontsize=11)
    figure.tight_layout(rect=(0, 0, 1, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
