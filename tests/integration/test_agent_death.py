"""An agent that dies or freezes mid-program gives GPULostError naming it, never a hang."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import psutil
import pytest

from harp_jupyter.shim.session import get_session

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def cuda(monkeypatch: pytest.MonkeyPatch, shim_cuda: ModuleType) -> ModuleType:
    monkeypatch.setenv("HARP_AGENT_TIMEOUT", "2")  # read when the session connects, later
    return shim_cuda

def test_killed_agent_raises_gpu_lost_at_the_next_sync_point(
        cuda: ModuleType, emulated_agent: Any) -> None:
    data = np.arange(1000, dtype=np.float32)
    dev = cuda.to_device(data)
    assert np.array_equal(cuda.from_device_like(dev, data), data)
    first = get_session()
    emulated_agent.process.send_signal(signal.SIGKILL)
    emulated_agent.process.wait()
    with pytest.raises(cuda.GPULostError, match=emulated_agent.endpoint) as lost:
        cuda.memset_d8(dev, 0, 4)
        cuda.from_device_like(dev, data)
    assert "harp-agent" in str(lost.value)
    assert first.lost
    with pytest.raises(cuda.GPULostError):  # objects of the lost session say so
        cuda.memcpy_htod(dev, data)
    assert get_session() is not first  # the next GPU call starts a new session...
    with pytest.raises(cuda.GPULostError, match="no GPU agent answered"):
        cuda.mem_alloc(16)  # ...which finds no agent there, within HARP_AGENT_TIMEOUT


def session_worker(agent: Any) -> psutil.Process:
    """The worker process serving the one session of ``agent`` (the spare has no client)."""
    session = get_session()
    port = int(session._writer.connection.endpoint.rsplit(":", 1)[1])
    for child in psutil.Process(agent.process.pid).children():
        if any(c.laddr.port == port for c in child.net_connections(kind="tcp")
               if c.status == psutil.CONN_LISTEN):
            return child
    raise AssertionError("no worker listens on the session's port")


def test_frozen_worker_is_detected_by_heartbeats(cuda: ModuleType, emulated_agent: Any) -> None:
    dev = cuda.mem_alloc(64)
    cuda.Context.synchronize()
    worker = session_worker(emulated_agent)
    worker.suspend()
    try:
        with pytest.raises(cuda.GPULostError, match=emulated_agent.endpoint):
            cuda.memset_d8(dev, 1, 64)
            cuda.Context.synchronize()  # no reply ever comes; the link times out in ~2 s
    finally:
        worker.resume()


def test_a_frozen_supervisor_does_not_hold_up_the_sessions_work(
        cuda: ModuleType, emulated_agent: Any) -> None:
    data = np.arange(256, dtype=np.float32)
    dev = cuda.to_device(data)
    emulated_agent.process.send_signal(signal.SIGSTOP)
    try:  # batches go straight to the session's worker
        for _ in range(20):
            cuda.memcpy_htod(dev, data * 2)
            assert np.array_equal(cuda.from_device_like(dev, data), data * 2)
    finally:
        emulated_agent.process.send_signal(signal.SIGCONT)


def test_harp_run_script_survives_a_killed_agent(emulated_agent: Any, tmp_path: Path) -> None:
    script = tmp_path / "long_job.py"
    script.write_text(textwrap.dedent("""\
        import sys
        import numpy as np
        import pycuda.autoinit
        import pycuda.driver as cuda

        cpu_state = {"rows": 12345}
        dev = cuda.mem_alloc(4096)
        host = np.zeros(1024, np.float32)
        print("ready", flush=True)
        try:
            while True:  # a GPU loop with a sync point in every iteration
                cuda.memcpy_htod(dev, host + 1)
                cuda.memcpy_dtoh(host, dev)
        except cuda.GPULostError as e:
            print("lost:", e, flush=True)
        print("cpu state intact", cpu_state["rows"], flush=True)
        cuda.mem_alloc(16)  # the next GPU call tries a new session and fails clearly
    """))
    env = {k: v for k, v in os.environ.items() if not k.startswith("HARP_")}
    env.update(PYTHONPATH=str(REPO), HARP_AGENT=emulated_agent.endpoint, HARP_AGENT_TIMEOUT="3")
    job = subprocess.Popen([sys.executable, "-m", "harp_jupyter.cli", "run", str(script)],
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert job.stdout is not None
        assert job.stdout.readline().strip() == "ready"
        emulated_agent.process.send_signal(signal.SIGKILL)
        out, err = job.communicate(timeout=30)
    finally:
        if job.poll() is None:
            job.kill()
    assert "lost: lost the GPU agent at " + emulated_agent.endpoint in out
    assert "cpu state intact 12345" in out
    assert job.returncode == 1
    assert "GPUUnavailableError" in err and emulated_agent.endpoint in err


def test_arrays_of_a_lost_session_say_so_on_the_next_agent(
        agent_starter: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    from harp_jupyter import shim
    from harp_jupyter.shim.session import reset_session

    first, second = agent_starter(), agent_starter()
    monkeypatch.setenv("HARP_AGENTS", f"{first.endpoint},{second.endpoint}")
    monkeypatch.setenv("HARP_AGENT_TIMEOUT", "2")
    reset_session()
    shim.activate()
    try:
        importlib.import_module("pycuda.autoinit")
        cuda = importlib.import_module("pycuda.driver")
        gpuarray = importlib.import_module("pycuda.gpuarray")
        old = gpuarray.to_gpu(np.arange(10.0))
        assert get_session().endpoint == first.endpoint
        first.kill()
        with pytest.raises(cuda.GPULostError):
            old.get()
        fresh = gpuarray.to_gpu(np.ones(3))  # the next GPU call works, on the other agent
        assert fresh.get().sum() == 3 and get_session().endpoint == second.endpoint
        with pytest.raises(cuda.Error, match="lost an earlier GPU session") as stale:
            old.get()
        # pytest is a plain program, not a kernel: no cells to re-run
        assert "This program lost an earlier GPU session" in str(stale.value)
        assert "create them again" in str(stale.value)
    finally:
        reset_session()
        shim.deactivate()
