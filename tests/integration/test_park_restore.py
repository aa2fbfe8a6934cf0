"""Park and restore through the shim, against real emulated agent processes.

The process under test is one kernel holding its lease directly (no provisioner). Other kernels
are real lease clients. What must hold: parked arrays come back equal, at the same addresses (an
int pointer keeps pointing at the data), on the same or on another agent; dropped parked state is
a clear error, never wrong data.
"""

from __future__ import annotations

import time
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from harp_jupyter import shim
from harp_jupyter.shim.session import get_session, reset_session
from provisioner.lease_client import BlockingLeaseClient

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def two_agents(agent_starter: Any, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, Any]:
    first, second = agent_starter(), agent_starter()
    monkeypatch.setenv("HARP_AGENTS", f"{first.endpoint},{second.endpoint}")
    return first, second


def parked_on(client: BlockingLeaseClient, endpoint: str) -> list[dict[str, Any]]:
    return client.status(endpoint)["leases"]["parked"]


def test_release_parks_and_the_next_call_restores_at_the_same_addresses(
        emulated_agent: Any, monkeypatch: pytest.MonkeyPatch,
        lease_client: BlockingLeaseClient) -> None:
    monkeypatch.setenv("HARP_AGENTS", emulated_agent.endpoint)
    with pycuda_modules() as (cuda, gpuarray):
        host = np.arange(300_000, dtype=np.float32)
        a = gpuarray.to_gpu(host)
        raw = cuda.mem_alloc(4096)
        cuda.memcpy_htod(raw, np.arange(1024, dtype=np.int32))
        pointer = int(a.gpudata)
        session = get_session()
        info = session.release()
        assert info["bytes"] >= host.nbytes
        status = lease_client.status(emulated_agent.endpoint)["leases"]
        assert status["holder"] is None  # the GPU is free for others
        assert [p["bytes"] for p in status["parked"]] == [info["bytes"]]

        assert np.array_equal(a.get(), host)  # the next GPU call leases again and restores
        assert int(a.gpudata) == pointer and session.restores == 1
        back = np.empty(300_000, np.float32)
        cuda.memcpy_dtoh(back, pointer)  # the int the user kept still points at the data
        assert np.array_equal(back, host)
        assert np.array_equal(cuda.from_device(int(raw), (1024,), np.int32), np.arange(1024))
        assert parked_on(lease_client, emulated_agent.endpoint) == []


def test_restore_moves_to_the_other_agent_when_the_first_is_busy(
        two_agents: tuple[Any, Any], lease_client: BlockingLeaseClient) -> None:
    first, second = two_agents
    with pycuda_modules() as (_cuda, gpuarray):
        host = np.linspace(0, 1, 100_000)
        a = gpuarray.to_gpu(host)
        b = a * 2
        pointer = int(b.gpudata)
        session = get_session()
        assert session.endpoint == first.endpoint  # both free: configuration order
        session.release()
        other = lease_client.request(first.endpoint, "other-kernel", "other-secret")
        assert other["state"] == "held"  # another kernel now holds the first GPU

        assert np.array_equal((a + b).get(), host * 3)
        assert session.endpoint == second.endpoint
        assert int(b.gpudata) == pointer
        assert parked_on(lease_client, first.endpoint) == []  # moved, not copied
        lease_client.release(first.endpoint, other["id"], other["token"])


def test_parked_state_dropped_after_its_ttl_is_a_clear_error(
        agent_starter: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    agent = agent_starter("--park-ttl", "0.3")
    monkeypatch.setenv("HARP_AGENTS", agent.endpoint)
    with pycuda_modules() as (cuda, gpuarray):
        a = gpuarray.to_gpu(np.ones(1000))
        get_session().release()
        time.sleep(1.0)
        with pytest.raises(cuda.GPULostError, match="your parked GPU state is gone"):
            a.get()
        assert np.array_equal(gpuarray.to_gpu(np.arange(5)).get(), np.arange(5))  # afresh


def test_a_kernel_asks_the_agent_to_keep_its_parked_state_for_less(
        agent_starter: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    agent = agent_starter()  # the agent keeps parked state for its default hour
    monkeypatch.setenv("HARP_AGENTS", agent.endpoint)
    monkeypatch.setenv("HARP_PARK_TTL", "0.3")
    with pycuda_modules() as (cuda, gpuarray):
        a = gpuarray.to_gpu(np.ones(1000))
        get_session().release()
        time.sleep(1.0)
        with pytest.raises(cuda.GPULostError, match="its kernel asked the agent to keep it"):
            a.get()


def test_device_queries_without_a_provisioner_do_not_lease(
        emulated_agent: Any, monkeypatch: pytest.MonkeyPatch,
        lease_client: BlockingLeaseClient) -> None:
    monkeypatch.setenv("HARP_AGENTS", emulated_agent.endpoint)
    other = lease_client.request(emulated_agent.endpoint, "another-kernel", "s")
    assert other["state"] == "held"
    with pycuda_modules() as (cuda, _):
        assert "emulated" in cuda.Device(0).name()  # answered though the GPU is held
        assert cuda.Device(0).compute_capability() == (0, 0)
        assert not get_session().connected
        assert lease_client.status(emulated_agent.endpoint)["leases"]["queue"] == []
    lease_client.release(emulated_agent.endpoint, other["id"], other["token"])


def test_parked_state_spills_to_disk_past_the_memory_cap(
        agent_starter: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Any,
        lease_client: BlockingLeaseClient) -> None:
    agent = agent_starter("--park-memory", "2MiB", "--park-dir", str(tmp_path))
    monkeypatch.setenv("HARP_AGENTS", agent.endpoint)
    with pycuda_modules() as (_cuda, gpuarray):
        host = np.random.default_rng(0).random(1_000_000)  # 8 MB: four 2 MiB chunks
        a = gpuarray.to_gpu(host)
        get_session().release()
        [parked] = parked_on(lease_client, agent.endpoint)
        assert parked["spilled_bytes"] >= host.nbytes - (2 << 20)
        assert any(tmp_path.rglob("*.bin"))
        assert np.array_equal(a.get(), host)
        assert not any(tmp_path.rglob("*.bin"))  # restored files are removed


def test_a_second_kernel_waits_in_the_queue_and_gets_the_gpu_on_release(
        emulated_agent: Any, monkeypatch: pytest.MonkeyPatch,
        lease_client: BlockingLeaseClient, capfd: pytest.CaptureFixture[str]) -> None:
    import threading

    monkeypatch.setenv("HARP_AGENTS", emulated_agent.endpoint)
    holder = lease_client.request(emulated_agent.endpoint, "first-kernel", "s")
    assert holder["state"] == "held"
    with pycuda_modules() as (_cuda, gpuarray):
        threading.Timer(1.0, lease_client.release,
                        (emulated_agent.endpoint, holder["id"], holder["token"])).start()
        assert np.array_equal(gpuarray.to_gpu(np.arange(3)).get(), np.arange(3))
    err = capfd.readouterr().err
    assert "position 1 in the queue" in err and "Got a GPU" in err


class pycuda_modules:
    """``with pycuda_modules() as (cuda, gpuarray)``: the shim's pycuda on the configured
    agents, on a fresh session, deactivated afterwards."""

    def __enter__(self) -> tuple[ModuleType, ModuleType]:
        import importlib

        reset_session()
        shim.activate()
        importlib.import_module("pycuda.autoinit")
        return importlib.import_module("pycuda.driver"), importlib.import_module("pycuda.gpuarray")

    def __exit__(self, *exc: object) -> None:
        reset_session()
        shim.deactivate()
