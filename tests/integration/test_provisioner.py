"""The provisioner against real agent subprocesses: LeaseClient, the control socket, the lease
keeper (with a kernel played by a raw DEALER speaking the control protocol), local agents, and
ElasticGPUProvisioner driving real ipykernel processes through jupyter_client.

Waits poll a condition until a generous deadline; no test asserts how long anything took.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.asyncio

from gpu_agent import protocol as P
from harp_jupyter.shim.lease import ControlLeaseSource
from provisioner.control import ControlServer, KernelNotConnected
from provisioner.keeper_config import KeeperConfig
from provisioner.kernel_lease import KernelLease
from provisioner.lease_client import (
    AgentUnreachable,
    BlockingLeaseClient,
    LeaseClient,
    LeaseRefused,
)
from provisioner.local_agents import LocalAgents

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(180)


async def until(check: Callable[[], Any], timeout: float = 20, every: float = 0.05) -> Any:
    """The first truthy value of ``check()`` (sync or async), polled until ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if isinstance(value, Awaitable):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {timeout} s: {check}")
        await asyncio.sleep(every)


def pushes_into(queue: asyncio.Queue[tuple[str, dict[str, Any]]]
                ) -> Callable[[str, dict[str, Any]], None]:
    return lambda endpoint, lease: queue.put_nowait((endpoint, lease))


# {{{ LeaseClient


def test_grant_queue_positions_are_pushed_and_release_promotes_the_next(
        agent_starter: Any) -> None:
    agent = agent_starter()

    async def scenario() -> None:
        pushed: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()
        client = LeaseClient(on_push=pushes_into(pushed))
        try:
            first = await client.request(agent.endpoint, "k1", "s1", "ann")
            second = await client.request(agent.endpoint, "k2", "s2", "bob")
            third = await client.request(agent.endpoint, "k3", "s3", "cy")
            assert (first["state"], first["position"]) == ("held", 0)
            assert (second["state"], second["position"]) == ("queued", 1)
            assert (third["state"], third["position"]) == ("queued", 2)
            assert first["agent"] == agent.endpoint and first["token"]
            renewed = await client.renew(agent.endpoint, second["id"], second["token"])
            assert renewed["state"] == "queued" and "token" not in renewed

            released = await client.release(agent.endpoint, first["id"], first["token"])
            assert released["state"] == "released"
            seen: dict[str, dict[str, Any]] = {}
            while len(seen) < 2:
                endpoint, lease = await asyncio.wait_for(pushed.get(), 20)
                assert endpoint == agent.endpoint
                seen[lease["id"]] = lease
            assert (seen[second["id"]]["state"], seen[second["id"]]["position"]) == ("held", 0)
            assert (seen[third["id"]]["state"], seen[third["id"]]["position"]) == ("queued", 1)
            status = (await client.status(agent.endpoint))["leases"]
            assert status["holder"]["kernel_id"] == "k2"
            assert [q["kernel_id"] for q in status["queue"]] == ["k3"]
        finally:
            await client.close()

    asyncio.run(scenario())


def test_statuses_of_two_agents_and_one_that_does_not_exist(agent_starter: Any) -> None:
    a, b = agent_starter(), agent_starter()
    nowhere = f"tcp://127.0.0.1:{_closed_port()}"

    async def scenario() -> None:
        client = LeaseClient()
        try:
            lease = await client.request(b.endpoint, "k1", "s1")
            statuses = await client.statuses([a.endpoint, nowhere, b.endpoint], timeout=1)
            assert list(statuses) == [a.endpoint, b.endpoint]
            assert statuses[a.endpoint]["leases"]["holder"] is None
            assert statuses[b.endpoint]["leases"]["holder"]["lease_id"] == lease["id"]
            with pytest.raises(AgentUnreachable, match=nowhere.replace(".", r"\.")):
                await client.status(nowhere, timeout=0.5)
        finally:
            await client.close()

    asyncio.run(scenario())


def test_unrenewed_lease_expires_and_is_pushed(agent_starter: Any) -> None:
    agent = agent_starter("--lease-ttl", "1")

    async def scenario() -> None:
        pushed: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()
        client = LeaseClient(on_push=pushes_into(pushed))
        try:
            lease = await client.request(agent.endpoint, "k1", "s1", ttl=60)
            assert lease["ttl"] == 1  # the agent caps what a request asks
            _, ended = await asyncio.wait_for(pushed.get(), 20)
            assert (ended["id"], ended["state"]) == (lease["id"], "expired")
            with pytest.raises(LeaseRefused) as refused:
                await client.renew(agent.endpoint, lease["id"], lease["token"])
            assert refused.value.kind == "LeaseError" and "expired" in refused.value.msg
        finally:
            await client.close()

    asyncio.run(scenario())


