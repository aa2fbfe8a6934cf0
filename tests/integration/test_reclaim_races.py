"""Races between a kernel's calls and the agent ending its lease (reclaim, expiry, an end from
elsewhere), on the client's side, against real emulated agents with the real shim session and
its lease keeper in this process.

No call is ever dropped silently: a batch the worker did not run before its park is sent again
after the restore and runs exactly once; what cannot be made good is an error at the next sync
point.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest

from gpu_agent import protocol as P
from gpu_agent.sizes import format_bytes
from harp_jupyter.magics import LeaseStatus
from harp_jupyter.shim import session as session_module
from harp_jupyter.shim.errors import GPULostError, LeaseLostError
from harp_jupyter.shim.lease import DirectLeaseSource
from harp_jupyter.shim.session import RemoteSession
from tests.agent_client import RawClient
from tests.conftest import free_port_block, running_agent
from tests.shim_sessions import eventually, get, put, script_session
from tests.worker_proxy import WorkerProxy

pytestmark = pytest.mark.timeout(120)
MiB = 1 << 20


def desc(addr: int, n: int) -> list[Any]:
    return [addr, "<f8", [n], [8]]


def busy_session(observer: RawClient) -> dict[str, Any] | None:
    sessions = observer.status()["leases"]["sessions"]
    return next((s for s in sessions if s["busy"]), None)


def end_lease_elsewhere(source: DirectLeaseSource, endpoint: str) -> None:
    """The agent ends the held lease as it does a reclaim or an expiry (it parks the session by
    itself and tells the kernel's keeper), here on a word from another connection."""
    lease = source.keeper.lease
    assert lease is not None
    other = RawClient(endpoint)
    try:
        reply, _ = other.request({"t": P.LEASE_RELEASE, "rid": 1, "lease_id": lease.lease_id,
                                  "token": lease.token})
        assert reply["lease"]["state"] == "released", reply
    finally:
        other.socket.close(0)


def test_calls_waiting_behind_a_running_batch_run_once_after_the_agent_parks_the_session(
        agent_starter: Any) -> None:
    """The race a replay found: the agent parks a session (here: its lease ended) while a batch
    of it waits at the worker behind one that runs. The worker reads its supervisor before the
    next batch, so the park captures the state without it; the shim used to drop it silently."""
    agent = agent_starter()
    observer = RawClient(agent.endpoint)
    counter = np.zeros(4)
    data = np.arange(1000, dtype=np.float64)
    with script_session([agent.endpoint]) as (session, source):
        counter_addr = put(session, counter)
        n = 64 * MiB // 8
        big = session.alloc(n * 8)
        session.call("memset", big, 0, 1, n * 8, None)
        session.synchronize()
        # batch 1: long-running; batch 2, sent right behind it: not idempotent, and new data
        for _ in range(40):
            session.call("array", "power", desc(big, n), [desc(big, n), 1.0001], {}, None)
        session.flush()
        data_addr = session.alloc(data.nbytes)
        session.call("array", "add", desc(counter_addr, 4), [desc(counter_addr, 4), 1.0], {},
                     None)
        session.htod(data_addr, data)
        session.flush()
        eventually(lambda: busy_session(observer))  # batch 1 runs, batch 2 waits behind it
        end_lease_elsewhere(source, agent.endpoint)
        eventually(lambda: source.status()["state"] == "parked")
        # the next sync point leases again, restores, and sends batch 2 again: it runs once
        assert np.array_equal(get(session, data_addr, data), data)
        assert np.array_equal(get(session, counter_addr, counter), counter + 1)
        assert session.restores == 1
    observer.close()


def test_a_release_racing_the_agents_park_is_a_quiet_success(agent_starter: Any) -> None:
    """``%harp release`` just as the agent parked the session by itself (a reclaim, the lease's
    end), before word of it reached the session: 'already parked', not a SessionError.

    The keeper hears that the lease ended from the agent's push to its connection, at once (the
    lease was released from another connection): with a 600 s ttl its next renewal, which also
    says so, is 200 s away."""
    agent = agent_starter("--lease-ttl", "600")
    data = np.arange(1000, dtype=np.float64)
    with script_session([agent.endpoint]) as (session, source):
        source.keeper.config.lease_ttl = 600.0
        addr = put(session, data)
        source.holder = None  # the keeper's word that the lease ended is late to the session
        end_lease_elsewhere(source, agent.endpoint)
        eventually(lambda: source.status()["state"] == "parked")
        source.holder = session
        info = session.release()
        assert info["already"] and info["session"] is not None
        assert session.parked
        assert np.array_equal(get(session, addr, data), data)
        assert session.restores == 1


class EndedBeforeHello(DirectLeaseSource):
    """A direct lease source whose first grant the agent ends before the session's hello (under
    load a granted kernel may not attach within reclaim_after, or its lease expires first)."""

    def __init__(self, endpoints: list[str]) -> None:
        super().__init__(endpoints)
        self.grants: list[str] = []

    def acquire(self, resume: dict[str, Any] | None, notice: Any,
                refused: str | None = None) -> Any:
        grant = super().acquire(resume, notice, refused)
        self.grants.append(grant.lease[0])
        if len(self.grants) == 1:
            end_lease_elsewhere(self, grant.agent)
        return grant


def test_a_lease_that_ended_before_hello_is_queued_for_again(agent_starter: Any) -> None:
    agent = agent_starter()
    source = EndedBeforeHello([agent.endpoint])
    session = RemoteSession(agent.endpoint, lease_source=source)
    source.holder = session
    try:
        data = np.arange(100, dtype=np.float64)
        addr = put(session, data)
        assert np.array_equal(get(session, addr, data), data)
        assert len(source.grants) == 2 and source.grants[0] != source.grants[1]
        assert source.status()["state"] == "held"
    finally:
        session.close()
        source.close()


def test_the_bytes_the_agent_parked_on_a_reclaim_are_in_the_lease_state(
        agent_starter: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A reclaim parks the session on the agent's initiative: the keeper takes the agent's
    figure of what it parked, so ``%harp status`` (and the sidebar) say what is parked."""
    monkeypatch.setenv("HARP_RECLAIM_AFTER", "0.2")
    agent = agent_starter()
    observer = RawClient(agent.endpoint)
    data = np.arange(300_000, dtype=np.float64)
    with script_session([agent.endpoint]) as (session, source):
        addr = put(session, data)
        waiter = RawClient(agent.endpoint)
        waiter.take_lease(wait=False)  # queues: the idle holder is reclaimed for it
        eventually(lambda: source.status()["state"] == "parked")
        at_agent = eventually(lambda: observer.status()["leases"]["parked"])
        assert at_agent[0]["bytes"] >= data.nbytes
        eventually(lambda: source.status()["parked_bytes"] == at_agent[0]["bytes"])
        state = source.status()
        assert state["parked_reason"] == "reclaim"
        shown = dict(LeaseStatus(state)._cells())
        assert shown["parked"] == f"{format_bytes(at_agent[0]['bytes'])} of device memory"
        waiter.close()
        assert np.array_equal(get(session, addr, data), data)
    observer.close()


def test_the_reclaim_after_shown_is_the_one_the_agent_applies(agent_starter: Any) -> None:
    """The kernel asks for 3 s (HARP_RECLAIM_AFTER's default); an agent whose own limit is
    lower applies its own, says so in the grant and its status, and that is what shows."""
    agent = agent_starter("--reclaim-after", "0.5")
    observer = RawClient(agent.endpoint)
    changes: list[dict[str, Any]] = []
    with script_session([agent.endpoint]) as (session, source):
        source.keeper.record.on_change = changes.append
        put(session, np.arange(10, dtype=np.float64))
        state = source.status()
        assert state["state"] == "held" and state["reclaim_after"] == 0.5
        assert dict(LeaseStatus(state)._cells())["given to a waiting kernel after"] == \
            "0.5 s without GPU work"
        held = [c for c in changes if c["state"] == "held"]
        assert held and held[-1]["reclaim_after"] == 0.5  # the lease event carries it
        leases = observer.status()["leases"]
        assert leases["holders"][0]["reclaim_after"] == 0.5 and leases["reclaim_after"] == 0.5
    observer.close()


class ReclaimedBeforeHello(DirectLeaseSource):
    """A direct lease source whose first grant the agent reclaims for a waiting kernel before
    the session's hello (the lease sat idle since its grant)."""

    def __init__(self, endpoints: list[str]) -> None:
        super().__init__(endpoints)
        self.grants: list[str] = []

    def acquire(self, resume: dict[str, Any] | None, notice: Any,
                refused: str | None = None) -> Any:
        grant = super().acquire(resume, notice, refused)
        self.grants.append(grant.lease[0])
        if len(self.grants) == 1:
            waiter = RawClient(grant.agent)
            waiter.take_lease()  # held once the agent reclaimed ours for it
            eventually(lambda: self.keeper.state == "parked")
            waiter.close()
        return grant


def test_a_lease_reclaimed_before_hello_tells_the_next_cell_nothing(
        agent_starter: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel never used the GPU under that lease: no 'parked while idle' note."""
    from harp_jupyter.shim import notice

    monkeypatch.setenv("HARP_RECLAIM_AFTER", "0.1")
    agent = agent_starter()
    source = ReclaimedBeforeHello([agent.endpoint])
    session = RemoteSession(agent.endpoint, lease_source=source)
    source.holder = session
    try:
        data = np.arange(100, dtype=np.float64)
        addr = put(session, data)
        assert np.array_equal(get(session, addr, data), data)
        assert len(source.grants) == 2 and source.status()["parked_reason"] is None
        assert notice.reclaimed() not in notice._pending
    finally:
        notice._pending.clear()
        session.close()
        source.close()


class HoldingProxy(WorkerProxy):
    """Forwards the workers' ports. ``hold(n)`` lets about ``n`` more bytes from the kernel
    through on the connections open now, then reads no more from it: a send then stalls in the
    middle of its message, which the worker has a part of. A connection ends when its worker's
    side ends."""

    def __init__(self, ports: list[int]) -> None:
        self.held = threading.Event()
        self._budgets: list[list[int | None]] = []
        #: the budget connections opened from now on start with (None: not held)
        self._new_budget: int | None = None
        super().__init__(ports)

    def hold(self, nbytes: int | None, *, new_connections: bool = False) -> None:
        """Let ``nbytes`` more through on the open connections, or (``new_connections``) on
        those opened from now on only; None: forward freely."""
        if new_connections:
            self._new_budget = nbytes
            return
        for budget in self._budgets:
            budget[0] = nbytes

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       up_reader: asyncio.StreamReader, up_writer: asyncio.StreamWriter) -> None:
        budget: list[int | None] = [self._new_budget]
        self._budgets.append(budget)

        async def upward() -> None:
            while True:
                if budget[0] is not None and budget[0] <= 0:
                    self.held.set()
                    return  # read no more: the kernel's send stalls
                data = await reader.read(65536 if budget[0] is None else min(65536, budget[0]))
                if not data:
                    return
                if budget[0] is not None:
                    budget[0] -= len(data)
                up_writer.write(data)
                await up_writer.drain()

        async def downward() -> None:
            while data := await up_reader.read(65536):
                writer.write(data)
                await writer.drain()

        up = asyncio.ensure_future(upward())
        try:
            await downward()
        except (ConnectionError, OSError):
            pass
        finally:
            up.cancel()
            self._budgets.remove(budget)
            writer.close()
            up_writer.close()


@contextmanager
def agent_behind_proxy() -> Iterator[tuple[str, HoldingProxy]]:
    ports = free_port_block(6)
    with running_agent("--worker-host", "127.0.0.2", "--worker-ports",
                       f"{ports[1]}-{ports[-1]}", "--worker-advertise", "127.0.0.1",
                       listen=f"tcp://127.0.0.2:{ports[0]}") as agent:
        proxy = HoldingProxy(ports[1:])
        try:
            yield agent.endpoint, proxy
        finally:
            proxy.close()


def end_lease_once_held(source: DirectLeaseSource, endpoint: str, proxy: HoldingProxy,
                        failures: list[BaseException]) -> threading.Thread:
    def run() -> None:
        try:
            assert proxy.held.wait(30), "the send never started"
            end_lease_elsewhere(source, endpoint)
        except BaseException as e:  # reported by the test's thread
            failures.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("how", ["memcpy_htod", "call"])
def test_a_copy_whose_send_the_agents_park_cuts_is_sent_again_once_after_the_restore(
        how: str) -> None:
    """The race a replay under load found: the kernel is in the middle of sending a large
    host-to-device copy (its worker has a part of the message: to the agent the lease looks
    idle) when the agent parks the session. The worker exits and the link drops under the
    send; the copy, and the call batched with it, run exactly once after the restore, and
    the program never sees a GPULostError."""
    counter = np.zeros(4)
    big = np.random.default_rng(7).random(48 * MiB // 8)  # 3 chunks, none fits in the buffers
    failures: list[BaseException] = []
    with agent_behind_proxy() as (endpoint, proxy), \
            script_session([endpoint]) as (session, source):
        counter_addr = put(session, counter)
        big_addr = session.alloc(big.nbytes)
        session.synchronize()
        proxy.hold(64 << 10)
        ender = end_lease_once_held(source, endpoint, proxy, failures)
        session.call("array", "add", desc(counter_addr, 4), [desc(counter_addr, 4), 1.0], {},
                     None)
        if how == "memcpy_htod":
            session.htod(big_addr, big)
        else:
            session.call("htod", big_addr, big, None)
        ender.join(30)
        assert not failures, failures
        assert session.restores == 1
        assert np.array_equal(get(session, big_addr, big), big)
        assert np.array_equal(get(session, counter_addr, counter), counter + 1)


def link_seen_dropped(session: RemoteSession) -> bool:
    writer = session.current_writer()
    assert writer is not None
    try:
        writer.connection.poll_alive()
    except GPULostError:
        return True
    return False


def test_a_call_sent_on_a_link_known_dropped_runs_once_after_the_restore(
        agent_starter: Any) -> None:
    """The agent parked the session and its worker is gone, the connection knows, but the
    agent's word has not reached the session yet: the send of the next call fails in the
    middle of adding it. That is the park, not a loss: the call runs once after the restore
    (it used to raise 'lost the GPU agent' and still run after the next restore)."""
    agent = agent_starter()
    counter = np.zeros(4)
    with script_session([agent.endpoint]) as (session, source):
        counter_addr = put(session, counter)
        source.holder = None  # the keeper's word that the lease ended is late to the session
        end_lease_elsewhere(source, agent.endpoint)
        eventually(lambda: source.status()["state"] == "parked")
        eventually(lambda: link_seen_dropped(session))
        source.holder = session
        session.call_sync("array", "add", desc(counter_addr, 4), [desc(counter_addr, 4), 1.0],
                          {}, None)
        assert session.restores == 1
        assert np.array_equal(get(session, counter_addr, counter), counter + 1)


def window_full(session: RemoteSession, other_than: Any = None) -> bool:
    """The session's writer (a new one, when ``other_than`` is given) has as many batches on
    their way as it may: the next one waits for a reply (none comes: the proxy holds them)."""
    writer = session.current_writer()
    return (writer is not None and writer is not other_than
            and writer.inflight >= writer.max_inflight)


def park_twice(session: RemoteSession, source: DirectLeaseSource, endpoint: str,
               proxy: HoldingProxy, failures: list[BaseException]) -> threading.Thread:
    """Ends the lease once the session's window is full (its sends stalled in the proxy), and
    again once the restored session's is; the restore after that sends freely."""
    def run() -> None:
        try:
            eventually(lambda: window_full(session))
            first = session.current_writer()
            end_lease_elsewhere(source, endpoint)
            eventually(lambda: window_full(session, other_than=first))
            proxy.hold(None, new_connections=True)
            end_lease_elsewhere(source, endpoint)
        except BaseException as e:  # reported by the test's thread
            failures.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_a_second_park_during_the_restores_resend_restores_again() -> None:
    """The agent parks the session while ten 16 MiB copies are on their way (8 sent, the window
    full), and again while the restored session sends them again: its 9th must wait for a
    reply, and the link drops under that wait. The session waits and restores once more
    (it used to raise GPULostError from the restore); every copy runs exactly once."""
    big = np.random.default_rng(11).random(160 * MiB // 8)
    failures: list[BaseException] = []
    with agent_behind_proxy() as (endpoint, proxy), \
            script_session([endpoint]) as (session, source):
        big_addr = session.alloc(big.nbytes)
        session.synchronize()
        proxy.hold(64 << 10)
        proxy.hold(64 << 10, new_connections=True)
        ender = park_twice(session, source, endpoint, proxy, failures)
        session.htod(big_addr, big, keep=True)  # ten batches, one per chunk
        back = get(session, big_addr, big)
        ender.join(30)
        assert not failures, failures
        assert session.restores == 2 and session.parks == 0
        assert np.array_equal(back, big)


def test_parks_during_restores_are_bounded_and_then_said(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past ``RESTORE_PARKS`` parks in a row during restores (here 1, so the second park ends
    it), the GPU call says what happened, and which calls did not run, instead of restoring
    forever; the session stays parked, and the program's next GPU call restores it."""
    monkeypatch.setattr(session_module, "RESTORE_PARKS", 1)
    big = np.random.default_rng(12).random(160 * MiB // 8)
    failures: list[BaseException] = []
    with agent_behind_proxy() as (endpoint, proxy), \
            script_session([endpoint]) as (session, source):
        big_addr = session.alloc(big.nbytes)
        session.synchronize()
        proxy.hold(64 << 10)
        proxy.hold(64 << 10, new_connections=True)
        ender = park_twice(session, source, endpoint, proxy, failures)
        session.htod(big_addr, big, keep=True)
        with pytest.raises(LeaseLostError) as raised:
            get(session, big_addr, big)
        ender.join(30)
        assert not failures, failures
        message = str(raised.value)
        assert message.startswith("the agent parked this kernel's GPU session 1 time in a row "
                                  "while it was being restored"), message
        assert "GPU calls did not run" in message and "re-run the code" in message
        assert "test_reclaim_races.py" in message  # the first call that did not run: here
        assert session.parked
        session.htod(big_addr, big, keep=True)  # run again: once
        assert np.array_equal(get(session, big_addr, big), big)
        assert session.restores == 2  # the one the second park cut, and this one


def test_a_lone_sync_call_the_agents_park_leaves_unanswered_runs_once_after_the_restore(
        ) -> None:
    """A synchronous call alone on the link goes as a batch of its own straight to its reply.
    The agent parks the session after its send and before the worker read it: it is still in
    the in-flight record, so it is sent again after the restore and runs exactly once."""
    counter = np.zeros(4)
    with agent_behind_proxy() as (endpoint, proxy), \
            script_session([endpoint]) as (session, source):
        counter_addr = put(session, counter)
        session.synchronize()
        writer = session.current_writer()
        assert writer is not None
        proxy.hold(1)
        session.call_sync("mem_get_info")  # through whole; the worker reads nothing after it
        assert proxy.held.wait(30)
        failures: list[BaseException] = []

        def end_once_sent() -> None:
            try:
                eventually(lambda: writer.inflight == 1)
                end_lease_elsewhere(source, endpoint)
            except BaseException as e:  # reported by the test's thread
                failures.append(e)

        ender = threading.Thread(target=end_once_sent, daemon=True)
        ender.start()
        session.call_sync("array", "add", desc(counter_addr, 4), [desc(counter_addr, 4), 1.0],
                          {}, None)
        ender.join(30)
        assert not failures, failures
        assert session.restores == 1
        assert np.array_equal(get(session, counter_addr, counter), counter + 1)
