"""Local agents for ``agents = auto``: one ``harp-agent`` subprocess per GPU of this machine.

For the laptop-with-a-GPU and single-node cases: nothing to deploy, the server runs the agents.
They are started through the agent's public interface (its CLI), once per process and shared by
every provisioner in it, lazily at the first acquire that needs them, and stopped at exit.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence

log = logging.getLogger("harp.provisioner.local_agents")

START_TIMEOUT_S = 120.0  # the pycuda executor initialises CUDA before it serves


class NoLocalGPU(RuntimeError):
    """``agents = auto`` on a machine without a GPU."""


def count_gpus() -> int:
    """GPUs of this machine: ``nvidia-smi -L``, else NVML; 0 when neither is there."""
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20)
            if out.returncode == 0:
                return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        import pynvml  # type: ignore[import-not-found]

        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetCount())
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        return 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalAgents:
    """The local agents of one process; ``endpoints()`` starts them on first use."""

    def __init__(self, *, count: Callable[[], int] = count_gpus,
                 extra_args: Sequence[str] = (), token: str | None = None) -> None:
        self._count = count
        self.extra_args = list(extra_args)
        self.token = token
        self.processes: list[subprocess.Popen[str]] = []
        self._endpoints: list[str] | None = None
        self._lock = threading.Lock()

    def endpoints(self) -> list[str]:
        """The agents' endpoints (blocking: starts them the first time); NoLocalGPU without
        a GPU."""
        with self._lock:
            if self._endpoints is None:
                gpus = self._count()
                if gpus <= 0:
                    raise NoLocalGPU(
                        "no local GPU: set HARP_AGENTS=tcp://host:port,... to the GPU agents "
                        "to use (agents=auto runs one agent per GPU of this machine, and it "
                        "has none)")
                self._endpoints = [self._start(device) for device in range(gpus)]
                atexit.register(self.stop)
            return list(self._endpoints)

    async def endpoints_async(self) -> list[str]:
        return await asyncio.to_thread(self.endpoints)

    def _start(self, device: int) -> str:
        endpoint = f"tcp://127.0.0.1:{_free_port()}"
        args = [sys.executable, "-m", "gpu_agent.cli", "--listen", endpoint,
                "--device", str(device), *self.extra_args]
        env = dict(os.environ)
        env.pop("HARP_SHIM", None)  # the agent must see the real pycuda, never the shim
        if self.token:
            args += ["--token", self.token]
        process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, env=env)
        self.processes.append(process)
        assert process.stdout is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        output: list[str] = []
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            output.append(line)
            if line.startswith("harp-agent: serving"):
                log.info("local agent for GPU %d: %s", device, line.strip())
                # drain its output so a chatty agent never blocks on a full pipe
                threading.Thread(target=_drain, args=(process,), daemon=True).start()
                return endpoint
        process.kill()
        raise RuntimeError(f"the local agent for GPU {device} did not start:\n"
                           + "".join(output[-20:]))

    def stop(self) -> None:
        """Stop every agent this object started; idempotent."""
        with self._lock:
            processes, self.processes = self.processes, []
            self._endpoints = None
        for process in processes:
            if process.poll() is None:
                process.terminate()
        for process in processes:
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)


def _drain(process: subprocess.Popen[str]) -> None:
    assert process.stdout is not None
    for line in process.stdout:
        log.debug("local agent %d: %s", process.pid, line.rstrip())


_shared: LocalAgents | None = None
_shared_lock = threading.Lock()


def shared(token: str | None = None) -> LocalAgents:
    """The process's local agents (one set, whoever asks first sets the token)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = LocalAgents(token=token)
        return _shared
