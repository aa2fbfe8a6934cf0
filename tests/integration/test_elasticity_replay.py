"""The elasticity replay of issue 11 (bench/elasticity.py --quick) on emulated agents.

Five notebook sessions, each a real shim client process leasing through the lease keeper, replay a
seeded trace against the four policies (one agent per notebook; two agents with the idle timeout
alone; two with reclaim on demand, one lease each; two with reclaim and two slots each), all at
once. This asserts behaviour, never timing: every session's data intact after every burst and at
the end, every burst of the dedicated and reclaim policies served (no starvation), the waits of
the reclaim policies ended by reclaims (the agents' counter), and no slot ever seen with two
holders (the agents' status, polled all through the run) nor two bursts at once on one slot (the
clients' own timestamps).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def replay(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    sys.path.insert(0, str(BENCH))
    try:
        import elasticity
    finally:
        sys.path.remove(str(BENCH))
    out = tmp_path_factory.mktemp("elasticity") / "quick.md"
    raw = elasticity.main(["--executor", "emulated", "--quick", "--seed", "0", "--no-plot",
                           "--out", str(out)])
    assert out.exists() and "| lease wait p95 (s) |" in out.read_text()
    return {s["policy"]: s for s in raw["summaries"]}


def test_every_policy_ran_with_real_sessions(replay: dict[str, dict[str, Any]]) -> None:
    assert set(replay) == {"dedicated", "idle-timeout", "reclaim", "reclaim+slots"}
    for name, s in replay.items():
        assert s["sessions"] == 5, name
        assert s["bursts"] > 0, name
        assert s["status_polls"] > 0, name


def test_every_sessions_data_is_intact(replay: dict[str, dict[str, Any]]) -> None:
    for name, s in replay.items():
        assert s["sessions_intact"] == s["sessions"], (name, s["errors"])


def test_no_slot_ever_has_two_holders(replay: dict[str, dict[str, Any]]) -> None:
    for name, s in replay.items():
        assert not s["slot_violations"], (name, s["slot_violations"])
        assert s["max_holders_per_slot"] <= 1, name
        assert s["max_sessions_on_gpu"] <= s["slots"], name
        assert s["max_bursts_at_once_per_agent"] <= s["slots"], name


def test_no_session_starves(replay: dict[str, dict[str, Any]]) -> None:
    for name in ("dedicated", "reclaim", "reclaim+slots"):
        s = replay[name]
        assert s["censored"] == 0, (name, s["sessions_censored"])
        assert not s["sessions_without_burst"], name


def test_with_reclaim_the_waits_end_by_reclaims(replay: dict[str, dict[str, Any]]) -> None:
    s = replay["reclaim"]
    assert s["max_queued"] > 0  # with one lease per GPU someone always waits in this trace
    assert s["reclaims"] > 0 and s["reclaim_notices"] > 0  # and the reclaimed was told why
    s = replay["reclaim+slots"]
    if s["max_queued"] > 0:  # slots may serve every burst of a quick trace without a wait
        assert s["reclaims"] > 0 and s["reclaim_notices"] > 0
    # nobody waits with a GPU of one's own, and nobody is reclaimed without reclaim
    assert replay["dedicated"]["reclaims"] == 0
    assert replay["idle-timeout"]["reclaims"] == 0
