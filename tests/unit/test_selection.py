"""Which agent an acquire goes to (provisioner.selection), from agents' status replies."""

from __future__ import annotations

from typing import Any

import pytest

from provisioner.selection import (
    choose_agent,
    is_free,
    parked_bytes,
    queue_length,
    where_parked,
)

A, B, C = "tcp://a:1", "tcp://b:1", "tcp://c:1"


def status(holder: str | None = None, queue: int = 0,
           parked: list[tuple[str, int]] = ()) -> dict[str, Any]:  # type: ignore[assignment]
    return {"t": "status", "leases": {
        "ttl": 30,
        "holder": None if holder is None else {"lease_id": "h", "kernel_id": holder},
        "queue": [{"lease_id": f"q{i}", "kernel_id": f"w{i}", "position": i + 1}
                  for i in range(queue)],
        "parked": [{"session": f"s{i}", "kernel_id": k, "bytes": n}
                   for i, (k, n) in enumerate(parked)]}}


def test_parked_agent_is_preferred_when_free() -> None:
    statuses = {A: status(), B: status(parked=[("me", 1 << 20)])}
    assert choose_agent(statuses, parked_at=B) == B


def test_busy_parked_agent_gives_way_to_a_free_one() -> None:
    statuses = {A: status(), B: status(holder="other", parked=[("me", 10)])}
    assert choose_agent(statuses, parked_at=B) == A


def test_among_free_agents_fewest_parked_bytes_then_order() -> None:
    statuses = {A: status(parked=[("x", 500)]), B: status(parked=[("y", 100)]), C: status()}
    assert choose_agent(statuses) == C
    statuses = {A: status(parked=[("x", 500)]), B: status(parked=[("y", 100)])}
    assert choose_agent(statuses) == B
    assert choose_agent({A: status(), B: status()}) == A


def test_all_busy_queue_at_the_shortest_queue() -> None:
    statuses = {A: status("k1", queue=2), B: status("k2", queue=0), C: status("k3", queue=1)}
    assert choose_agent(statuses) == B


def test_all_busy_ties_go_to_our_parked_agent_then_endpoint_order() -> None:
    statuses = {A: status("k1", queue=1), B: status("k2", queue=1), C: status("k3", queue=3)}
    assert choose_agent(statuses, parked_at=B) == B
    assert choose_agent(statuses) == A
    # a parked agent with a longer queue does not win
    assert choose_agent(statuses, parked_at=C) == A


def test_parked_agent_that_did_not_answer_is_ignored() -> None:
    assert choose_agent({A: status("k1"), B: status()}, parked_at=C) == B


def test_agent_with_a_queue_but_no_holder_is_not_free() -> None:
    # between a release and the next grant an agent can report a queue and no holder
    s = status(queue=1)
    assert not is_free(s)
    assert queue_length(s) == 1
    assert choose_agent({A: s, B: status("k", queue=0)}) == A  # both have one ahead


def test_no_agent_answered() -> None:
    with pytest.raises(ValueError):
        choose_agent({})


def test_malformed_status_counts_as_free_and_empty() -> None:
    assert is_free({"t": "status"}) and parked_bytes({"leases": None}) == 0


def test_an_agent_with_slots_is_free_while_a_slot_is_and_queues_count_per_slot() -> None:
    full = {"leases": {"slots": 2, "free_slots": 0, "holder": None,
                       "holders": [{"since": 1.0}, {"since": 2.0}], "queue": [{}]}}
    one_left = {"leases": {"slots": 2, "free_slots": 1, "holder": None,
                           "holders": [{"since": 1.0}], "queue": []}}
    single = {"leases": {"slots": 1, "free_slots": 0, "holder": {"since": 1.0},
                         "holders": [{"since": 1.0}], "queue": [{}]}}
    assert is_free(one_left) and not is_free(full) and not is_free(single)
    assert queue_length(full) == 1.5 and queue_length(single) == 2
    assert choose_agent({"a": single, "b": full}) == "b"  # 1.5 ahead per slot, not 2
    assert choose_agent({"a": full, "b": one_left}) == "b"


def draining(base: dict[str, Any]) -> dict[str, Any]:
    return {**base, "draining": True}


def test_a_draining_agent_is_never_chosen_while_another_answers() -> None:
    statuses = {A: draining(status(parked=[("me", 1)])), B: status(holder="x", queue=3)}
    assert not is_free(statuses[A])
    assert choose_agent(statuses, parked_at=A) == B


def test_a_draining_agent_alone_is_asked_so_that_it_says_why() -> None:
    assert choose_agent({A: draining(status())}) == A


def test_parked_state_is_found_where_an_agent_lists_it() -> None:
    statuses = {A: draining(status()), B: status(parked=[("me", 1 << 20)]), C: status()}
    assert where_parked(statuses, "me", parked_at=A) == B  # moved off the draining agent
    assert where_parked(statuses, "someone-else", parked_at=A) == A
    both = {A: draining(status(parked=[("me", 1)])), B: status(parked=[("me", 1)])}
    assert where_parked(both, "me", parked_at=A) == A  # still there: fetched from there
    assert where_parked({B: status(parked=[("me", 1)])}, "me", parked_at=None) == B
