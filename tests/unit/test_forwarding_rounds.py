"""bench/forwarding.py's rule for combining interleaved rounds: every side by the same rule."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from forwarding import best_of


def test_best_of_takes_lowest_time_and_highest_bandwidth() -> None:
    rounds = [{"launch_us": 9.0, "h2d_1MiB_GBps": 2.0, "compute_s": 1.9},
              {"launch_us": 7.0, "h2d_1MiB_GBps": 3.0},
              {"launch_us": 8.0, "h2d_1MiB_GBps": 2.5, "compute_s": 2.1}]
    best = best_of(rounds)
    assert best == {"launch_us": 7.0, "h2d_1MiB_GBps": 3.0, "compute_s": 1.9}


def test_p99_comes_from_the_round_of_the_best_p50() -> None:
    rounds = [{"read4_p50_us": 80.0, "read4_p99_us": 100.0},
              {"read4_p50_us": 70.0, "read4_p99_us": 200.0}]
    best = best_of(rounds)
    # the lowest p99 (100) would pair with another round's p50 and flatter the p99/p50 ratio
    assert (best["read4_p50_us"], best["read4_p99_us"]) == (70.0, 200.0)


def test_context_figures_are_kept_as_first_measured() -> None:
    rounds = [{"device": "GPU", "million_launches_s": 7.0, "compute_iters": 4000},
              {"device": "GPU", "million_launches_s": 6.0}]
    assert best_of(rounds) == {"device": "GPU", "million_launches_s": 7.0, "compute_iters": 4000}
