"""Shared fixtures: real agent processes on loopback.

``emulated_agent`` starts a real ``harp-agent --executor emulated`` subprocess on a free
127.0.0.1 port and yields an ``AgentProcess`` with ``.endpoint`` (tcp://127.0.0.1:PORT) and
``.process`` (the Popen). It is killed at teardown, whatever the test did. ``module_emulated_agent``
is the same, shared by a module's tests.
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from harp_jupyter import shim
from harp_jupyter.shim.session import reset_session

REPO = Path(__file__).resolve().parents[1]


@dataclass
class AgentProcess:
    endpoint: str
    process: subprocess.Popen
    output: list[str] = field(default_factory=list)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_agent(*extra: str, executor: str | None = None, timeout: float = 60,
                listen: str = "tcp://127.0.0.1:0") -> AgentProcess:
    """Start ``harp-agent`` and wait for its start-up line. The executor is emulated unless
    asked for, or unless HARP_TEST_EXECUTOR says otherwise (the GPU machine runs the agent
    tests with ``pycuda`` too)."""
    executor = executor or os.environ.get("HARP_TEST_EXECUTOR", "emulated")
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    process = subprocess.Popen(
        [sys.executable, "-m", "gpu_agent.cli", "--listen", listen,
         "--executor", executor,
         "--log-level", "WARNING", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    agent = AgentProcess("", process)
    deadline = time.monotonic() + timeout
    assert process.stdout is not None
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        agent.output.append(line)
        if line.startswith("harp-agent: serving"):
            agent.endpoint = line.split()[2]
            # keep draining its output so a chatty agent never blocks on a full pipe
            threading.Thread(target=agent.output.extend, args=(process.stdout,),
                             daemon=True).start()
            return agent
    agent.kill()
    raise RuntimeError("harp-agent did not start:\n" + "".join(agent.output))


@contextmanager
def running_agent(*extra: str, **options: Any) -> Iterator[AgentProcess]:
    """A started agent, killed when the block ends, whatever happened in it."""
    agent = start_agent(*extra, **options)
    try:
        yield agent
    finally:
        agent.kill()


@pytest.fixture
def emulated_agent() -> Iterator[AgentProcess]:
    with running_agent() as agent:
        yield agent


@pytest.fixture(scope="module")
def module_emulated_agent() -> Iterator[AgentProcess]:
    with running_agent() as agent:
        yield agent


@pytest.fixture(scope="module")
def gpu_agent() -> Iterator[AgentProcess]:
    """A real ``harp-agent --executor pycuda`` on GPU 0 (tests/gpu only)."""
    with running_agent(executor="pycuda", timeout=120) as agent:
        yield agent


@pytest.fixture
def agent_starter() -> Iterator[Callable[..., AgentProcess]]:
    """``start(*cli_args)`` starts an emulated agent with extra options; all killed after."""
    started: list[AgentProcess] = []

    def start(*extra: str, **options: Any) -> AgentProcess:
        started.append(start_agent(*extra, **options))
        return started[-1]

    try:
        yield start
    finally:
        for agent in started:
            agent.kill()


@contextmanager
def shim_driver(endpoint: str) -> Iterator[ModuleType]:
    """``pycuda.driver`` as user code sees it through the shim, on a fresh session with a
    context; the shim is deactivated afterwards."""
    import importlib

    reset_session()
    shim.activate(agent=endpoint)
    try:
        importlib.import_module("pycuda.autoinit")
        yield importlib.import_module("pycuda.driver")
    finally:
        reset_session()
        shim.deactivate()


@pytest.fixture
def shim_cuda(emulated_agent: AgentProcess) -> Iterator[ModuleType]:
    with shim_driver(emulated_agent.endpoint) as cuda:
        yield cuda


@pytest.fixture
def gpu_shim_cuda(gpu_agent: AgentProcess) -> Iterator[ModuleType]:
    with shim_driver(gpu_agent.endpoint) as cuda:
        yield cuda


@pytest.fixture
def lease_client() -> Iterator[Any]:
    """A real lease client (provisioner.lease_client) to read agents' status and hold leases
    as another kernel would."""
    from provisioner.lease_client import BlockingLeaseClient

    client = BlockingLeaseClient()
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def shim_at() -> Callable[[str], Any]:
    """``with shim_at(endpoint) as cuda:``: the shim on a fresh session with that agent."""
    return shim_driver


def free_port_block(count: int) -> list[int]:
    """``count`` consecutive ports free on both 127.0.0.1 and 127.0.0.2."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 60000)
        ports = list(range(base, base + count))
        try:
            for host in ("127.0.0.1", "127.0.0.2"):
                for port in ports:
                    with socket.socket() as s:
                        s.bind((host, port))
        except OSError:
            continue
        return ports
    raise RuntimeError("no block of free ports")
