"""Context limits and cuRAND generators' scratch memory on a real GPU (issue 12): the same
limits as local pycuda (tests/programs/context_limits_program.py, run once with local pycuda and
once through ``harp run``), and the slot's memory bounding what they reserve, to that tenant
alone (an agent with two 8 GiB slots: setting a generator up raises the stack to pycuda's
16 KiB for every resident thread, about 4 GiB on an H200)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import running_agent, shim_driver
from tests.shim_sessions import script_session

PROGRAM = Path(__file__).resolve().parents[1] / "programs" / "context_limits_program.py"
REPO = PROGRAM.parents[2]
MiB, GiB = 1 << 20, 1 << 30


def test_limits_match_local_pycuda(gpu_agent: Any, tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    local, forwarded = tmp_path / "local.json", tmp_path / "forwarded.json"
    plain = subprocess.run([sys.executable, str(PROGRAM), str(local)], capture_output=True,
                           text=True, timeout=600, env=env)
    assert plain.returncode == 0, plain.stderr
    run = subprocess.run([sys.executable, "-m", "harp_jupyter.cli", "run", "--agent",
                          gpu_agent.endpoint, str(PROGRAM), str(forwarded)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr
    mine, theirs = json.loads(forwarded.read_text()), json.loads(local.read_text())
    assert mine == theirs
    assert mine["heap_malloc_32MiB"] == [1]  # the raised heap took effect in the kernel


@pytest.fixture(scope="module")
def two_slots() -> Iterator[Any]:
    with running_agent("--slots", "2", "--slot-memory", "8GiB", executor="pycuda",
                       timeout=180) as agent:
        yield agent


def test_a_limit_past_the_slot_is_memory_error_to_that_tenant_alone(two_slots: Any) -> None:
    with shim_driver(two_slots.endpoint) as cuda, \
            script_session([two_slots.endpoint]) as (other, _source):
        with pytest.raises(cuda.MemoryError, match=r"set_limit\(MALLOC_HEAP_SIZE"):
            cuda.Context.set_limit(cuda.limit.MALLOC_HEAP_SIZE, 9 * GiB)
        with pytest.raises(cuda.MemoryError, match=r"set_limit\(STACK_SIZE"):
            cuda.Context.set_limit(cuda.limit.STACK_SIZE, 512 << 10)  # x every resident thread
        cuda.Context.set_limit(cuda.limit.MALLOC_HEAP_SIZE, 4 * GiB)
        assert cuda.Context.get_limit(cuda.limit.MALLOC_HEAP_SIZE) == 4 * GiB
        with pytest.raises(cuda.MemoryError):
            cuda.mem_alloc(6 * GiB)  # the heap took 4 GiB of the slot's 8
            cuda.Context.synchronize()
        # the neighbour's slot is whole, and its limits are CUDA's defaults
        assert other.call_sync("limit_get", "MALLOC_HEAP_SIZE") == 8 * MiB
        addr = other.alloc(6 * GiB)
        other.synchronize()
        other.free(addr)



def test_a_curand_generator_in_a_full_slot_is_memory_error_to_that_tenant_alone(
        two_slots: Any) -> None:
    with shim_driver(two_slots.endpoint) as cuda, \
            script_session([two_slots.endpoint]) as (other, _source):
        from pycuda import curandom

        filler = cuda.mem_alloc(8 * GiB - 2 * MiB)  # the slot, all but one chunk
        cuda.Context.synchronize()
        with pytest.raises(cuda.MemoryError, match="cuRAND"):
            curandom.XORWOWRandomNumberGenerator()
        filler.free()
        generator = curandom.XORWOWRandomNumberGenerator()  # with room, it works
        assert 0 < float(generator.gen_uniform(1000, np.float32).get().mean()) < 1
        addr = other.alloc(6 * GiB)  # the other slot was never touched
        other.synchronize()
        other.free(addr)