def test_wrong_tokens_are_refused(agent_starter: Any) -> None:
    agent = agent_starter("--token", "right")

    async def scenario() -> None:
        wrong, right = LeaseClient(token="wrong"), LeaseClient(token="right")
        try:
            with pytest.raises(LeaseRefused) as refused:
                await wrong.request(agent.endpoint, "k1", "s1")
            assert refused.value.kind == "AuthError" and "token" in refused.value.msg
            lease = await right.request(agent.endpoint, "k1", "s1")
            assert lease["state"] == "held"
            with pytest.raises(LeaseRefused) as refused:
                await right.renew(agent.endpoint, lease["id"], "not-the-lease-token")
            assert refused.value.kind == "LeaseError"
            with pytest.raises(LeaseRefused):
                await right.request(agent.endpoint, "k1", "another-kernel-secret")
            await right.release(agent.endpoint, lease["id"], lease["token"])
            dropped = await right.drop_parked(agent.endpoint, "k1", "s1")
            assert dropped["t"] == "dropped" and dropped["sessions"] == 0
        finally:
            await wrong.close()
            await right.close()

    asyncio.run(scenario())


def test_blocking_client_and_its_pushes(emulated_agent: Any) -> None:
    pushed: list[dict[str, Any]] = []
    client = BlockingLeaseClient(on_push=lambda endpoint, lease: pushed.append(lease))
    try:
        first = client.request(emulated_agent.endpoint, "k1", "s1")
        second = client.request(emulated_agent.endpoint, "k2", "s2")
        assert second["state"] == "queued"
        client.release(emulated_agent.endpoint, first["id"], first["token"])
        granted = client.wait_change(emulated_agent.endpoint, second, timeout=20)
        assert granted["state"] == "held"
        assert any(p["id"] == second["id"] and p["state"] == "held" for p in pushed)
        client.release(emulated_agent.endpoint, second["id"], second["token"])
    finally:
        client.close()
        client.close()  # idempotent


# }}}

# {{{ the control socket, with a kernel played by a raw DEALER


class FakeKernelSocket:
    """The kernel end of a control socket: a DEALER sending msgpack headers (the test's own
    client of the wire protocol, like the bad-input tests' raw sockets)."""

    def __init__(self, endpoint: str, key: str) -> None:
        self.key = key
        self.socket = zmq.asyncio.Context.instance().socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(endpoint)

    async def send(self, header: dict[str, Any], *, key: str | None = None) -> None:
        await self.socket.send(P.pack_header({**header, "key": self.key if key is None
                                              else key}))

    async def recv(self, timeout: float = 20) -> dict[str, Any]:
        return P.unpack_header(await asyncio.wait_for(self.socket.recv(), timeout))

    async def request(self, header: dict[str, Any]) -> dict[str, Any]:
        await self.send(header)
        return await self.recv()

    def close(self) -> None:
        self.socket.close(0)


def test_control_server_checks_the_key_and_keeps_serving() -> None:
    async def scenario() -> None:
        async def echo(request: Any) -> dict[str, Any]:
            return {"t": "ok", "got": request.header.get("x")}

        async def broken(request: Any) -> dict[str, Any]:
            raise ValueError("a bug")

        server = ControlServer({"echo": echo, "broken": broken})
        endpoint = await server.start()
        kernel = FakeKernelSocket(endpoint, server.key)
        try:
            await kernel.send({"t": "echo", "rid": 1, "x": 1}, key="wrong")
            reply = await kernel.recv()
            assert (reply["t"], reply["rid"], reply["e"]["kind"]) == ("error", 1, "AuthError")
            assert not server.kernel_connected  # a wrong key teaches the server nothing
            await kernel.socket.send(b"\xc1 not msgpack")
            assert (await kernel.recv())["e"]["kind"] == "ProtocolError"
            reply = await kernel.request({"t": "nonsense", "rid": 2})
            assert (reply["rid"], reply["e"]["kind"]) == (2, "ProtocolError")
            reply = await kernel.request({"t": "broken", "rid": 3})
            assert (reply["rid"], reply["e"]["kind"]) == (3, "RuntimeError")
            assert "a bug" in reply["e"]["msg"]
            reply = await kernel.request({"t": "echo", "rid": 4, "x": 42})
            assert reply == {"t": "ok", "got": 42, "rid": 4}
        finally:
            kernel.close()
            await server.close()
            await server.close()  # idempotent

    asyncio.run(scenario())


