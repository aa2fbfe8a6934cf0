"""Which idle holder a waiter gets, and what counts as held idle while someone waited.

With several slots, a waiter needs one slot: the agent reclaims the idle holder that frees its slot
soonest (the fewest device bytes to park), not the one idle longest. While that park runs, the
waiter has a slot coming: another holder idle past ``reclaim_after`` keeps a slot nobody waits
for, and the agents' idle metric (``harp_gpu_seconds_held_idle_total``) does not count it.
Real emulated agents; the order of events and the agent's counters are asserted, not timings.
"""

from __future__ import annotations

import time
import urllib.request
from typing import Any

import pytest

from gpu_agent import protocol as P
from tests.agent_client import RawClient

pytestmark = pytest.mark.timeout(120)
MiB = 1 << 20
RECLAIM_AFTER = "0.3"


def holding(endpoint: str, nbytes: int, data: bytes) -> RawClient:
    client = RawClient(endpoint, timeout_ms=30_000)
    base = client.hello()["range"][0]
    reply, _ = client.batch(["alloc", base, nbytes], ["htod", base, data, None])
    assert reply["e"] is None, reply
    return client


def sessions_idle_past(observer: RawClient, count: int, threshold: float) -> None:
    """Wait until ``count`` active sessions have had no GPU work for ``threshold`` s."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        sessions = observer.status()["leases"]["sessions"]
        if sum(1 for s in sessions if s["state"] == "active" and not s["busy"]
               and s["idle_s"] >= threshold) >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"the sessions never idled {threshold} s: {sessions}")


def holder_kernels(observer: RawClient) -> set[str]:
    return {h["kernel_id"] for h in observer.status()["leases"]["holders"]}


def idle_counter(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    line = next(x for x in text.splitlines()
                if x.startswith("harp_gpu_seconds_held_idle_total "))
    return float(line.split()[1])


def test_the_idle_holder_with_the_fewest_bytes_is_reclaimed_not_the_longest_idle(
        agent_starter: Any) -> None:
    agent = agent_starter("--slots", "2", "--reclaim-after", RECLAIM_AFTER)
    observer = RawClient(agent.endpoint)
    big = holding(agent.endpoint, 64 * MiB, b"big")  # idle first, so idle longest
    small = holding(agent.endpoint, P.GRANULARITY, b"small")
    waiter = RawClient(agent.endpoint)
    try:
        sessions_idle_past(observer, 2, float(RECLAIM_AFTER))
        assert waiter.take_lease()["state"] == "held"
        assert holder_kernels(observer) == {big.kernel_id, waiter.kernel_id}
        revoked = small.next_push(P.LEASE)["lease"]
        assert (revoked["state"], revoked["reason"]) == ("revoked", "reclaimed")
        assert not [m for m in big.pushed if m["t"] == P.LEASE]
    finally:
        for client in (waiter, small, big, observer):
            client.close()


def test_an_idle_holder_is_not_counted_while_the_waiter_has_a_slot_being_parked_for_it(
        agent_starter: Any) -> None:
    agent = agent_starter("--slots", "2", "--reclaim-after", RECLAIM_AFTER,
                          "--metrics-port", "0", "--metrics-host", "127.0.0.1")
    line = next(x for x in agent.output if "metrics on" in x)
    port = int(line.split("http://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])
    observer = RawClient(agent.endpoint)
    # the parked one (fewer bytes) takes a while to park: its slot is the waiter's, coming;
    # the other idles past reclaim_after all that time with no one waiting for its slot
    parked = holding(agent.endpoint, 256 * MiB, b"parked")
    kept = holding(agent.endpoint, 320 * MiB, b"kept")
    waiter = RawClient(agent.endpoint)
    try:
        sessions_idle_past(observer, 2, float(RECLAIM_AFTER))
        assert idle_counter(port) == 0.0  # nobody waited yet
        assert waiter.take_lease()["state"] == "held"
        assert parked.next_push(P.LEASE)["lease"]["reason"] == "reclaimed"
        assert holder_kernels(observer) == {kept.kernel_id, waiter.kernel_id}
        assert idle_counter(port) == 0.0
    finally:
        for client in (waiter, kept, parked, observer):
            client.close()
