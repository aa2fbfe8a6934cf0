"""The elasticity replay's four policies and the targets it measures them against (ARCHITECTURE.md
section 7): shared by the replay (bench/elasticity.py) and its plot."""

from __future__ import annotations

POLICIES = ("dedicated", "idle-timeout", "reclaim", "reclaim+slots")
TITLES = {"dedicated": "one GPU per notebook", "idle-timeout": "idle timeout alone",
          "reclaim": "reclaim, 1 lease/GPU", "reclaim+slots": "reclaim + slots"}
#: p95 lease wait target (seconds)
TARGET_WAIT_P95_S = 1.0


def slowdown_target(duty: float) -> float:
    """p95 burst slowdown target: 2.5x at 10% duty, 2x at 5%."""
    return 2.5 if duty >= 0.075 else 2.0
