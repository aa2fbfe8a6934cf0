"""nvcc's limits and the operator's --client-cuda-source through a real agent on a GPU: a
template bomb in one tenant's SourceModule is a CompileError at that call naming the limit, the
same session compiles and runs the next kernel, and a neighbour in the other slot never notices;
with ``refuse`` clients' CUDA C is refused with the reason while the agent's own kernels (gpuarray)
still compile; a client's cubins never land in pycuda's shared compile cache. The launcher
alone, without a GPU: tests/integration/test_nvcc_sandbox.py."""

from __future__ import annotations

import secrets
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import running_agent, shim_driver
from tests.integration.test_nvcc_sandbox import TEMPLATE_BOMB
from tests.shim_sessions import script_session

pytestmark = pytest.mark.timeout(600)

SMALL = 'extern "C" __global__ void twice(float *x) { x[threadIdx.x] *= 2; }'


def _bomb_then_a_kernel(endpoint: str, flag: str) -> None:
    with shim_driver(endpoint) as cuda, script_session([endpoint]) as (other, _source):
        from pycuda.compiler import SourceModule

        kept = other.alloc(1 << 20)
        other.htod(kept, np.arange(256, dtype=np.float32))
        with pytest.raises(cuda.CompileError, match=f"harp-agent {flag}") as failed:
            SourceModule(TEMPLATE_BOMB)  # raised here, at the call, as pycuda does
        assert "nvcc did not finish compiling your CUDA C" in str(failed.value)
        twice = SourceModule(SMALL).get_function("twice")
        x = np.arange(32, dtype=np.float32)
        twice(cuda.InOut(x), block=(32, 1, 1), grid=(1, 1))
        assert np.array_equal(x, 2 * np.arange(32, dtype=np.float32))
        back = np.empty(256, np.float32)
        other.dtoh_into(back, kept)  # the neighbour's slot and session are untouched
        assert np.array_equal(back, np.arange(256, dtype=np.float32))


def test_a_template_bomb_ends_at_the_memory_limit_for_that_tenant_alone() -> None:
    with running_agent("--slots", "2", "--nvcc-memory", "1GiB", executor="pycuda",
                       timeout=180) as agent:
        _bomb_then_a_kernel(agent.endpoint, "--nvcc-memory")


def test_a_template_bomb_ends_at_the_wall_clock_limit_for_that_tenant_alone() -> None:
    with running_agent("--slots", "2", "--nvcc-wall", "10", "--nvcc-memory", "48GiB",
                       executor="pycuda", timeout=180) as agent:
        _bomb_then_a_kernel(agent.endpoint, "--nvcc-wall")


def test_refuse_refuses_clients_cuda_c_and_keeps_array_operations() -> None:
    with running_agent("--client-cuda-source", "refuse", executor="pycuda",
                       timeout=180) as agent, shim_driver(agent.endpoint) as cuda:
        from pycuda import gpuarray
        from pycuda.compiler import SourceModule

        with pytest.raises(cuda.Error, match="--client-cuda-source refuse"):
            SourceModule(SMALL)
        a = gpuarray.to_gpu(np.arange(10, dtype=np.float32))
        assert np.array_equal((a * 3).get(), 3 * np.arange(10, dtype=np.float32))


def test_clients_cuda_c_never_reaches_the_shared_compile_cache(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """gpu_agent/compile_cache.py: another tenant could read (by timing) or substitute (by an
    MD5 collision) what a shared entry holds; a client's cubins stay in its worker."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("PYCUDA_CACHE_DIR", raising=False)
    name = f"harp_cache_probe_{secrets.token_hex(6)}"
    source = f'extern "C" __global__ void {name}(float *x) {{ x[threadIdx.x] += 1; }}'
    with running_agent(executor="pycuda", timeout=180) as agent:
        for _ in range(2):  # two sessions, one after the other: each compiles it itself
            with shim_driver(agent.endpoint) as cuda:
                from pycuda import gpuarray
                from pycuda.compiler import SourceModule

                kernel = SourceModule(source).get_function(name)
                x = np.zeros(32, np.float32)
                kernel(cuda.InOut(x), block=(32, 1, 1), grid=(1, 1))
                assert np.array_equal(x, np.ones(32, np.float32))
                a = gpuarray.to_gpu(np.arange(8, dtype=np.float32))
                assert np.array_equal((a * 3).get(), 3 * np.arange(8, dtype=np.float32))
    cached = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert cached, "the agent's own gpuarray kernels use pycuda's cache under XDG_CACHE_HOME"
    assert not [p for p in cached if name.encode() in p.read_bytes()]