def test_control_server_asks_the_kernel_and_matches_the_answer_by_rid() -> None:
    async def scenario() -> None:
        server = ControlServer({})
        endpoint = await server.start()
        with pytest.raises(KernelNotConnected):
            await server.ask({"t": "park", "reason": "idle"}, timeout=1)
        kernel = FakeKernelSocket(endpoint, server.key)
        try:
            await kernel.request({"t": "hello", "rid": 1})  # unknown: error, but connected now
            assert server.kernel_connected
            asking = asyncio.ensure_future(server.ask({"t": "park", "reason": "idle"}, 20))
            ask = await kernel.recv()
            assert ask["t"] == "park" and ask["reason"] == "idle"
            await kernel.send({"t": "parked", "rid": ask["rid"], "session": "s", "bytes": 8})
            answer = await asking
            assert answer["t"] == "parked" and answer["bytes"] == 8
            with pytest.raises(TimeoutError):
                await server.ask({"t": "park", "reason": "idle"}, timeout=0.3)
        finally:
            kernel.close()
            await server.close()

    asyncio.run(scenario())


def test_a_second_server_takes_over_the_same_port_and_key() -> None:
    """A restarted server re-creates the socket the kernel knows; the kernel's own client
    (ControlLeaseSource) gets its answers from it, though ZeroMQ may drop a message sent while
    it reconnects: the client resends until it hears back."""
    async def scenario() -> None:
        calls: list[int] = []

        async def status(request: Any) -> dict[str, Any]:
            calls.append(request.rid)
            return {"t": "ok", "server": len(servers)}

        servers = [ControlServer({"status": status})]
        endpoint = await servers[0].start()
        kernel = ControlLeaseSource(endpoint, servers[0].key, timeout=20)
        try:
            assert (await asyncio.to_thread(kernel.status))["server"] == 1
            await servers[0].close()
            servers.append(ControlServer({"status": status}))
            assert await servers[1].start(servers[0].port, servers[0].key) == endpoint
            for _ in range(5):
                assert (await asyncio.to_thread(kernel.status))["server"] == 2
            assert len(calls) == len(set(calls)) == 6, calls
        finally:
            await asyncio.to_thread(kernel.close)
            await servers[-1].close()

    asyncio.run(scenario())


def test_a_resent_request_runs_once_and_gets_the_same_answer() -> None:
    async def scenario() -> None:
        release = asyncio.Event()
        runs: list[Any] = []

        async def slow(request: Any) -> dict[str, Any]:
            runs.append(request.rid)
            await release.wait()
            return {"t": "ok", "run": len(runs)}

        server = ControlServer({"status": slow})
        endpoint = await server.start()
        kernel = FakeKernelSocket(endpoint, server.key)
        try:
            await kernel.send({"t": "status", "rid": 7})
            await kernel.send({"t": "status", "rid": 7})  # while the first is being handled
            with pytest.raises(TimeoutError):
                await kernel.recv(timeout=0.3)
            release.set()
            assert await kernel.recv() == {"t": "ok", "run": 1, "rid": 7}
            await kernel.send({"t": "status", "rid": 7})  # after it was answered
            assert await kernel.recv() == {"t": "ok", "run": 1, "rid": 7}
            with pytest.raises(TimeoutError):
                await kernel.recv(timeout=0.3)
            assert runs == [7]
        finally:
            kernel.close()
            await server.close()

    asyncio.run(scenario())


# }}}

# {{{ KernelLease / LeaseKeeper with real agents


@asynccontextmanager
async def kernel_lease(agents: list[str], kernel_id: str = "k1", **config: Any
                       ) -> AsyncIterator[tuple[KernelLease, FakeKernelSocket]]:
    async def resolve() -> list[str]:
        return agents

    lease = KernelLease(KeeperConfig(kernel_id, f"secret-{kernel_id}", **config), resolve,
                        token=None)
    await lease.start()
    assert lease.control.endpoint is not None
    kernel = FakeKernelSocket(lease.control.endpoint, lease.control.key)
    try:
        yield lease, kernel
    finally:
        kernel.close()
        await lease.stop()


