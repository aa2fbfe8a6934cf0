"""Park and restore of real device memory (pycuda agents, CUDA VMM at client-chosen addresses).

A raw kernel reads an array through an array of pointers kept in device memory and through an int
pointer the program kept: after a park on the GPU's agent and a restore, on the same agent and on
another agent process (the state moves agent to agent), every pointer still points at the same
data, and the kernel's module is loaded from the code parked with the session, without nvcc (an
nvcc on the agents' PATH counts the compiles it is asked for).
"""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from harp_jupyter import shim
from harp_jupyter.shim.session import get_session, reset_session
from provisioner.lease_client import BlockingLeaseClient

KERNELS = """
__global__ void gather(float *out, float **ptrs, int n)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = ptrs[i % 2][i] + 1.0f;
}
"""


@pytest.fixture
def pycuda_on(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    import importlib

    def start(*endpoints: str) -> tuple[ModuleType, ModuleType]:
        monkeypatch.setenv("HARP_AGENTS", ",".join(endpoints))
        reset_session()
        shim.activate()
        importlib.import_module("pycuda.autoinit")
        return importlib.import_module("pycuda.driver"), importlib.import_module("pycuda.gpuarray")

    try:
        yield start
    finally:
        reset_session()
        shim.deactivate()


class CompileCounter:
    """An ``nvcc`` first on the agents' PATH that runs the real one and sends a UDP datagram for
    each compile (not ``--version``): the only way out of the Landlock sandbox nvcc runs in
    (its files are its own temporary directories; TCP is refused, UDP is not)."""

    def __init__(self, directory: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        real = shutil.which("nvcc")
        if real is None:
            pytest.skip("needs nvcc on PATH")
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.socket.bind(("127.0.0.1", 0))
        self.socket.setblocking(False)
        port = self.socket.getsockname()[1]
        directory.mkdir()
        wrapper = directory / "nvcc"
        wrapper.write_text(
            "#!/bin/bash\n"
            'case " $* " in *" --cubin "*|*" --ptx "*|*" --fatbin "*)\n'
            f'  echo "$*" > /dev/udp/127.0.0.1/{port} ;;\n'
            "esac\n"
            f'exec {real} "$@"\n')
        wrapper.chmod(0o755)
        monkeypatch.setenv("PATH", f"{directory}{os.pathsep}{os.environ['PATH']}")

    def taken(self) -> int:
        """Compiles since the last call (each datagram is sent before its nvcc runs)."""
        count = 0
        while True:
            try:
                self.socket.recv(65536)
            except BlockingIOError:
                return count
            count += 1


@pytest.fixture
def compiles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[CompileCounter]:
    counter = CompileCounter(tmp_path / "bin", monkeypatch)
    try:
        yield counter
    finally:
        counter.socket.close()


def pointer_program(cuda: ModuleType, n: int) -> tuple[Any, ...]:
    from pycuda.compiler import SourceModule

    rng = np.random.default_rng(7)
    a, b = rng.random(n, dtype=np.float32), rng.random(n, dtype=np.float32)
    a_dev, b_dev = cuda.to_device(a), cuda.to_device(b)
    ptrs = cuda.to_device(np.array([int(a_dev), int(b_dev)], np.uint64))
    out = cuda.mem_alloc(a.nbytes)
    gather = SourceModule(KERNELS).get_function("gather")
    expected = np.where(np.arange(n) % 2 == 0, a, b) + 1
    return gather, ptrs, out, int(a_dev), a, expected, (a_dev, b_dev)


def run_gather(cuda: ModuleType, gather: Any, ptrs: Any, out: Any, n: int) -> np.ndarray:
    gather(out, ptrs, np.int32(n), block=(256, 1, 1), grid=((n + 255) // 256, 1))
    return cuda.from_device(out, (n,), np.float32)


def test_park_and_restore_on_the_same_agent_keeps_pointers_without_compiling_again(
        agent_starter: Any, compiles: CompileCounter, pycuda_on: Any,
        lease_client: BlockingLeaseClient) -> None:
    agent = agent_starter(executor="pycuda", timeout=120)
    cuda, gpuarray = pycuda_on(agent.endpoint)
    n = 1 << 20
    gather, ptrs, out, a_int, a, expected, _keep = pointer_program(cuda, n)
    big = gpuarray.to_gpu(np.arange(64 << 20, dtype=np.float32))  # 256 MiB of state
    np.testing.assert_array_equal(run_gather(cuda, gather, ptrs, out, n), expected)
    assert compiles.taken() == 1  # the counter sees the agent's nvcc
    used_before = lease_client.status(agent.endpoint)["memory"]["used"]

    info = get_session().release()
    assert info["bytes"] >= big.nbytes + 3 * 4 * n
    status = lease_client.status(agent.endpoint)
    assert status["leases"]["holder"] is None
    assert status["memory"]["used"] < used_before - big.nbytes // 2  # the GPU memory is free

    np.testing.assert_array_equal(run_gather(cuda, gather, ptrs, out, n), expected)
    assert get_session().restores == 1
    assert compiles.taken() == 0  # the module came back from the session's parked code
    np.testing.assert_array_equal(cuda.from_device(a_int, (n,), np.float32), a)
    assert float(gpuarray.sum(big).get()) == pytest.approx(float(np.arange(64 << 20).sum()),
                                                           rel=1e-6)


def test_restore_on_another_agent_keeps_pointers_without_compiling_again(
        agent_starter: Any, compiles: CompileCounter, pycuda_on: Any,
        lease_client: BlockingLeaseClient) -> None:
    first = agent_starter(executor="pycuda", timeout=120)
    second = agent_starter(executor="pycuda", timeout=120)  # another process on the same GPU
    cuda, _gpuarray = pycuda_on(first.endpoint, second.endpoint)
    n = 1 << 18
    gather, ptrs, out, a_int, a, expected, _keep = pointer_program(cuda, n)
    np.testing.assert_array_equal(run_gather(cuda, gather, ptrs, out, n), expected)
    assert compiles.taken() == 1
    session = get_session()
    assert session.endpoint == first.endpoint
    session.release()
    other = lease_client.request(first.endpoint, "other-kernel", "s")
    assert other["state"] == "held"

    out_host = run_gather(cuda, gather, ptrs, out, n)  # restores on the second agent
    assert session.endpoint == second.endpoint
    np.testing.assert_array_equal(out_host, expected)
    assert compiles.taken() == 0  # its code came with the state, fetched from the first
    np.testing.assert_array_equal(cuda.from_device(a_int, (n,), np.float32), a)
    lease_client.release(first.endpoint, other["id"], other["token"])
