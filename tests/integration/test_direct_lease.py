"""A kernel without a provisioner (``harp run``, plain Python) holds its lease with the same keeper
as the provisioner does (``DirectLeaseSource``): against real emulated agents it queues, moves to
an agent that comes free, is reclaimed by the agent while idle for a waiter and gets its device
memory back intact, and tells why at its next acquire.

Two sessions live in this one process, each with its own lease source, as two scripts would.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import pytest

from harp_jupyter.shim import notice
from tests.shim_sessions import eventually, get, put, script_session

pytestmark = pytest.mark.timeout(120)


def test_an_idle_script_is_reclaimed_for_a_waiting_one_and_comes_back_intact(
        agent_starter: Any, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    agent = agent_starter("--reclaim-after", "1")
    monkeypatch.setenv("HARP_RECLAIM_AFTER", "1")
    data = np.arange(10_000, dtype=np.float64)
    with script_session([agent.endpoint]) as (first, first_source), \
            script_session([agent.endpoint]) as (second, second_source):
        addr = put(first, data)
        assert first_source.status()["reclaim_after"] == 1
        asked = time.monotonic()
        put(second, np.ones(4))  # queued, granted once the first has idled 1 s
        assert time.monotonic() - asked < 1 + 10  # (a bound against a hang, not a timing)
        state = eventually(lambda: first_source.status()["state"] == "parked"
                           and first_source.status())
        assert state["parked_reason"] == "reclaim"
        assert state["message"].startswith("Released for a kernel waiting in the queue")
        eventually(lambda: first.parked)  # its connection to the gone worker is dropped
        assert first.allocated_bytes() == data.nbytes
        # it wants the GPU back: it queues, the idle second is reclaimed in turn
        assert np.array_equal(get(first, addr, data), data)
        assert first_source.status()["state"] == "held"
        told = capsys.readouterr().err  # at its acquire: a script has no cells
        # told at its acquire (the second script, reclaimed in turn meanwhile, may add its own
        # note: this one process holds both)
        assert told.count("parked while idle because another notebook was waiting") >= 1
        assert "This program's GPU was parked" in told  # a script is not a kernel
        assert eventually(lambda: second_source.status()["parked_reason"] == "reclaim")
        notice.show_pending()  # the second's note (it does not acquire again here)


def test_a_queued_script_moves_to_the_agent_that_comes_free(
        agent_starter: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # nobody is reclaimed here: the move must come from an agent coming free
    agents = [agent_starter("--reclaim-after", "600"), agent_starter("--reclaim-after", "600")]
    monkeypatch.setenv("HARP_RECLAIM_AFTER", "600")
    pool = [a.endpoint for a in agents]
    with script_session(pool) as (first, first_source), \
            script_session(pool) as (second, second_source), \
            script_session(pool) as (third, third_source):
        put(first, np.ones(4))
        put(second, np.ones(4))
        done = threading.Event()
        threading.Thread(target=lambda: (put(third, np.ones(4)), done.set()),
                         daemon=True).start()
        queued = eventually(lambda: third_source.status()["state"] == "queued"
                            and third_source.status())
        holders = {first_source.status()["agent"]: first, second_source.status()["agent"]: second}
        other = next(agent for agent in holders if agent != queued["agent"])
        holders[other].release()
        assert done.wait(20)
        assert third_source.status()["agent"] == other