async def holder(client: LeaseClient, endpoint: str) -> str | None:
    return ((await client.status(endpoint))["leases"]["holder"] or {}).get("kernel_id")


async def is_free(client: LeaseClient, endpoint: str) -> bool:
    return await holder(client, endpoint) is None


def test_acquire_queues_with_progress_and_is_granted_when_the_holder_parks(
        agent_starter: Any) -> None:
    agent = agent_starter()

    async def scenario() -> None:
        client = LeaseClient()
        async with kernel_lease([agent.endpoint], "k1") as (l1, k1), \
                kernel_lease([agent.endpoint], "k2") as (l2, k2):
            grant = await k1.request({"t": "acquire", "rid": 1, "resume": None})
            assert grant["t"] == "grant" and grant["agent"] == agent.endpoint
            assert grant["from"] is None and len(grant["lease"]) == 2
            again = await k1.request({"t": "acquire", "rid": 2})
            assert again["lease"] == grant["lease"]  # already held: the same lease
            await k2.send({"t": "acquire", "rid": 1})
            progress = await k2.recv()
            assert progress == {"t": "acquire_progress", "rid": 1, "state": "queued",
                                "position": 1, "agent": agent.endpoint}
            status = await k2.request({"t": "status", "rid": 2})
            assert (status["state"], status["position"]) == ("queued", 1)
            reply = await k1.request({"t": "parked", "rid": 3, "session": "s1",
                                      "agent": agent.endpoint, "bytes": 64})
            assert reply == {"t": "ok", "rid": 3}
            granted = await k2.recv()
            assert granted["t"] == "grant" and granted["rid"] == 1
            assert await holder(client, agent.endpoint) == "k2"
            state = l1.lease_state()
            assert (state["state"], state["agent"]) == ("parked", agent.endpoint)
            assert l2.lease_state()["state"] == "held"
        await client.close()

    asyncio.run(scenario())


def test_a_queued_kernel_moves_to_another_agent_that_became_free(agent_starter: Any) -> None:
    first, second = agent_starter(), agent_starter()
    pool = [first.endpoint, second.endpoint]

    async def scenario() -> None:
        client = LeaseClient()
        async with kernel_lease(pool, "k1") as (_, k1), kernel_lease(pool, "k2") as (_, k2), \
                kernel_lease(pool, "k3") as (l3, k3):
            held = {(await k.request({"t": "acquire", "rid": 1}))["agent"] for k in (k1, k2)}
            assert held == set(pool)
            await k3.send({"t": "acquire", "rid": 1})
            progress = await k3.recv()
            assert progress["state"] == "queued" and progress["position"] == 1
            queued_at = progress["agent"]
            agents = {k: (await k.request({"t": "status", "rid": 2}))["agent"] for k in (k1, k2)}
            other = next(k for k, agent in agents.items() if agent != queued_at)
            # the holder of the *other* agent parks: k3 leaves its queue and leases there
            await other.request({"t": "parked", "rid": 3, "session": None, "agent": None,
                                 "bytes": 0})
            granted = await k3.recv(timeout=30)
            assert granted["t"] == "grant" and granted["agent"] != queued_at
            assert (await client.status(queued_at))["leases"]["queue"] == []  # left the queue
            assert await holder(client, granted["agent"]) == "k3"
            assert l3.lease_state()["state"] == "held"
        await client.close()

    asyncio.run(scenario())


def test_idle_policy_asks_the_kernel_to_park_busy_keeps_it_parked_releases(
        agent_starter: Any) -> None:
    agent = agent_starter()

    async def scenario() -> None:
        client = LeaseClient()
        async with kernel_lease([agent.endpoint], idle_timeout=0.5, lease_ttl=3) as (lease, k):
            await k.request({"t": "acquire", "rid": 1})
            ask = await k.recv()
            assert (ask["t"], ask["reason"]) == ("park", "idle")
            await k.send({"t": "busy", "rid": ask["rid"]})
            ask = await k.recv()  # asked again at a later tick
            assert ask["t"] == "park"
            assert await holder(client, agent.endpoint) == "k1"
            await k.send({"t": "parked", "rid": ask["rid"], "session": None, "agent": None,
                          "bytes": 0})
            await until(lambda: is_free(client, agent.endpoint))
            await until(lambda: lease.lease_state()["state"] == "parked")
            reply = await k.request({"t": "set_idle", "rid": 2, "seconds": 120})
            assert reply["t"] == "ok" and lease.lease_state()["idle_timeout"] == 120
            assert (await k.request({"t": "set_idle", "rid": 3, "seconds": -1}))["t"] == "error"
        await client.close()

    asyncio.run(scenario())


