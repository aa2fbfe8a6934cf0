"""A finished profile: the recorder's data with every agent time placed on the notebook's clock.

``run_profiled`` wraps the code being profiled: it installs the recorder and the NVTX hook,
and afterwards collects the agent's GPU timings and a few clock samples (only when the session
is connected: a profile never leases a GPU just to finish)."""

from __future__ import annotations

import functools
import os
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from harp_jupyter.profiler import clock, recorder
from harp_jupyter.profiler.nvtx_hook import NvtxHook
from harp_jupyter.profiler.recorder import Recorder
from harp_jupyter.shim import hooks as shim_hooks

#: round trips at the end of a profile, to tighten the clock offset: collecting the GPU
#: timings is one (a profiled batch the notebook waits for, sent to an idle agent), pings the rest
CLOCK_SAMPLES = 2


@dataclass
class AgentInfo:
    endpoint: str
    emulated: bool
    gpu: str
    offset: clock.ClockOffset | None = None


@dataclass
class Profile:
    recorder: Recorder
    agents: dict[str, AgentInfo] = field(default_factory=dict)
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)
    label: str = ""
    #: lines to add to a file's line numbers so they read as the editor numbers them (the
    #: body of a %%harp profile cell is compiled without the magic's own line)
    line_offsets: dict[str, int] = field(default_factory=dict)

    @property
    def started(self) -> int:
        return self.recorder.started

    @property
    def ended(self) -> int:
        return self.recorder.ended or self.recorder.started

    def cell_name(self, filename: str) -> str | None:
        """A notebook cell's name for the user: "cell" for the profiled one, "In[N]" for the
        cell N that defined the code it called (a model's forward), as IPython's tracebacks
        name it, not the kernel's /tmp/ipykernel_*/HASH.py; None for a file of its own."""
        if not ("ipykernel_" in filename or filename.startswith("<")):
            return None
        if filename in self.line_offsets:
            return "cell"
        try:
            from IPython import get_ipython

            named = get_ipython().compile.format_code_name(filename)
        except Exception:  # no IPython, or one that names cells otherwise: still a cell
            named = None
        return str(named[1]) if named else "cell"

    def shown_line(self, filename: str, line: int) -> int:
        """``line`` of ``filename`` as the user's editor numbers it."""
        return line + self.line_offsets.get(filename, 0) if line else line

    def to_notebook(self, agent: str, agent_ns: int) -> int | None:
        info = self.agents.get(agent)
        if info is None or info.offset is None:
            return None
        return info.offset.to_notebook(agent_ns)


class ProfileBox:
    """Where ``run_profiled`` leaves the finished profile."""

    profile: Profile | None = None


@contextmanager
def run_profiled(gpu_timing: bool = True, label: str = "", *,
                 per_op: bool = False) -> Iterator[ProfileBox]:
    """Profile the ``with`` body; ``gpu_timing``: CUDA-event timings, ``per_op``: of every GPU
    op, not one span per stream for a batch of many (gpu_agent/profiling.py)."""
    from harp_jupyter.shim.session import get_session

    if recorder.active is not None:
        raise RuntimeError("a profile is already running in this kernel")
    rec = Recorder(gpu_timing=gpu_timing, per_op=per_op)
    session = get_session()

    def forward(name: str) -> bool:
        if not session.connected:
            return False
        session.call("nvtx_push", name)
        return True

    nvtx = NvtxHook(rec, forward, lambda: session.call("nvtx_pop"))
    nvtx.install()
    box = ProfileBox()
    recorder.active = rec
    shim_hooks.lease_span = functools.partial(rec.note_span, "lease")
    try:
        yield box
    finally:
        nvtx.uninstall()
        rec.finish()
        try:
            _collect_agent_side(rec, session)
        finally:
            recorder.active = None
            shim_hooks.lease_span = None
        box.profile = _assemble(rec, session, label)


def _collect_agent_side(rec: Recorder, session: Any) -> None:
    if not session.connected or session.lost or not rec.batches:
        return
    try:
        pings = CLOCK_SAMPLES
        if rec.level >= recorder.GPU_PER_OP:
            endpoint = session.endpoint
            rec.gpu.setdefault(endpoint, []).extend(session.call_sync("profile_gpu") or [])
            pings -= 1
        for _ in range(pings):
            session.call_sync("ping")
    except Exception as e:  # the profile still shows the notebook's side
        rec.gpu_timing_note = f"the agent's GPU timings could not be collected: {e}"


def _assemble(rec: Recorder, session: Any, label: str) -> Profile:
    profile = Profile(rec, label=label)
    by_agent: dict[str, list[tuple[int, int, int, int]]] = {}
    for batch in rec.batches:
        times = batch.agent_times
        if times and isinstance(times.get("recv"), int) and isinstance(times.get("end"), int):
            by_agent.setdefault(batch.agent, []).append(
                (batch.sent, times["recv"], times["end"], batch.received))
    for agent, samples in by_agent.items():
        emulated, gpu = False, ""
        if session.connected and session.endpoint == agent:
            emulated, gpu = session.emulated, str(session.device.get("name") or "")
        profile.agents[agent] = AgentInfo(agent, emulated, gpu, clock.estimate(samples))
    return profile


def profiled(function: Callable[[], Any], gpu_timing: bool = True,
             label: str = "", *, per_op: bool = False) -> tuple[Any, Profile]:
    """Run ``function()`` under a profile; its value and the profile."""
    with run_profiled(gpu_timing, label, per_op=per_op) as box:
        value = function()
    assert box.profile is not None
    return value, box.profile
