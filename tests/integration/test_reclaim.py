"""Reclaim on demand at the agent, and its metrics scraped by a real Prometheus server.

A waiting kernel gets the GPU as soon as a holder has been idle for ``reclaim_after``: the holder
is parked (its lease revoked with reason "reclaimed"), never interrupted while a batch runs, and
finds its memory intact when it comes back. Without waiters nobody is reclaimed.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from gpu_agent import protocol as P
from tests.agent_client import RawClient, result_bytes
from tests.integration.prometheus_server import prometheus_binary, running_prometheus

pytestmark = pytest.mark.timeout(120)
MiB = 1 << 20


def held_with_data(client: RawClient, data: bytes) -> int:
    base = client.hello()["range"][0]
    reply, _ = client.batch(["alloc", base, P.GRANULARITY], ["htod", base, data, None])
    assert reply["e"] is None
    return base


def test_an_idle_holder_is_reclaimed_for_a_waiter_and_comes_back_intact(
        agent_starter: Any) -> None:
    agent = agent_starter("--reclaim-after", "1")
    holder, waiter = RawClient(agent.endpoint), RawClient(agent.endpoint)
    try:
        base = held_with_data(holder, b"holder's")
        session = holder.welcome["session"], holder.welcome["resume_token"]
        asked = time.monotonic()
        lease = waiter.take_lease()  # queued, then granted once the holder is parked
        waited = time.monotonic() - asked
        assert lease["state"] == "held"
        revoked = holder.next_push(P.LEASE)
        assert revoked["lease"]["state"] == "revoked"
        assert revoked["lease"]["reason"] == "reclaimed"
        assert waited < 30  # (the benchmark measures it; this only guards against a hang)
        waiter.release()
        holder.take_lease()
        welcome = holder.hello(resume={"session": session[0], "resume_token": session[1]})
        assert welcome["t"] == P.WELCOME, welcome
        reply, frames = holder.batch(["dtoh", base, 8, None])
        assert reply["e"] is None and result_bytes(reply, frames) == b"holder's"
    finally:
        holder.close()
        waiter.close()


def test_without_a_waiter_nobody_is_reclaimed(agent_starter: Any) -> None:
    agent = agent_starter("--reclaim-after", "0.2")
    holder, observer = RawClient(agent.endpoint), RawClient(agent.endpoint)
    try:
        held_with_data(holder, b"x")
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:  # well past reclaim_after, nobody waits
            assert len(observer.status()["leases"]["holders"]) == 1
            time.sleep(0.1)
        assert not holder.pushed
    finally:
        holder.close()
        observer.close()


def test_a_running_batch_is_never_interrupted_by_a_reclaim(agent_starter: Any) -> None:
    agent = agent_starter("--reclaim-after", "0.2")
    holder = RawClient(agent.endpoint, timeout_ms=60_000)
    waiter = RawClient(agent.endpoint)
    try:
        base = held_with_data(holder, b"busy")
        n = 64 * MiB
        reply, _ = holder.batch(["alloc", base + P.GRANULARITY, n])
        assert reply["e"] is None
        desc = [base + P.GRANULARITY, "<f8", [n // 8], [8]]
        assert holder.data is not None
        holder.data.send_multipart(P.encode({"t": P.BATCH, "q": 77, "c": [
            ["array", "power", desc, [desc, 1.0001], {}, None] for _ in range(40)]}))
        waiter.socket.send_multipart(P.encode({
            "t": P.LEASE_REQUEST, "rid": 1, "kernel_id": waiter.kernel_id,
            "kernel_secret": "secret"}))
        reply, _ = P.decode(holder.data.recv_multipart())
        assert reply["q"] == 77 and reply["e"] is None  # the whole batch ran
        granted = waiter.next_push(P.LEASE) if waiter.lease is None else None
        while granted is not None and granted["lease"]["state"] != "held":
            granted = waiter.next_push(P.LEASE)
        assert holder.next_push(P.LEASE)["lease"]["reason"] == "reclaimed"
    finally:
        holder.close()
        waiter.close()


@pytest.mark.skipif(prometheus_binary() is None,
                    reason="needs Debian's prometheus (scripts/test installs it)")
def test_a_real_prometheus_scrapes_a_real_agent(agent_starter: Any, tmp_path: Path) -> None:
    agent = agent_starter("--metrics-port", "0", "--metrics-host", "127.0.0.1",
                          "--reclaim-after", "0.5")
    line = next(x for x in agent.output if "metrics on" in x)
    port = int(line.split("http://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])
    holder, waiter = RawClient(agent.endpoint), RawClient(agent.endpoint)
    try:
        held_with_data(holder, b"scraped")
        with running_prometheus([f"127.0.0.1:{port}"], tmp_path) as prometheus:
            prometheus.wait_for("harp_leases_held == 1")
            prometheus.wait_for("harp_sessions{state=\"active\"} == 1")
            waiter.take_lease()  # the holder is reclaimed and parked
            prometheus.wait_for("harp_reclaims_total >= 1")
            prometheus.wait_for("harp_parks_total >= 1")
            prometheus.wait_for("harp_parked_bytes{where=\"memory\"} > 0")
            result = prometheus.wait_for("harp_lease_wait_seconds_count >= 2")
            assert result
    finally:
        holder.close()
        waiter.close()