def test_a_kernel_that_does_not_answer_park_loses_the_lease_anyway(agent_starter: Any) -> None:
    agent = agent_starter()

    async def scenario() -> None:
        client = LeaseClient()
        async with kernel_lease([agent.endpoint], idle_timeout=0.3, lease_ttl=3,
                                park_timeout=0.5) as (lease, k):
            await k.request({"t": "acquire", "rid": 1})
            assert (await k.recv())["t"] == "park"  # and no answer
            await until(lambda: lease.lease_state()["state"] == "parked")
            assert await holder(client, agent.endpoint) is None
        await client.close()

    asyncio.run(scenario())


def test_dead_agent_means_lost_and_the_next_acquire_goes_elsewhere(agent_starter: Any) -> None:
    first, second = agent_starter(), agent_starter()

    async def scenario() -> None:
        async with kernel_lease([first.endpoint, second.endpoint], idle_timeout=0,
                                lease_ttl=1.5) as (lease, k):
            grant = await k.request({"t": "acquire", "rid": 1})
            assert grant["agent"] == first.endpoint
            first.kill()
            await until(lambda: lease.lease_state()["state"] == "lost", timeout=30)
            assert first.endpoint in lease.lease_state()["message"]
            grant = await k.request({"t": "acquire", "rid": 2})
            assert grant["agent"] == second.endpoint

    asyncio.run(scenario())


def test_no_agent_answers_is_a_clear_error(agent_starter: Any) -> None:
    nowhere = f"tcp://127.0.0.1:{_closed_port()}"

    async def scenario() -> None:
        async with kernel_lease([nowhere], status_timeout=0.5, reach_timeout=2.0) as (lease, k):
            reply = await k.request({"t": "acquire", "rid": 1})
            # the keeper keeps asking a silent pool for reach_timeout, saying what it waits for
            progress = []
            while reply["t"] == "acquire_progress":
                progress.append(reply)
                reply = await k.recv()
            assert progress and progress[0]["state"] == "unreachable", progress
            assert reply["t"] == "error" and nowhere in reply["e"]["msg"]
            assert lease.lease_state()["state"] == "none"

    asyncio.run(scenario())


def test_shutdown_releases_a_queued_acquire_and_is_idempotent(agent_starter: Any) -> None:
    agent = agent_starter()

    async def scenario() -> None:
        client = LeaseClient()
        other = await client.request(agent.endpoint, "other", "s")
        async with kernel_lease([agent.endpoint]) as (lease, k):
            await k.send({"t": "acquire", "rid": 1})
            assert (await k.recv())["t"] == "acquire_progress"
            await lease.stop()
            await lease.stop()
            queue = (await client.status(agent.endpoint))["leases"]["queue"]
            assert queue == []
        await client.release(agent.endpoint, other["id"], other["token"])
        await client.close()

    asyncio.run(scenario())


# }}}

# {{{ local agents


def test_local_agents_start_once_and_stop() -> None:
    agents = LocalAgents(count=lambda: 2, extra_args=["--executor", "emulated",
                                                      "--log-level", "WARNING"])
    try:
        endpoints = agents.endpoints()
        assert len(endpoints) == 2 and agents.endpoints() == endpoints
        client = BlockingLeaseClient()
        try:
            assert all(client.status(e)["emulated"] for e in endpoints)
        finally:
            client.close()
        processes = list(agents.processes)
    finally:
        agents.stop()
        agents.stop()
    assert all(p.poll() is not None for p in processes)


def test_no_local_gpu_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match="HARP_AGENTS=tcp://host:port"):
        LocalAgents(count=lambda: 0).endpoints()


# }}}

# {{{ ElasticGPUProvisioner with real kernels

jupyter_client = pytest.importorskip("jupyter_client")
from jupyter_client.manager import AsyncKernelManager  # noqa: E402

from provisioner.elastic import ElasticGPUProvisioner, live_provisioners  # noqa: E402


