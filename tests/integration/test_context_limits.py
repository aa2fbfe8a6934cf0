"""``Context.get_limit``/``set_limit`` through the shim, against real emulated agents (the
emulated executor remembers the values from CUDA's defaults and counts what they would reserve
as a GPU agent does): per-session values, the slot's memory bound, refusals, park and restore.
tests/gpu/test_pycuda_tail_gpu.py compares the same calls with local pycuda on a GPU."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from gpu_agent.context_limits import LIMITS
from harp_jupyter.shim.session import get_session
from tests.conftest import shim_driver
from tests.integration.test_torch_slots import session_bytes
from tests.shim_sessions import eventually, script_session

pytestmark = pytest.mark.timeout(120)

MiB = 1 << 20
#: the emulated device: one multiprocessor of 2048 threads, each with its own stack
THREADS = 2048


@pytest.fixture
def slotted(agent_starter: Any) -> Iterator[tuple[Any, Any]]:
    """(agent with two 64 MiB slots, pycuda.driver through the shim on one of them)"""
    agent = agent_starter("--slots", "2", "--slot-memory", "64MiB")
    with shim_driver(agent.endpoint) as cuda:
        yield agent, cuda


def test_limits_start_at_cudas_defaults(module_emulated_agent: Any) -> None:
    with shim_driver(module_emulated_agent.endpoint) as cuda:
        got = {str(which): cuda.Context.get_limit(which) for which in cuda.limit}
    assert got == {name: limit.default for name, limit in LIMITS.items()}
    assert got["STACK_SIZE"] == 1024 and got["MALLOC_HEAP_SIZE"] == 8 * MiB


def test_set_limit_is_read_back_and_not_a_member_is_the_users_error(
        module_emulated_agent: Any) -> None:
    with shim_driver(module_emulated_agent.endpoint) as cuda:
        cuda.Context.set_limit(cuda.limit.PRINTF_FIFO_SIZE, 4 * MiB)
        cuda.Context.set_limit(cuda.limit.DEV_RUNTIME_PENDING_LAUNCH_COUNT, 4096)
        assert cuda.Context.get_limit(cuda.limit.PRINTF_FIFO_SIZE) == 4 * MiB
        assert cuda.Context.get_limit(cuda.limit.DEV_RUNTIME_PENDING_LAUNCH_COUNT) == 4096
        with pytest.raises(cuda.LogicError, match=r"not a member of pycuda\.driver\.limit"):
            cuda.Context.get_limit(99)


def test_a_limit_the_agent_cannot_count_is_refused_with_the_reason(
        module_emulated_agent: Any) -> None:
    with shim_driver(module_emulated_agent.endpoint) as cuda:
        cuda.Context.set_limit(cuda.limit.DEV_RUNTIME_SYNC_DEPTH, 1)  # less is fine
        with pytest.raises(cuda.LogicError, match=r"refused by this GPU agent: each level past"
                                                  r" 2 .* \(values up to 2 are accepted\)"):
            cuda.Context.set_limit(cuda.limit.DEV_RUNTIME_SYNC_DEPTH, 24)
        assert cuda.Context.get_limit(cuda.limit.DEV_RUNTIME_SYNC_DEPTH) == 1
        a = cuda.mem_alloc(4096)  # the session goes on
        cuda.memcpy_htod(a, np.arange(1024, dtype=np.int32))
        assert np.array_equal(cuda.from_device(a, (1024,), np.int32), np.arange(1024))


def test_memory_a_limit_reserves_counts_against_the_slot(slotted: tuple[Any, Any]) -> None:
    agent, cuda = slotted
    cuda.Context.set_limit(cuda.limit.MALLOC_HEAP_SIZE, 40 * MiB)  # 32 MiB past the default
    cuda.Context.set_limit(cuda.limit.STACK_SIZE, 2048)  # 1 KiB more for each of 2048 threads
    eventually(lambda: session_bytes(agent, "object_bytes") == 34 * MiB)
    with pytest.raises(cuda.MemoryError, match=r"GPU slot's 64\.0 MiB"):
        cuda.mem_alloc(32 * MiB)  # 34 + 32 > 64
        cuda.Context.synchronize()
    kept = cuda.mem_alloc(30 * MiB)
    cuda.Context.synchronize()
    with pytest.raises(cuda.MemoryError, match=r"Context.set_limit\(MALLOC_HEAP_SIZE, 1073741824"
                                               r"\) \(memory the driver reserves\) needs"):
        cuda.Context.set_limit(cuda.limit.MALLOC_HEAP_SIZE, 1 << 30)
    with pytest.raises(cuda.MemoryError, match=r"set_limit\(STACK_SIZE"):
        cuda.Context.set_limit(cuda.limit.STACK_SIZE, 1 << 40)
    assert cuda.Context.get_limit(cuda.limit.MALLOC_HEAP_SIZE) == 40 * MiB  # unchanged
    kept.free()
    cuda.Context.set_limit(cuda.limit.MALLOC_HEAP_SIZE, 8 * MiB)  # back to the default: free
    cuda.Context.set_limit(cuda.limit.STACK_SIZE, 1024)
    eventually(lambda: session_bytes(agent, "object_bytes") == 0)
    cuda.mem_alloc(62 * MiB).free()
    cuda.Context.synchronize()


def test_one_tenants_limits_and_refusals_leave_the_other_slot_alone(
        slotted: tuple[Any, Any]) -> None:
    agent, cuda = slotted
    with script_session([agent.endpoint]) as (other, _source):
        other.call_sync("limit_set", "MALLOC_HEAP_SIZE", 50 * MiB)
        with pytest.raises(cuda.MemoryError):
            cuda.Context.set_limit(cuda.limit.MALLOC_HEAP_SIZE, 80 * MiB)
        cuda.Context.set_limit(cuda.limit.MALLOC_HEAP_SIZE, 60 * MiB)  # its own slot's room
        assert other.call_sync("limit_get", "MALLOC_HEAP_SIZE") == 50 * MiB
        assert cuda.Context.get_limit(cuda.limit.MALLOC_HEAP_SIZE) == 60 * MiB
        addr = other.alloc(8 * MiB)  # 42 MiB of the other slot is taken: 8 fit
        other.synchronize()
        other.free(addr)


def test_limits_survive_park_and_restore(slotted: tuple[Any, Any]) -> None:
    agent, cuda = slotted
    cuda.Context.set_limit(cuda.limit.STACK_SIZE, 4096)
    cuda.Context.set_limit(cuda.limit.MALLOC_HEAP_SIZE, 16 * MiB)
    data = cuda.to_device(np.arange(1000, dtype=np.float64))
    session = get_session()
    session.release()  # parks: the worker ends
    assert cuda.Context.get_limit(cuda.limit.STACK_SIZE) == 4096  # restored in a new worker
    assert session.restores == 1
    assert cuda.Context.get_limit(cuda.limit.MALLOC_HEAP_SIZE) == 16 * MiB
    assert np.array_equal(cuda.from_device(data, (1000,), np.float64), np.arange(1000.0))
    eventually(lambda: session_bytes(agent, "object_bytes") == 8 * MiB + 3 * 1024 * THREADS)
