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
    assert table.holder is a


def test_release_grants_the_next_in_queue() -> None:
    table = LeaseTable(ttl=10, clock=FakeClock())
    a = table.request("a")[0]
    b = table.request("b")[0]
    changed = table.release(a.lease_id, a.token)
    assert [x.lease_id for x in changed] == [a.lease_id, b.lease_id]
    assert a.state is LeaseState.RELEASED and b.state is LeaseState.HELD
    assert table.holder is b


def test_queued_lease_can_leave_the_queue() -> None:
    table = LeaseTable(ttl=10, clock=FakeClock())
    a = table.request("a")[0]
    b = table.request("b")[0]
    c = table.request("c")[0]
    table.release(b.lease_id, b.token)
    assert table.position(c.lease_id) == 1
    assert table.holder is a


def test_wrong_token_is_refused_and_changes_nothing() -> None:
    table = LeaseTable(ttl=10, clock=FakeClock())
    a = table.request("a")[0]
    with pytest.raises(LeaseError):
        table.release(a.lease_id, "not-the-token")
    with pytest.raises(LeaseError):
        table.renew("no-such-lease", a.token)
    assert table.holder is a


def test_unrenewed_leases_expire_and_the_queue_moves() -> None:
    clock = FakeClock()
    table = LeaseTable(ttl=10, clock=clock)
    a = table.request("a")[0]
    b = table.request("b")[0]
    clock.now += 6
    table.renew(b.lease_id, b.token)
    clock.now += 6  # a last renewed 12 s ago, b 6 s ago
    changed = table.expire()
    assert a.state is LeaseState.EXPIRED
    assert b.state is LeaseState.HELD and b in changed
    with pytest.raises(LeaseError):
        table.renew(a.lease_id, a.token)


def test_revoke_needs_no_token() -> None:
    table = LeaseTable(ttl=10, clock=FakeClock())
    a = table.request("a")[0]
    table.revoke(a.lease_id)
    assert a.state is LeaseState.REVOKED and table.holder is None
    assert table.revoke(a.lease_id) == []


def test_randomized_contention_never_two_holders_and_first_come_first_served() -> None:
    rng = random.Random(20261123)
    clock = FakeClock()
    table = LeaseTable(ttl=5, clock=clock)
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
        else:
            for lease in live:
                if rng.random() < 0.9:
                    table.renew(lease.lease_id, lease.token)
            changed = table.expire()
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
        assert len(holders) <= 1
        assert (table.holder is None) == (not holders)
        if live:
            assert table.holder is not None, "a free GPU with a non-empty queue"
    assert grants > 200  # the run exercised many hand-overs
