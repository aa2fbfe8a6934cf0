"""Graceful drain on SIGTERM, with real agent processes (emulated executor) and the real shim.

What must hold: the draining agent is unready at once and grants nothing more; a running cell
finishes; an idle session's arrays (held or already parked) come back intact, at the same
addresses, on another agent of the pool; a kernel queued there is served by another agent; the
agent exits 0 within its grace.
"""

from __future__ import annotations

import re
import signal
import threading
import urllib.error
import urllib.request
from typing import Any

import numpy as np
import pytest
import zmq

from gpu_agent import protocol as P
from harp_jupyter.shim.session import get_session
from provisioner.lease_client import BlockingLeaseClient
from tests.agent_client import RawClient, wait_for
from tests.integration.test_park_restore import pycuda_modules

pytestmark = pytest.mark.timeout(90)

MiB = 1 << 20
GRACE = "60"



def readyz(agent: Any) -> int:
    port = next(re.search(r":(\d+)/metrics", line)[1] for line in agent.output
                if "metrics on" in line)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as reply:
            return reply.status
    except urllib.error.HTTPError as e:
        return e.code


def exits_zero(agent: Any) -> None:
    """The agent exits by itself, with 0, within its grace (the test's deadline is above it)."""
    assert agent.process.wait(float(GRACE) + 15) == 0, "".join(agent.output)