@pytest.fixture
def elastic_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JUPYTER_PATH", str(REPO / "share" / "jupyter"))
    monkeypatch.setenv("PYTHONPATH", str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("HARP_IDLE_TIMEOUT", "600")
    for name in ("HARP_AGENT", "HARP_TOKEN", "HARP_LEASE_TTL", "HARP_ACQUIRE_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)


class Kernel:
    def __init__(self, manager: AsyncKernelManager) -> None:
        self.manager = manager
        self.client = manager.client()

    async def run(self, code: str) -> tuple[str, str, str]:
        """(stdout, error name, error value) of a cell."""
        out, error = [], ["", ""]

        def hook(msg: dict[str, Any]) -> None:
            if msg["msg_type"] == "stream":
                out.append(msg["content"]["text"])
            elif msg["msg_type"] == "error":
                error[:] = [msg["content"]["ename"], msg["content"]["evalue"]]

        await self.client.execute_interactive(code, timeout=60, output_hook=hook)
        return "".join(out), error[0], error[1]

    async def ok(self, code: str) -> str:
        out, ename, evalue = await self.run(code)
        assert not ename, f"{ename}: {evalue}\n{out}"
        return out

    @property
    def provisioner(self) -> ElasticGPUProvisioner:
        provisioner = self.manager.provisioner
        assert isinstance(provisioner, ElasticGPUProvisioner)
        return provisioner


@asynccontextmanager
async def elastic_kernel() -> AsyncIterator[Kernel]:
    manager = AsyncKernelManager(kernel_name="elastic-gpu")
    await manager.start_kernel()
    kernel = Kernel(manager)
    kernel.client.start_channels()
    try:
        await kernel.client.wait_for_ready(timeout=60)
        yield kernel
    finally:
        kernel.client.stop_channels()
        if await manager.is_alive():
            await manager.shutdown_kernel(now=True)
        await manager.cleanup_resources()


GPU_CELL = ("import numpy as np, pycuda.autoinit, pycuda.gpuarray as ga\n"
            "a = ga.to_gpu(np.arange(8.0)); print(a.get().sum())")


@contextmanager
def status_client() -> Iterator[BlockingLeaseClient]:
    client = BlockingLeaseClient()
    try:
        yield client
    finally:
        client.close()


def test_kernel_environment_and_interpreter(elastic_env: None, emulated_agent: Any,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HARP_AGENTS", emulated_agent.endpoint)
    monkeypatch.setenv("HARP_TOKEN", "")  # no token: none is passed

    async def scenario() -> None:
        async with elastic_kernel() as kernel:
            out = await kernel.ok(
                "import os, sys\nprint(sys.executable)\n"
                "for k in ('HARP_SHIM', 'HARP_KERNEL_ID', 'HARP_AGENTS', 'HARP_CONTROL'):\n"
                "    print(os.environ.get(k))\n"
                "print(bool(os.environ.get('HARP_CONTROL_KEY')))")
            lines = out.split()
            assert lines[0] == sys.executable
            assert lines[1:4] == ["1", kernel.manager.kernel_id, emulated_agent.endpoint]
            assert lines[4].startswith("tcp://127.0.0.1:") and lines[5] == "True"
            assert live_provisioners()[kernel.manager.kernel_id] is kernel.provisioner
            assert kernel.provisioner.lease_state()["state"] == "none"
        assert kernel.manager.kernel_id not in live_provisioners()

    asyncio.run(scenario())


def test_restart_drops_the_old_kernels_lease_and_state_and_cleanup_twice(
        elastic_env: None, emulated_agent: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HARP_AGENTS", emulated_agent.endpoint)

    async def scenario() -> None:
        with status_client() as client:
            def leases() -> dict[str, Any]:
                return client.status(emulated_agent.endpoint)["leases"]

            async with elastic_kernel() as kernel:
                kernel_id = kernel.manager.kernel_id
                assert (await kernel.ok(GPU_CELL)).split() == ["28.0"]
                await kernel.ok("%harp release")
                assert [p["kernel_id"] for p in leases()["parked"]] == [kernel_id]
                await kernel.ok(GPU_CELL)
                assert leases()["holder"]["kernel_id"] == kernel_id
                provisioner = kernel.provisioner
                await kernel.manager.restart_kernel(now=True)
                assert kernel.provisioner is provisioner  # the same instance serves restarts
                assert leases()["holder"] is None and leases()["parked"] == []
                await kernel.client.wait_for_ready(timeout=60)
                _, ename, _ = await kernel.run("print(a)")
                assert ename == "NameError"  # a new process: nothing of the old one
                assert (await kernel.ok(GPU_CELL)).split() == ["28.0"]
                assert leases()["holder"]["kernel_id"] == kernel_id
                await kernel.manager.shutdown_kernel(now=True)
                assert leases()["holder"] is None and leases()["parked"] == []
                await provisioner.cleanup()  # once more: nothing happens
                await provisioner.cleanup(restart=True)

    asyncio.run(scenario())


def test_killed_kernel_while_queued_leaves_the_queue(
        elastic_env: None, agent_starter: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # reclaim off: the idle holder must stay the holder, or the queue would empty by a grant
    emulated_agent = agent_starter("--reclaim-after", "1000000")
    monkeypatch.setenv("HARP_AGENTS", emulated_agent.endpoint)

    async def scenario() -> None:
        with status_client() as client:
            other = client.request(emulated_agent.endpoint, "someone-else", "s")
            async with elastic_kernel() as kernel:
                cell = asyncio.ensure_future(kernel.run(GPU_CELL))
                await until(lambda: client.status(emulated_agent.endpoint)["leases"]["queue"])
                assert kernel.provisioner.lease_state()["state"] == "queued"
                process = kernel.provisioner.process
                assert process is not None
                os.kill(process.pid, signal.SIGKILL)
                await until(lambda: not client.status(emulated_agent.endpoint)["leases"]["queue"])
                cell.cancel()
            client.release(emulated_agent.endpoint, other["id"], other["token"])

    asyncio.run(scenario())


def test_provisioner_info_round_trip_hands_the_lease_to_a_new_owner(
        elastic_env: None, emulated_agent: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A server hands a running kernel and its lease over (get_provisioner_info, then
    load_provisioner_info in a new provisioner): the kernel keeps its GPU and its control
    socket, and the new owner renews, answers the kernel and releases when it dies."""
    monkeypatch.setenv("HARP_AGENTS", emulated_agent.endpoint)
    monkeypatch.setenv("HARP_LEASE_TTL", "3")  # a lease nobody renews would expire quickly

    async def scenario() -> None:
        with status_client() as client:
            async with elastic_kernel() as kernel:
                kernel_id = kernel.manager.kernel_id
                await kernel.ok(GPU_CELL)
                info = await kernel.provisioner.get_provisioner_info()
                harp = info["harp"]
                assert harp["lease"]["agent"] == emulated_agent.endpoint
                assert harp["kernel_secret"] and harp["control_key"] and harp["control_port"]
                await kernel.provisioner.detach()

                new = ElasticGPUProvisioner(kernel_id=kernel_id,
                                            kernel_spec=kernel.manager.kernel_spec, parent=None)
                await new.load_provisioner_info(info)
                assert live_provisioners()[kernel_id] is new
                await asyncio.sleep(4)  # longer than the ttl: only the new owner renews now
                holder = client.status(emulated_agent.endpoint)["leases"]["holder"]
                assert holder is not None and holder["lease_id"] == harp["lease"]["lease_id"]
                out = await kernel.ok("print((a + 1).get().sum())\n"
                                      "s = %harp status\nprint(s['state'], s['message'])")
                assert out.split()[:2] == ["36.0", "held"]
                assert "previous server" in out
                new_info = await new.get_provisioner_info()
                assert new_info["harp"]["lease"]["lease_id"] == harp["lease"]["lease_id"]

                os.kill(info["pid"], signal.SIGKILL)
                await until(lambda: client.status(
                    emulated_agent.endpoint)["leases"]["holder"] is None)
                await until(lambda: new.lease_state()["state"] == "none")
                await new.cleanup()

    asyncio.run(scenario())


def test_auto_agents_without_a_gpu_is_a_clear_error_at_the_first_gpu_call(
        elastic_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    from provisioner.local_agents import count_gpus

    if count_gpus() > 0:
        pytest.skip("this machine has a GPU: agents=auto would start real agents")
    monkeypatch.setenv("HARP_AGENTS", "auto")

    async def scenario() -> None:
        async with elastic_kernel() as kernel:
            _, ename, evalue = await kernel.run(GPU_CELL)
            assert ename == "GPUUnavailableError" and "no local GPU" in evalue
            assert "HARP_AGENTS=tcp://host:port" in evalue

    asyncio.run(scenario())


# }}}


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
