"""A worker and a client that busy-poll before they sleep (``harp-agent --busy-poll-us``,
``HARP_BUSY_POLL_US``) serve the same results as ones that do not: sync reads, copies both ways,
async calls between sync points, against a real agent."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from tests.conftest import AgentProcess

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[2]

PROGRAM = r"""
import sys
import numpy as np
from harp_jupyter.shim import activate
activate(agent=sys.argv[1])
import pycuda.autoinit
import pycuda.driver as cuda
import psutil

word, host = cuda.mem_alloc(4), np.empty(1, np.int32)
for i in range(300):
    cuda.memset_d32(word, i, 1)                 # queued
    cuda.memcpy_dtoh(host, word)                # a sync point, alone in its batch
    assert host[0] == i, (i, host[0])
data = np.random.default_rng(0).integers(0, 1 << 30, 1 << 18, dtype=np.int32)
dev = cuda.mem_alloc(data.nbytes)
cuda.memcpy_htod(dev, data)
back = np.empty_like(data)
cuda.memcpy_dtoh(back, dev)
assert np.array_equal(back, data)
workers = [p for p in psutil.Process(int(sys.argv[2])).children(recursive=True)
           if "gpu_agent.worker" in " ".join(p.cmdline())]
print("worker polls:", sorted({p.cmdline()[p.cmdline().index("--busy-poll-us") + 1]
                              for p in workers}))
"""


@pytest.mark.parametrize("poll_us", ["0", "300"])
def test_busy_polling_on_both_sides_serves_the_same_results(
        agent_starter: Callable[..., AgentProcess], poll_us: str) -> None:
    agent = agent_starter("--busy-poll-us", poll_us)
    env = dict(os.environ, PYTHONPATH=str(REPO), HARP_BUSY_POLL_US=poll_us)
    child = subprocess.run([sys.executable, "-c", PROGRAM, agent.endpoint,
                            str(agent.process.pid)], env=env, capture_output=True, text=True,
                           timeout=100)
    assert child.returncode == 0, child.stderr
    assert f"worker polls: ['{poll_us}']" in child.stdout
    assert psutil.pid_exists(agent.process.pid)
