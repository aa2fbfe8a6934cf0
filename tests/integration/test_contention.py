"""Contention over several real emulated agents, through the code path kernels without a
provisioner use (the shim's session and its direct lease source, the keeper inside):

* ``harp run`` queues and moves to the agent that comes free, as a kernel with the provisioner
  does (tests/integration/test_elastic_leases.py) and plain Python does (test_direct_lease.py);
* a randomized, seeded run of several clients with random bursts, reclaim on: nobody starves,
  no slot ever has two holders, every client's data is intact.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from harp_jupyter.shim.lease import DirectLeaseSource
from harp_jupyter.shim.session import RemoteSession
from tests.agent_client import RawClient
from tests.shim_sessions import eventually

pytestmark = pytest.mark.timeout(240)
REPO = Path(__file__).resolve().parents[2]


def desc(addr: int, n: int) -> list[Any]:
    return [addr, "<f8", [n], [8]]


SCRIPT = """\
    import numpy as np
    import pycuda.autoinit
    import pycuda.driver as cuda
    from harp_jupyter.shim.session import get_session

    data = np.arange(1000, dtype=np.float64)
    dev = cuda.to_device(data)
    assert np.array_equal(cuda.from_device_like(dev, data), data)
    print("agent", get_session().endpoint)
"""


def test_harp_run_queues_and_moves_to_the_agent_that_comes_free(
        agent_starter: Any, tmp_path: Path) -> None:
    # nobody is reclaimed here: the move must come from an agent coming free
    agents = [agent_starter("--reclaim-after", "600") for _ in range(2)]
    holders = [RawClient(a.endpoint) for a in agents]
    for holder in holders:
        assert holder.take_lease()["state"] == "held"
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(SCRIPT))
    env = {k: v for k, v in os.environ.items() if not k.startswith("HARP_")}
    env.update(PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
               HARP_AGENTS=",".join(a.endpoint for a in agents), HARP_RECLAIM_AFTER="600")
    run = subprocess.Popen([sys.executable, "-m", "harp_jupyter.cli", "run", str(script)],
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def queued_at() -> int | None:
            for index, holder in enumerate(holders):
                if holder.status()["leases"]["queue"]:
                    return index + 1
            return None

        where = eventually(queued_at) - 1  # the script waits in one agent's queue
        other = 1 - where
        holders[other].release()  # the other agent comes free: the script moves there
        out, err = run.communicate(timeout=60)
        assert run.returncode == 0, err
        assert f"agent {agents[other].endpoint}" in out
        assert not holders[where].status()["leases"]["queue"]  # it left the first queue
    finally:
        if run.poll() is None:
            run.kill()
            run.wait(10)
        for holder in holders:
            holder.close()


class Client:
    """One shim client: bursts of GPU work on its own array, think times between them."""

    def __init__(self, index: int, pool: list[str], rng: random.Random) -> None:
        self.index = index
        self.source = DirectLeaseSource(pool)
        self.session = RemoteSession(pool[0], lease_source=self.source)
        self.source.holder = self.session
        self.bursts = [(rng.randint(1, 4), rng.expovariate(1 / 0.15)) for _ in range(6)]
        self.n = 4096 + index
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.result: np.ndarray | None = None

    def run(self) -> None:
        try:
            session, n = self.session, self.n
            addr = session.alloc(n * 8)
            session.htod(addr, np.full(n, float(self.index)))
            session.synchronize()
            for steps, think in self.bursts:
                for _ in range(steps):
                    session.call("array", "add", desc(addr, n), [desc(addr, n), 1.0], {}, None)
                session.synchronize()
                time.sleep(think)  # the notebook's user thinking: part of the workload
            out = np.empty(n)
            session.dtoh_into(out, addr)
            self.result = out
        except BaseException as e:  # reported by the test
            self.error = e
        finally:
            self.done.set()

    def expected(self) -> np.ndarray:
        return np.full(self.n, float(self.index + sum(steps for steps, _ in self.bursts)))

    def close(self) -> None:
        self.session.close()
        self.source.close()


@pytest.mark.parametrize("seed", [11, 2026])
def test_a_randomized_contention_run_with_reclaim_starves_nobody(
        agent_starter: Any, monkeypatch: pytest.MonkeyPatch, seed: int) -> None:
    monkeypatch.setenv("HARP_RECLAIM_AFTER", "0.1")
    agents = [agent_starter("--reclaim-after", "0.1") for _ in range(2)]
    agents.append(agent_starter("--reclaim-after", "0.1", "--slots", "2"))
    pool = [a.endpoint for a in agents]
    observers = [RawClient(endpoint) for endpoint in pool]
    rng = random.Random(seed)
    clients = [Client(i, rng.sample(pool, len(pool)), rng) for i in range(7)]
    violations: list[Any] = []
    seen_holders: set[str] = set()
    watching = threading.Event()

    def watch() -> None:
        while not watching.is_set():
            holding: list[str] = []
            for observer in observers:
                leases = observer.status()["leases"]
                ids = [h["kernel_id"] for h in leases["holders"]]
                if len(ids) > leases["slots"] or len(set(ids)) != len(ids):
                    violations.append(leases["holders"])
                holding += ids
            if len(set(holding)) != len(holding):  # one kernel holding two GPUs at once
                violations.append(holding)
            seen_holders.update(holding)
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    threads = [threading.Thread(target=c.run, daemon=True) for c in clients]
    try:
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 180  # generous: a starved client never finishes
        for client in clients:
            assert client.done.wait(max(deadline - time.monotonic(), 0)), \
                f"client {client.index} starved"
        for client in clients:
            assert client.error is None, f"client {client.index}: {client.error!r}"
            assert client.result is not None
            assert np.array_equal(client.result, client.expected()), client.index
        assert not violations, violations[:3]
        assert len(seen_holders) == len(clients)  # everyone held a GPU at some point
        assert sum(c.session.restores for c in clients) > 0  # reclaim did happen
    finally:
        watching.set()
        watcher.join(5)
        for client in clients:
            client.close()
        for observer in observers:
            observer.close()
