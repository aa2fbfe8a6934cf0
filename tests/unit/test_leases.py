import random

import pytest

from gpu_agent.leases import LeaseError, LeaseState, LeaseTable


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_first_request_is_granted_and_later_ones_queue_in_order() -> None:
    table = LeaseTable(ttl=10, clock=FakeClock())
    a = table.request("kernel-a")[0]
    b = table.request("kernel-b")[0]
    c = table.request("kernel-c")[0]
    assert a.state is LeaseState.HELD
    assert (b.state, c.state) == (LeaseState.QUEUED, LeaseState.QUEUED)
    assert [table.position(x.lease_id) for x in (a, b, c)] == [0, 1, 2]
    assert table.holders == [a]


def test_release_then_promote_grants_the_next_in_queue() -> None:
    table = LeaseTable(ttl=10, clock=FakeClock())
    a = table.request("a")[0]
    b = table.request("b")[0]
    changed = table.release(a.lease_id, a.token)
    assert [x.lease_id for x in changed] == [a.lease_id]
    assert b.state is LeaseState.QUEUED  # not before its caller parked what a held
    assert table.promote() == [b]
    assert a.state is LeaseState.RELEASED and b.state is LeaseState.HELD
    assert table.holders == [b]


def test_queued_lease_can_leave_the_queue() -> None:
    table = LeaseTable(ttl=10, clock=FakeClock())
    a = table.request("a")[0]
    b = table.request("b")[0]
    c = table.request("c")[0]
    table.release(b.lease_id, b.token)
    assert table.position(c.lease_id) == 1
    assert table.holders == [a]


def test_wrong_token_is_refused_and_changes_nothing() -> None:
    table = LeaseTable(ttl=10, clock=FakeClock())
    a = table.request("a")[0]
    with pytest.raises(LeaseError):
        table.release(a.lease_id, "not-the-token")
    with pytest.raises(LeaseError):
        table.renew("no-such-lease", a.token)
    assert table.holders == [a]


def test_unrenewed_leases_expire_and_the_queue_moves() -> None:
    clock = FakeClock()
    table = LeaseTable(ttl=10, clock=clock)
    a = table.request("a")[0]
    b = table.request("b")[0]
    clock.now += 6
    table.renew(b.lease_id, b.token)
    clock.now += 6  # a last renewed 12 s ago, b 6 s ago
    changed = table.expire()
    assert a.state is LeaseState.EXPIRED and changed == [a]
    assert table.promote() == [b] and b.state is LeaseState.HELD
    with pytest.raises(LeaseError):
        table.renew(a.lease_id, a.token)


def test_revoke_needs_no_token() -> None:
    table = LeaseTable(ttl=10, clock=FakeClock())
    a = table.request("a")[0]
    table.revoke(a.lease_id)
    assert a.state is LeaseState.REVOKED and table.holders == []
    assert table.revoke(a.lease_id) == []


@pytest.mark.parametrize("slots", [1, 3])
def test_randomized_contention_never_two_holders_and_first_come_first_served(slots: int) -> None:
    rng = random.Random(20261123 + slots)
    clock = FakeClock()
    table = LeaseTable(ttl=5, clock=clock, slots=slots, max_queue=10_000)
    live = []
    # for each queued lease: how many others may still be granted before it (its queue position - 1)
    overtakes_left: dict[str, int] = {}
    grants = 0
    for step in range(5000):
        clock.now += rng.random()
        action = rng.random()
        changed = []
        if action < 0.35 or not live:
            changed = table.request(f"k{step}")
            lease = changed[0]
            live.append(lease)
            if lease.state is LeaseState.QUEUED:
                overtakes_left[lease.lease_id] = table.position(lease.lease_id) - 1
        elif action < 0.7:
            lease = rng.choice(live)
            changed = table.release(lease.lease_id, lease.token)
            changed += table.promote()
        else:
            for lease in live:
                if rng.random() < 0.9:
                    table.renew(lease.lease_id, lease.token)
            changed = table.expire()
            changed += table.promote()
        for lease in changed:
            if lease.state is LeaseState.HELD:
                grants += 1
                overtakes_left.pop(lease.lease_id, None)
                for other in overtakes_left:
                    overtakes_left[other] -= 1
                    assert overtakes_left[other] >= 0, "a later request was served first"
        live = [lease for lease in live if lease.active]
        for ended in set(overtakes_left) - {lease.lease_id for lease in live}:
            del overtakes_left[ended]
        holders = [lease for lease in live if lease.state is LeaseState.HELD]
        assert len(holders) <= slots
        assert sorted(x.lease_id for x in table.holders) == sorted(x.lease_id for x in holders)
        if len(live) > len(holders):
            assert len(holders) == slots, "a free slot with a non-empty queue"
    assert grants > 200  # the run exercised many hand-overs


@pytest.mark.parametrize("ttl", [float("nan"), float("inf"), -float("inf"), "30", [1]])
def test_a_ttl_that_is_not_a_finite_number_is_refused(ttl: object) -> None:
    table = LeaseTable(ttl=30, clock=FakeClock())
    with pytest.raises(LeaseError, match="finite number"):
        table.request("k", ttl=ttl)  # type: ignore[arg-type]


def test_a_requested_ttl_is_clamped_between_the_minimum_and_the_agents() -> None:
    table = LeaseTable(ttl=30, clock=FakeClock(), min_ttl=1)
    assert table.request("a", ttl=1e9)[0].ttl == 30
    assert table.request("b", ttl=0.0)[0].ttl == 1
    assert table.request("c", ttl=-5)[0].ttl == 1


def test_the_queue_is_bounded_and_its_operations_stay_cheap() -> None:
    table = LeaseTable(ttl=30, clock=FakeClock(), max_queue=3)
    table.request("holder")
    for i in range(3):
        table.request(f"q{i}")
    with pytest.raises(LeaseError, match="queue is full"):
        table.request("one-too-many")
    assert len(table.queue) == 3


def test_a_draining_slot_is_granted_only_when_it_came_free() -> None:
    table = LeaseTable(ttl=30, clock=FakeClock())
    a = table.request("a")[0]
    b = table.request("b")[0]
    table.draining = 1  # a's session is still being parked
    changed = table.release(a.lease_id, a.token)
    assert table.promote() == []
    assert b.state is LeaseState.QUEUED and [x.lease_id for x in changed] == [a.lease_id]
    table.draining = 0
    assert table.promote() == [b] and b.state is LeaseState.HELD