def test_a_running_cell_finishes_and_the_agent_exits_zero(
        agent_starter: Any, lease_client: BlockingLeaseClient) -> None:
    agent = agent_starter("--drain-grace", GRACE, "--metrics-port", "0")
    client = RawClient(agent.endpoint, timeout_ms=60_000)
    try:
        base = client.hello()["range"][0]
        n = 16 * MiB
        desc = [base, "<f8", [n // 8], [8]]
        assert client.batch(["alloc", base, n])[0]["e"] is None
        assert readyz(agent) == 200
        assert client.data is not None
        client.data.send_multipart(P.encode({"t": P.BATCH, "q": 99, "c": [
            ["array", "power", desc, [desc, 1.0001], {}, None] for _ in range(100)]}))
        wait_for(lambda: any(s["busy"] for s in lease_client.status(agent.endpoint)
                             ["leases"]["sessions"]), what="the cell to run", timeout=30)
        agent.process.send_signal(signal.SIGTERM)
        wait_for(lambda: readyz(agent) == 503, what="/readyz to say unready", timeout=30)
        status = wait_for(lambda: (lambda s: s if s["draining"] else None)(
            lease_client.status(agent.endpoint)), what="the status to say draining", timeout=30)
        assert status["leases"]["draining"]
        with pytest.raises(Exception, match="shutting down"):
            lease_client.request(agent.endpoint, "newcomer", "s")
        reply, _ = P.decode(client.data.recv_multipart())
        assert reply["q"] == 99 and reply["e"] is None  # the cell finished
        exits_zero(agent)
        client.lease = None  # the agent is gone: nothing to release
    finally:
        client.close()


@pytest.mark.parametrize("released", [False, True], ids=["held-idle", "already-parked"])
def test_an_idle_sessions_arrays_come_back_intact_on_the_other_agent(
        agent_starter: Any, monkeypatch: pytest.MonkeyPatch, lease_client: BlockingLeaseClient,
        released: bool) -> None:
    second = agent_starter()
    first = agent_starter("--drain-grace", GRACE, "--pool", second.endpoint)
    monkeypatch.setenv("HARP_AGENTS", f"{first.endpoint},{second.endpoint}")
    with pycuda_modules() as (cuda, gpuarray):
        host = np.random.default_rng(7).random(200_000)
        a = gpuarray.to_gpu(host)
        b = a * 3
        pointer = int(b.gpudata)
        session = get_session()
        assert session.endpoint == first.endpoint
        session.lease_source.keeper.config.lease_ttl = 3.0  # type: ignore[attr-defined]
        if released:
            session.release()
        first.process.send_signal(signal.SIGTERM)
        exits_zero(first)  # it exits once the parked state has moved
        parked = lease_client.status(second.endpoint)["leases"]["parked"]
        assert [p["bytes"] for p in parked] and parked[0]["bytes"] >= 2 * host.nbytes
        wait_for(lambda: not session.connected, what="the kernel to hear its lease ended",
                 timeout=30)
        # its keeper heard the drain (or, parked already, asks its agent every 1 s): it shows
        # where the state went before any GPU call
        state = wait_for(lambda: (lambda s: s if s["agent"] == second.endpoint else None)(
            session.lease_source.status()), what="the keeper to show the state moved", timeout=30)
        assert state["state"] == "parked" and second.endpoint in state["message"], state

        assert np.array_equal((a + b).get(), host * 4)  # the next cell restores on the other
        assert session.endpoint == second.endpoint
        assert int(b.gpudata) == pointer
        back = np.empty_like(host)
        cuda.memcpy_dtoh(back, pointer)
        assert np.array_equal(back, host * 3)
        assert lease_client.status(second.endpoint)["leases"]["parked"] == []


def test_a_dead_agent_of_the_pool_is_passed_over_and_the_state_moves_to_the_next(
        agent_starter: Any, monkeypatch: pytest.MonkeyPatch,
        lease_client: BlockingLeaseClient) -> None:
    """The first agent of --pool takes the offer's connection and never answers (a hung pod):
    after --drain-offer-timeout the state goes to the next agent, long before the grace ends
    (without the timeout it stays offered to the dead one and is dropped at the grace's end)."""
    context = zmq.Context.instance()
    dead = context.socket(zmq.ROUTER)
    dead.setsockopt(zmq.LINGER, 0)
    port = dead.bind_to_random_port("tcp://127.0.0.1")
    second = agent_starter()
    first = agent_starter("--drain-grace", "600", "--drain-offer-timeout", "1",
                          "--pool", f"tcp://127.0.0.1:{port},{second.endpoint}")
    monkeypatch.setenv("HARP_AGENTS", f"{first.endpoint},{second.endpoint}")
    try:
        with pycuda_modules() as (_cuda, gpuarray):
            host = np.arange(50_000.0)
            a = gpuarray.to_gpu(host)
            get_session().release()
            first.process.send_signal(signal.SIGTERM)
            assert first.process.wait(80) == 0, "".join(first.output)  # not the 600 s grace
            assert dead.poll(0), "the dead agent was offered the state first"
            assert [p["bytes"] for p in lease_client.status(second.endpoint)["leases"]["parked"]]
            assert any("did not answer the offer" in line for line in first.output)
            assert np.array_equal(a.get(), host)
            assert get_session().endpoint == second.endpoint
    finally:
        dead.close(0)


@pytest.mark.parametrize("released", [False, True], ids=["held-idle", "already-parked"])
def test_state_no_agent_took_is_lost_with_a_reason_that_names_the_drain(
        agent_starter: Any, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], released: bool) -> None:
    """The draining agent has no pool to hand its parked state to and exits. Its keeper shows
    the state lost as soon as the agent is gone, before any GPU call (not "parked" until the
    next call finds out), with the reason and what to do: a kernel holding a lease heard the
    drain (its lease ended, reason draining); one parked already asks its agent every
    lease_ttl / 3 s (here 1 s) and finds it gone. The next GPU call says the state went with
    that agent, at once (the other agent would wait --fetch-timeout for the gone one), in those
    words, and the call after starts a fresh session there."""
    second = agent_starter("--fetch-timeout", "600")
    first = agent_starter("--drain-grace", GRACE)
    monkeypatch.setenv("HARP_AGENTS", f"{first.endpoint},{second.endpoint}")
    with pycuda_modules() as (cuda, gpuarray):
        a = gpuarray.to_gpu(np.arange(1000.0))
        session = get_session()
        session.lease_source.keeper.config.lease_ttl = 3.0  # type: ignore[attr-defined]
        if released:
            session.release()
        first.process.send_signal(signal.SIGTERM)
        exits_zero(first)
        wait_for(lambda: not session.connected, what="the kernel to hear its lease ended",
                 timeout=30)
        agent = f"the GPU agent at {first.endpoint}"
        drained = (f"{agent} shut down (a drain, SIGTERM) and no other agent of its pool took "
                   "your parked GPU state")
        state = wait_for(lambda: (lambda s: s if s["state"] == "lost" else None)(
            session.lease_source.status()), what="the keeper to show the state lost", timeout=30)
        assert agent in state["message"] and "re-run" in state["message"], state
        assert released or drained in state["message"], state
        assert state["agent"] is None and state["parked_bytes"] == 0, state
        capsys.readouterr()
        with pytest.raises(cuda.GPULostError) as raised:
            a.get()
        assert str(raised.value).startswith(f"your parked GPU state is gone: {agent}"), \
            raised.value
        assert released or str(raised.value).startswith(f"your parked GPU state is gone: "
                                                        f"{drained}"), raised.value
        assert "re-run the code that creates your device arrays" in str(raised.value)
        told = capsys.readouterr().err
        assert f"The GPU agent at {first.endpoint}" in told, told
        assert np.array_equal(gpuarray.to_gpu(np.arange(5.0)).get(), np.arange(5.0))
        assert get_session().endpoint == second.endpoint


def test_a_queued_kernel_is_served_by_the_other_agent(
        agent_starter: Any, monkeypatch: pytest.MonkeyPatch,
        lease_client: BlockingLeaseClient) -> None:
    second = agent_starter()
    first = agent_starter("--drain-grace", GRACE, "--pool", second.endpoint)
    monkeypatch.setenv("HARP_AGENTS", f"{first.endpoint},{second.endpoint}")
    here = lease_client.request(first.endpoint, "holder-1", "s")
    there = lease_client.request(second.endpoint, "holder-2", "s")
    assert here["state"] == there["state"] == "held"
    with pycuda_modules() as (_cuda, gpuarray):
        result: dict[str, Any] = {}

        def cell() -> None:
            try:
                result["value"] = gpuarray.to_gpu(np.arange(10.0)).get()
            except Exception as e:  # the assertion below says what
                result["error"] = e

        thread = threading.Thread(target=cell)
        thread.start()
        wait_for(lambda: lease_client.status(first.endpoint)["leases"]["queue"],
                 what="the kernel to queue at the first agent", timeout=30)
        first.process.send_signal(signal.SIGTERM)
        wait_for(lambda: lease_client.status(second.endpoint)["leases"]["queue"],
                 what="the kernel to queue at the second agent", timeout=30)
        exits_zero(first)
        lease_client.release(second.endpoint, there["id"], there["token"])
        thread.join(30)
        assert "error" not in result, result.get("error")
        assert np.array_equal(result["value"], np.arange(10.0))
        assert get_session().endpoint == second.endpoint


def test_parked_adopt_is_refused_without_the_token_or_a_free_slot(agent_starter: Any) -> None:
    agent = agent_starter("--token", "pool-token")
    offer = {"t": P.PARKED_ADOPT, "rid": 5, "session": "s1", "resume_token": "r",
             "kernel_id": "k", "kernel_secret": "ks", "from": "tcp://127.0.0.1:9",
             "range": [P.ADDRESS_SPACE_BASE, P.SESSION_RANGE_SIZE], "client": {}}
    holder = RawClient(agent.endpoint)
    try:
        reply, _ = holder.request(offer)
        assert reply["t"] == P.ERROR and reply["e"]["kind"] == "AuthError"
        holder.take_lease(token="pool-token")  # the only slot is held now
        reply, _ = holder.request({**offer, "token": "pool-token"})
        assert reply["t"] == P.ERROR and "no free slot" in reply["e"]["msg"]
        reply, _ = holder.request({**offer, "token": "pool-token", "from": "not-an-endpoint"})
        assert reply["t"] == P.ERROR and "'from'" in reply["e"]["msg"]
    finally:
        holder.close()
