"""The shim's cache of freed device memory, through real emulated agent processes.

A freed allocation of 2 MiB or more stays mapped (HARP_CACHED_MEMORY bounds it) and the next
allocation of its rounded size takes it back with no ``alloc`` sent; the ops the shim sends are
counted by the profiler's recorder, which sees every call queued for the agent.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from harp_jupyter.profiler.profile import profiled
from harp_jupyter.shim.errors import MemoryError as ShimMemoryError
from harp_jupyter.shim.session import get_session
from tests.integration.test_park_restore import pycuda_modules

pytestmark = pytest.mark.timeout(60)

MIB = 1 << 20
SLOT = 64 * MIB


def sent_ops(function: Callable[[], Any]) -> Counter[str]:
    _, profile = profiled(function, gpu_timing=False)
    counted: Counter[str] = Counter()
    for call in profile.recorder.calls:  # a record may be a run of identical calls
        counted[call.op] += call.count
    return counted


def temporaries_loop(gpuarray: Any, steps: int) -> Callable[[], Any]:
    """A step makes a 4 MiB temporary and drops it, as ``tanh(z)`` or ``t - y`` do."""
    a = gpuarray.to_gpu(np.ones(MIB, np.float32))

    def run() -> Any:
        for _ in range(steps):
            t = a * 2
            del t
        return a.get()  # a call after the last step: the last free is sent by then

    return run


@pytest.fixture
def small_agent(agent_starter: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    agent = agent_starter("--emulated-memory", str(4 * SLOT), "--slot-memory", str(SLOT))
    monkeypatch.setenv("HARP_AGENTS", agent.endpoint)
    return agent


def test_a_loop_of_4mib_temporaries_maps_once_and_never_unmaps(
        small_agent: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HARP_CACHED_MEMORY", raising=False)  # the default: 1/8 of the slot
    with pycuda_modules() as (_cuda, gpuarray):
        ops = sent_ops(temporaries_loop(gpuarray, 20))
        assert (ops["alloc"], ops["free"]) == (1, 0)
        # each reuse is ordered after the old owner's work, as cuMemAlloc is: a 1-byte memset
        assert ops["memset"] == 19
        assert get_session()._memory.cached_bytes == 4 * MIB


def test_a_cache_of_zero_maps_and_unmaps_every_step_as_before(
        small_agent: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HARP_CACHED_MEMORY", "0")
    with pycuda_modules() as (_cuda, gpuarray):
        ops = sent_ops(temporaries_loop(gpuarray, 20))
        assert (ops["alloc"], ops["free"]) == (20, 20)


def test_the_cache_never_holds_more_than_its_bound(
        small_agent: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HARP_CACHED_MEMORY", str(10 * MIB))
    with pycuda_modules() as (_cuda, gpuarray):
        arrays = [gpuarray.empty(MIB, np.float32) for _ in range(5)]  # 5 x 4 MiB

        def drop() -> None:
            arrays.clear()
            gpuarray.zeros(4, np.float32)  # a call: the finalizers' frees are sent

        ops = sent_ops(drop)
        assert ops["free"] == 3  # two 4 MiB chunks fit the 10 MiB bound; three are unmapped
        assert get_session()._memory.cached_bytes == 8 * MIB


def fill_the_cache(gpuarray: Any) -> None:
    """Six 8 MiB arrays freed: 48 MiB of the 64 MiB slot cached."""
    small = gpuarray.zeros(4, np.float32)  # its 2 MiB chunk mapped now, not after
    arrays = [gpuarray.to_gpu(np.full(2 * MIB, i, np.float32)) for i in range(6)]
    arrays.clear()
    small.fill(1)  # a call: the finalizers' frees are sent
    assert get_session()._memory.cached_bytes == 48 * MIB


def test_an_allocation_that_needs_the_cached_memory_gets_it(
        small_agent: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HARP_CACHED_MEMORY", str(SLOT))
    with pycuda_modules() as (_cuda, gpuarray):
        fill_the_cache(gpuarray)
        host = np.arange(10 * MIB, dtype=np.float32)  # 40 MiB: more than the 16 MiB not cached
        ops: Counter[str] = sent_ops(lambda: gpuarray.to_gpu(host))
        # 48 MiB cached and the kept empty 2 MiB chunk of small arrays leave 14 MiB: that chunk
        # (as before) and the five oldest cached chunks are unmapped ahead of the alloc, which
        # leaves 16 MiB free once it is mapped, room for the 8 MiB still cached
        assert (ops["free"], ops["alloc"]) == (6, 1)
        big = gpuarray.to_gpu(host)  # (the array above was freed into the cache: taken back)
        assert np.array_equal(big.get(), host)
        assert get_session()._memory.cached_bytes == 8 * MIB


def out_of_memory_message(gpuarray: Any, with_cache: bool) -> str:
    if with_cache:
        fill_the_cache(gpuarray)
    with pytest.raises(ShimMemoryError) as caught:
        gpuarray.empty(18 * MIB, np.float32)  # 72 MiB: more than the slot
    return str(caught.value)


def test_running_out_says_what_it_says_without_a_cache(
        small_agent: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HARP_CACHED_MEMORY", "0")
    with pycuda_modules() as (_cuda, gpuarray):
        without = out_of_memory_message(gpuarray, with_cache=False)
    monkeypatch.setenv("HARP_CACHED_MEMORY", str(SLOT))
    with pycuda_modules() as (_cuda, gpuarray):
        with_cache = out_of_memory_message(gpuarray, with_cache=True)
        assert get_session()._memory.cached_bytes == 0  # all given back before the agent said no
    assert "out of memory" in without and "64.0 MiB free" in without
    assert with_cache == without


def test_mem_get_info_gives_the_cache_back_first(
        small_agent: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    figures = []
    for setting in ("0", str(SLOT)):
        monkeypatch.setenv("HARP_CACHED_MEMORY", setting)
        with pycuda_modules() as (cuda, gpuarray):
            arrays = [gpuarray.empty(2 * MIB, np.float32) for i in range(6)]
            arrays.clear()
            figures.append(cuda.mem_get_info())
            assert get_session()._memory.cached_bytes == 0
    assert figures[1] == figures[0]  # what the user reads is what it was without a cache


def test_a_bad_setting_is_refused_with_what_to_write(monkeypatch: pytest.MonkeyPatch) -> None:
    from harp_jupyter.shim.device_memory import DeviceMemory

    monkeypatch.setenv("HARP_CACHED_MEMORY", "lots")
    with pytest.raises(ValueError, match="HARP_CACHED_MEMORY must be a whole number of bytes"):
        DeviceMemory()


def test_park_and_restore_with_cached_chunks_keep_the_data(
        small_agent: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HARP_CACHED_MEMORY", str(SLOT))
    with pycuda_modules() as (_cuda, gpuarray):
        host = np.arange(MIB, dtype=np.float32)
        kept = gpuarray.to_gpu(host)
        freed = gpuarray.to_gpu(host * 3)
        del freed
        gpuarray.zeros(4, np.float32)  # a call: the finalizer's free is sent
        session = get_session()
        assert session._memory.cached_bytes == 4 * MIB
        info = session.release()
        assert info["bytes"] < 8 * MIB  # the cache was given back before the park
        assert np.array_equal(kept.get(), host)  # restored
        assert session.restores == 1

        def temporaries() -> None:
            for k in range(3):
                temporary = gpuarray.to_gpu(host * k)
                assert np.array_equal(temporary.get(), host * k)
                del temporary

        ops = sent_ops(temporaries)
        assert ops["alloc"] == 1  # after the restore the cache serves again
        assert np.array_equal(kept.get(), host)


def test_a_park_gives_the_cache_back_first(
        small_agent: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HARP_CACHED_MEMORY", str(SLOT))
    with pycuda_modules() as (_cuda, gpuarray):
        host = np.arange(MIB, dtype=np.float32)
        kept = gpuarray.to_gpu(host)
        cached = gpuarray.to_gpu(host * 3)
        del cached
        gpuarray.zeros(4, np.float32)  # a call: the finalizer's free is sent, into the cache
        freed = gpuarray.to_gpu(host * 7)
        del freed  # its free waits for the next call: the park sends it
        session = get_session()
        info = session.release()
        assert 4 * MIB <= info["bytes"] < 8 * MIB  # the freed 4 MiB were unmapped first
        assert session._memory.cached_bytes == 0
        assert np.array_equal(kept.get(), host)
