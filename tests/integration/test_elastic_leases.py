"""Elastic GPU kernels sharing emulated agents: real jupyter_client AsyncKernelManagers on the
``elastic-gpu`` kernelspec (ElasticGPUProvisioner), real ipykernel processes, real agents.

Scenarios of issue 3: contention with queue positions, idle release parks and a later cell finds
its arrays, restore on the other agent, a killed kernel, a killed server, a killed agent, a wrong
token, and a randomized contention run.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

jupyter_client = pytest.importorskip("jupyter_client")
from jupyter_client.manager import AsyncKernelManager  # noqa: E402

from provisioner.lease_client import BlockingLeaseClient  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(240)


@pytest.fixture(autouse=True)
def elastic_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The repository's kernelspec, and the provisioner's settings from the environment."""
    monkeypatch.setenv("JUPYTER_PATH", str(REPO / "share" / "jupyter"))
    monkeypatch.setenv("PYTHONPATH", str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("HARP_IDLE_TIMEOUT", "600")
    monkeypatch.setenv("HARP_LEASE_TTL", "30")
    monkeypatch.delenv("HARP_AGENT", raising=False)
    monkeypatch.delenv("HARP_TOKEN", raising=False)


@dataclass
class Cell:
    out: str = ""
    error: str = ""
    evalue: str = ""
    displays: list[str] = field(default_factory=list)
    result: str = ""


@dataclass
class Kernel:
    manager: AsyncKernelManager
    client: Any

    async def run(self, code: str, timeout: float = 60) -> Cell:
        cell = Cell()
        displays: dict[str, int] = {}

        def hook(msg: dict[str, Any]) -> None:
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream":
                cell.out += content["text"]
            elif kind == "error":
                cell.error, cell.evalue = content["ename"], content["evalue"]
            elif kind == "execute_result":
                cell.result = content["data"].get("text/plain", "")
            elif kind in ("display_data", "update_display_data"):
                text = content["data"].get("text/plain", "")
                display_id = content.get("transient", {}).get("display_id")
                if kind == "update_display_data" and display_id in displays:
                    cell.displays.append(text)
                else:
                    displays[display_id] = len(cell.displays)
                    cell.displays.append(text)

        await self.client.execute_interactive(code, timeout=timeout, output_hook=hook)
        return cell

    async def ok(self, code: str, timeout: float = 60) -> Cell:
        cell = await self.run(code, timeout)
        assert not cell.error, f"{cell.error}: {cell.evalue}\n{cell.out}"
        return cell

    async def lease_state(self) -> dict[str, Any]:
        cell = await self.ok("_s = %harp status\nprint(repr(dict(_s)))")
        return eval(cell.out.strip().splitlines()[-1])  # a dict literal we printed ourselves

    @property
    def pid(self) -> int:
        return self.manager.provisioner.process.pid  # type: ignore[union-attr]


@asynccontextmanager
async def elastic_kernels(count: int) -> AsyncIterator[list[Kernel]]:
    kernels: list[Kernel] = []
    try:
        for _ in range(count):
            manager = AsyncKernelManager(kernel_name="elastic-gpu")
            await manager.start_kernel()
            client = manager.client()
            client.start_channels()
            await client.wait_for_ready(timeout=60)
            kernels.append(Kernel(manager, client))
            await kernels[-1].ok("import numpy as np\nimport pycuda.autoinit\n"
                                 "import pycuda.gpuarray as ga\nimport pycuda.driver as cuda")
        yield kernels
    finally:
        for kernel in kernels:
            kernel.client.stop_channels()
            if await kernel.manager.is_alive():
                await kernel.manager.shutdown_kernel(now=True)
            await kernel.manager.cleanup_resources()


def holders(client: BlockingLeaseClient, *agents: Any) -> list[str | None]:
    return [(client.status(a.endpoint)["leases"]["holder"] or {}).get("kernel_id")
            for a in agents]


async def eventually(check: Any, timeout: float = 20, every: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {timeout} s: {check}")
        await asyncio.sleep(every)


def test_three_kernels_contend_for_two_agents(agent_starter: Any,
                                             monkeypatch: pytest.MonkeyPatch,
                                             lease_client: BlockingLeaseClient) -> None:
    first, second = agent_starter(), agent_starter()
    monkeypatch.setenv("HARP_AGENTS", f"{first.endpoint},{second.endpoint}")

    async def scenario() -> None:
        async with elastic_kernels(3) as (k1, k2, k3):
            await k1.ok("a = ga.to_gpu(np.arange(1000.0))")
            await k2.ok("b = ga.to_gpu(np.arange(10.0))")
            assert sorted(holders(lease_client, first, second)) == sorted(
                [k1.manager.kernel_id, k2.manager.kernel_id])
            waiting = asyncio.ensure_future(k3.ok("c = ga.to_gpu(np.ones(5)); print(c.get())"))
            await eventually(lambda: any(
                lease_client.status(x.endpoint)["leases"]["queue"] for x in (first, second)))
            await k1.ok("%harp release")
            cell = await waiting
            assert cell.displays[0].startswith("Waiting for a GPU: position 1 in the queue")
            assert cell.displays[-1].startswith("Got a GPU on")
            assert "[1. 1. 1. 1. 1.]" in cell.out
            assert (await k1.lease_state())["state"] == "parked"
            assert (await k3.lease_state())["state"] == "held"

    asyncio.run(scenario())


def test_device_queries_do_not_lease_nor_wait_in_the_queue(
        emulated_agent: Any, monkeypatch: pytest.MonkeyPatch,
        lease_client: BlockingLeaseClient) -> None:
    monkeypatch.setenv("HARP_AGENTS", emulated_agent.endpoint)

    async def scenario() -> None:
        async with elastic_kernels(2) as (holder, asker):
            await holder.ok("a = ga.to_gpu(np.arange(10.0))")
            # the only GPU is held: a device query is answered from the agent's status at once
            cell = await asker.ok("d = cuda.Device(0)\n"
                                  "print(d.name(), d.compute_capability(), cuda.Device.count())")
            assert "emulated" in cell.out and "(0, 0) 1" in cell.out
            assert not cell.displays  # no "Waiting for a GPU"
            assert (await asker.lease_state())["state"] == "none"
            assert holders(lease_client, emulated_agent) == [holder.manager.kernel_id]
            assert lease_client.status(emulated_agent.endpoint)["leases"]["queue"] == []

    asyncio.run(scenario())


def test_idle_release_parks_and_a_later_cell_finds_its_arrays(
        emulated_agent: Any, monkeypatch: pytest.MonkeyPatch,
        lease_client: BlockingLeaseClient) -> None:
    monkeypatch.setenv("HARP_AGENTS", emulated_agent.endpoint)
    monkeypatch.setenv("HARP_IDLE_TIMEOUT", "1")
    monkeypatch.setenv("HARP_LEASE_TTL", "3")

    async def scenario() -> None:
        async with elastic_kernels(1) as (kernel,):
            await kernel.ok("host = np.random.default_rng(1).random(50_000)\n"
                            "a = ga.to_gpu(host); p = int(a.gpudata)")
            state = await kernel.lease_state()
            assert state["state"] == "held" and state["idle_timeout"] == 1
            await eventually(lambda: lease_client.status(
                emulated_agent.endpoint)["leases"]["holder"] is None)
            assert (await kernel.lease_state())["state"] == "parked"
            cell = await kernel.ok("print(bool((a.get() == host).all()), int(a.gpudata) == p)")
            assert cell.out.split() == ["True", "True"]

    asyncio.run(scenario())


def test_restore_lands_on_the_other_agent_when_the_first_is_busy(
        agent_starter: Any, monkeypatch: pytest.MonkeyPatch,
        lease_client: BlockingLeaseClient) -> None:
    first, second = agent_starter(), agent_starter()
    monkeypatch.setenv("HARP_AGENTS", f"{first.endpoint},{second.endpoint}")

    async def scenario() -> None:
        async with elastic_kernels(3) as (k1, k2, k3):
            await k1.ok("a = ga.to_gpu(np.arange(100_000.0)); p = int(a.gpudata)\n%harp release")
            await k2.ok("%harp lease")  # the free agent with nothing parked
            await k3.ok("%harp lease")  # the other one: where k1's state is parked
            assert holders(lease_client, first, second) == [k3.manager.kernel_id,
                                                             k2.manager.kernel_id]
            await k2.ok("%harp release")
            cell = await k1.ok("print((a.get() == np.arange(100_000.0)).all(), "
                               "int(a.gpudata) == p)")
            assert cell.out.split() == ["True", "True"]
            assert (await k1.lease_state())["agent"] == second.endpoint
            assert lease_client.status(first.endpoint)["leases"]["parked"] == []

    asyncio.run(scenario())


def test_killed_kernel_frees_its_lease(emulated_agent: Any, monkeypatch: pytest.MonkeyPatch,
                                       lease_client: BlockingLeaseClient) -> None:
    monkeypatch.setenv("HARP_AGENTS", emulated_agent.endpoint)
    monkeypatch.setenv("HARP_LEASE_TTL", "600")  # so only the provisioner can free it

    async def scenario() -> None:
        async with elastic_kernels(1) as (kernel,):
            await kernel.ok("a = ga.to_gpu(np.ones(10))")
            assert holders(lease_client, emulated_agent) == [kernel.manager.kernel_id]
            os.kill(kernel.pid, signal.SIGKILL)
            await eventually(lambda: holders(lease_client, emulated_agent) == [None])
            status = lease_client.status(emulated_agent.endpoint)["leases"]
            assert status["parked"] == []  # its parked state is dropped with it

    asyncio.run(scenario())


def test_agent_killed_mid_cell_the_kernel_lives_and_leases_again(
        agent_starter: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    first, second = agent_starter(), agent_starter()
    monkeypatch.setenv("HARP_AGENTS", f"{first.endpoint},{second.endpoint}")

    async def scenario() -> None:
        async with elastic_kernels(1) as (kernel,):
            await kernel.ok("cpu_state = 1234\na = ga.to_gpu(np.ones(1000))")
            assert (await kernel.lease_state())["agent"] == first.endpoint
            cell_task = asyncio.ensure_future(kernel.run(
                "import time\nfor i in range(100000):\n    (a + 1).get()\n    time.sleep(0.001)"))
            await asyncio.sleep(1.5)
            first.kill()
            cell = await cell_task
            assert cell.error == "GPULostError" and first.endpoint in cell.evalue
            cell = await kernel.ok("print(cpu_state)\nb = ga.to_gpu(np.arange(4.0))\n"
                                   "print(b.get().sum())")
            assert cell.out.split() == ["1234", "6.0"]
            assert (await kernel.lease_state())["agent"] == second.endpoint

    asyncio.run(scenario())


def test_wrong_token_is_refused_and_touches_nobody_else(
        agent_starter: Any, monkeypatch: pytest.MonkeyPatch,
        lease_client: BlockingLeaseClient) -> None:
    agent = agent_starter("--token", "right")
    monkeypatch.setenv("HARP_AGENTS", agent.endpoint)

    async def scenario() -> None:
        monkeypatch.setenv("HARP_TOKEN", "right")
        async with elastic_kernels(1) as (good,):
            await good.ok("a = ga.to_gpu(np.arange(5.0))")
            monkeypatch.setenv("HARP_TOKEN", "wrong")
            async with elastic_kernels(1) as (bad,):
                cell = await bad.run("ga.to_gpu(np.ones(3))")
                assert cell.error == "GPUUnavailableError" and "token" in cell.evalue
            cell = await good.ok("print(a.get().sum())")
            assert cell.out.split() == ["10.0"]

    asyncio.run(scenario())


def test_server_killed_lease_expires_after_its_ttl(emulated_agent: Any, tmp_path: Path,
                                                   lease_client: BlockingLeaseClient) -> None:
    """jupyter_server's process (here: a script holding the kernel manager) is SIGKILLed: nobody
    renews the lease, the agent expires it after its TTL and grants the GPU to the next."""
    script = tmp_path / "server.py"
    script.write_text(textwrap.dedent("""
        import asyncio, sys
        from jupyter_client.manager import AsyncKernelManager

        async def main():
            km = AsyncKernelManager(kernel_name="elastic-gpu")
            await km.start_kernel()
            kc = km.client(); kc.start_channels(); await kc.wait_for_ready(timeout=60)
            reply = await kc.execute_interactive(
                "import numpy as np, pycuda.autoinit, pycuda.gpuarray as ga\\n"
                "a = ga.to_gpu(np.ones(4)); a.get();", timeout=60)
            print("ready", km.provisioner.process.pid, reply["content"]["status"], flush=True)
            await asyncio.sleep(3600)

        asyncio.run(main())
    """))
    env = dict(os.environ, HARP_AGENTS=emulated_agent.endpoint, HARP_LEASE_TTL="2")
    server = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE,
                              text=True)
    kernel_pid = None
    try:
        assert server.stdout is not None
        words = server.stdout.readline().split()
        assert words[0] == "ready" and words[2] == "ok", words
        kernel_pid = int(words[1])
        assert holders(lease_client, emulated_agent) != [None]
        server.kill()
        server.wait(10)
        deadline = time.monotonic() + 20
        while holders(lease_client, emulated_agent) != [None]:
            assert time.monotonic() < deadline, "the lease did not expire"
            time.sleep(0.2)
        lease = lease_client.request(emulated_agent.endpoint, "next-kernel", "s")
        assert lease["state"] == "held"
        lease_client.release(emulated_agent.endpoint, lease["id"], lease["token"])
    finally:
        server.kill()
        if kernel_pid is not None:
            try:
                os.kill(kernel_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_randomized_contention_never_two_holders_and_nobody_starves(
        agent_starter: Any, monkeypatch: pytest.MonkeyPatch,
        lease_client: BlockingLeaseClient) -> None:
    agents = [agent_starter(), agent_starter()]
    monkeypatch.setenv("HARP_AGENTS", ",".join(a.endpoint for a in agents))
    rng = random.Random(int(os.environ.get("HARP_TEST_SEED", "3")))
    kernels_n, cycles = 4, 4

    async def worker(kernel: Kernel, index: int, done: list[int]) -> None:
        await kernel.ok(f"mine = ga.to_gpu(np.full(1000, {index}.0))")
        for cycle in range(cycles):
            cell = await kernel.ok("mine += 1; print(mine.get()[0])", timeout=120)
            assert float(cell.out.split()[-1]) == index + cycle + 1  # its own data, intact
            if rng.random() < 0.7:
                await kernel.ok("%harp release")
            await asyncio.sleep(rng.random() * 0.3)
        await kernel.ok("%harp release")
        done.append(index)

    async def scenario() -> None:
        async with elastic_kernels(kernels_n) as kernels:
            done: list[int] = []
            seen_holders: list[list[str | None]] = []
            workers = asyncio.gather(*(worker(k, i, done) for i, k in enumerate(kernels)))
            while not workers.done():
                # one holder field per agent; also no kernel may hold two GPUs at once
                current = holders(lease_client, *agents)
                held = [h for h in current if h is not None]
                assert len(held) == len(set(held)), current
                seen_holders.append(current)
                await asyncio.sleep(0.05)
            await workers
            assert sorted(done) == list(range(kernels_n))  # nobody starved
            assert len({h for hs in seen_holders for h in hs if h}) >= 2

    asyncio.run(scenario())


def test_an_idle_notebook_is_reclaimed_for_a_waiting_one_and_its_next_cell_says_why(
        agent_starter: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    agent = agent_starter("--reclaim-after", "1")
    monkeypatch.setenv("HARP_AGENTS", agent.endpoint)
    monkeypatch.setenv("HARP_RECLAIM_AFTER", "1")

    async def scenario() -> None:
        async with elastic_kernels(2) as (a, b):
            await a.ok("x = ga.to_gpu(np.arange(1000.0)); p = int(x.gpudata)")
            asked = time.monotonic()
            cell = await b.ok("y = ga.to_gpu(np.ones(10)); print(y.get().sum())")
            assert cell.out.split() == ["10.0"]
            assert time.monotonic() - asked < 1 + 10  # (a bound against a hang)
            state = await eventually(lambda: a.manager.provisioner.lease_state()["state"]
                                     == "parked" and a.manager.provisioner.lease_state())
            assert state["parked_reason"] == "reclaim" and state["reclaim_after"] == 1
            assert state["message"].startswith("Released for a kernel waiting in the queue")
            cell = await a.ok("print(bool((x.get() == np.arange(1000.0)).all()), "
                              "int(x.gpudata) == p)")
            assert cell.out.split() == ["True", "True"]
            assert sum("parked while idle because another notebook was waiting" in d
                       for d in cell.displays) == 1
            cell = await a.ok("print(1)")  # told once
            assert not any("parked while idle" in d for d in cell.displays)
            status = await a.lease_state()
            assert status["state"] == "held" and status["memory_allocated"] == 8000

    asyncio.run(scenario())
