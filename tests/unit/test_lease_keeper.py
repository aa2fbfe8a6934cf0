"""LeaseKeeper's pure parts: the idle countdown, the lease state dict, pushes from the agent."""

from __future__ import annotations

from typing import Any

import pytest

from provisioner.keeper import STATES, HeldLease, KeeperConfig, LeaseKeeper, idle_left

AGENT = "tcp://127.0.0.1:5555"


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def keeper(clock: Clock | None = None, **config: Any) -> LeaseKeeper:
    async def agents() -> list[str]:
        return [AGENT]

    async def ask_park(reason: str) -> dict[str, Any]:
        raise AssertionError("not asked in unit tests")

    return LeaseKeeper(KeeperConfig("kernel-1", "secret", **config), None,  # type: ignore[arg-type]
                       agents, ask_park, clock=clock or Clock())


def hold(k: LeaseKeeper, granted_at: float, session: dict[str, Any] | None = None) -> None:
    k.lease = HeldLease(AGENT, "lease-1", "token-1", 30.0, granted_at)
    k.state = "held"
    k._note_session(session)


# {{{ idle_left


def test_idle_countdown_from_the_session_report() -> None:
    session = {"state": "active", "idle_s": 10.0, "busy": False}
    assert idle_left(60, session, seconds_since_report=5, seconds_held=100) == 45


def test_busy_session_never_counts_down() -> None:
    session = {"state": "active", "idle_s": 500.0, "busy": True}
    assert idle_left(60, session, seconds_since_report=100, seconds_held=1000) == 60


def test_never_idle_longer_than_held() -> None:
    # a session parked an hour ago and restored right now reports a large idle_s
    session = {"state": "active", "idle_s": 3600.0, "busy": False}
    assert idle_left(60, session, seconds_since_report=0, seconds_held=2) == 58


def test_parked_or_missing_session_counts_from_the_grant() -> None:
    assert idle_left(60, None, seconds_since_report=0, seconds_held=20) == 40
    parked = {"state": "parked", "idle_s": 0.0, "busy": False}
    assert idle_left(60, parked, seconds_since_report=0, seconds_held=70) == 0


@pytest.mark.parametrize("timeout", [0, -1])
def test_zero_idle_timeout_means_never(timeout: float) -> None:
    assert idle_left(timeout, None, seconds_since_report=0, seconds_held=1e9) is None


# }}}

# {{{ lease_state


def test_lease_state_has_every_documented_key() -> None:
    state = keeper().lease_state()
    assert set(state) == {"state", "agent", "gpu", "emulated", "memory_used", "memory_total",
                          "held_since", "held_s", "idle_timeout", "idle_left_s", "position",
                          "gpu_seconds", "parked_bytes", "kernel_id", "message"}
    assert state["state"] == "none" and state["kernel_id"] == "kernel-1"
    assert state["state"] in STATES


def test_gpu_seconds_add_up_over_leases_and_each_change_is_told_once() -> None:
    clock = Clock(1000.0)
    told: list[tuple[str, str, int | None, float]] = []
    k = keeper(clock)
    k.on_change = lambda c: told.append((c["previous"], c["state"], c["position"],
                                         c["gpu_seconds"]))
    k._set("acquiring", "")
    k.position = 2
    k._set("queued", "position 2")
    k._set("queued", "position 2")  # nothing changed: not told again
    k.position = 1
    k._set("queued", "position 1")
    k._set("held", "")
    clock.now += 30
    k._set("parking", "")
    k._set("parked", "")
    clock.now += 100  # parked time is not GPU time
    k._set("acquiring", "")
    k._set("held", "")
    clock.now += 5
    assert k.lease_state()["gpu_seconds"] == 35
    assert told == [("none", "acquiring", None, 0), ("acquiring", "queued", 2, 0),
                    ("queued", "queued", 1, 0), ("queued", "held", None, 0),
                    ("held", "parking", None, 30), ("parking", "parked", None, 30),
                    ("parked", "acquiring", None, 30), ("acquiring", "held", None, 30)]


def test_a_failing_listener_does_not_break_the_keeper() -> None:
    k = keeper()

    def broken(change: dict[str, Any]) -> None:
        raise RuntimeError("listener bug")

    k.on_change = broken
    k._set("acquiring", "")
    assert k.state == "acquiring"


def test_lease_state_while_held() -> None:
    clock = Clock(1000.0)
    k = keeper(clock, idle_timeout=60)
    k._note_device({"device": {"name": "H100", "total_memory": 80}, "emulated": False,
                    "memory": {"total": 80, "used": 3}})
    hold(k, granted_at=990.0, session={"state": "active", "idle_s": 0.0, "busy": False,
                                       "device_bytes": 4 << 20})
    state = k.lease_state()
    assert state["state"] == "held" and state["agent"] == AGENT
    assert (state["gpu"], state["emulated"], state["memory_total"]) == ("H100", False, 80)
    assert state["memory_used"] == 4 << 20
    assert state["held_since"] == 990.0 and state["held_s"] == 10.0
    assert 0 < state["idle_left_s"] <= 60


def test_lease_state_when_parked_names_the_agent_holding_the_state() -> None:
    k = keeper()
    hold(k, granted_at=990.0)
    k._note_parked({"session": "s1", "agent": "tcp://elsewhere:1", "bytes": 1024})
    k.lease = None
    k._set("parked", "released")
    state = k.lease_state()
    assert (state["state"], state["agent"]) == ("parked", "tcp://elsewhere:1")
    assert state["held_s"] is None and state["idle_left_s"] is None
    assert k.parked_bytes == 1024


def test_park_answer_without_a_session_keeps_the_lease_agent() -> None:
    k = keeper()
    hold(k, granted_at=990.0)
    k._note_parked({"session": None, "agent": None, "bytes": 0})
    assert k.parked_at == AGENT


def test_queued_position_shows_only_while_queued() -> None:
    k = keeper()
    k.position = 3
    k._set("queued", "position 3")
    assert k.lease_state()["position"] == 3
    k._set("held", "")
    assert k.lease_state()["position"] is None


# }}}

# {{{ pushes


def test_pushed_end_of_our_lease_means_parked_at_its_agent() -> None:
    k = keeper()
    hold(k, granted_at=990.0)
    k.on_push(AGENT, {"id": "lease-1", "state": "expired"})
    assert k.lease is None and k.state == "parked" and k.parked_at == AGENT
    assert "expired" in k.message


def test_pushes_about_other_leases_or_live_states_change_nothing() -> None:
    k = keeper()
    hold(k, granted_at=990.0)
    k.on_push(AGENT, {"id": "someone-else", "state": "revoked"})
    k.on_push(AGENT, {"id": "lease-1", "state": "held", "position": 0})
    assert k.lease is not None and k.state == "held"


# }}}


def test_grant_names_the_agent_the_state_moves_from() -> None:
    k = keeper()
    hold(k, granted_at=990.0)
    assert k._grant("tcp://other:1") == {"t": "grant", "agent": AGENT,
                                         "lease": ["lease-1", "token-1"],
                                         "from": "tcp://other:1"}
    assert k._grant(AGENT)["from"] is None and k._grant(None)["from"] is None
