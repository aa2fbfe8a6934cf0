"""One client session on the agent: its address range, what it mapped, and its device objects.

A session belongs to a kernel (the ``kernel_id`` of the lease it was opened under) and is either
``active`` (its device memory is mapped, its connection may send batches) or ``parked`` (its memory
lives in the agent's ParkStore; its objects stay loaded on this agent). ``creation_log`` holds the
calls that created its live objects, so that another agent can recreate them when the parked state
moves there.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gpu_agent.executors.base import ExecutorSession
from gpu_agent.memory_map import MappedRanges

ACTIVE = "active"
PARKED = "parked"

#: ops that create an object, and the ops that destroy it: (kind, handle position)
_CREATES = {
    "module_source": "module", "module_image": "module", "get_function": "function",
    "stream_create": "stream", "event_create": "event", "elementwise_new": "kernel",
    "reduction_new": "kernel",
}
_DESTROYS = {"module_unload": "module", "stream_destroy": "stream", "event_destroy": "event"}


@dataclass
class ClientSession:
    session_id: str
    routing_id: bytes | None
    slot: int
    base: int
    size: int
    device: ExecutorSession
    client: dict[str, Any] = field(default_factory=dict)
    kernel_id: str = ""
    lease_id: str | None = None
    #: what its kernel asked the agent for its parked state (lease info park_ttl, park_limit)
    park_ttl: float | None = None
    park_limit: int | None = None
    resume_token: str = ""
    state: str = ACTIVE
    started: float = field(default_factory=time.time)
    last_seen: float = field(default_factory=time.monotonic)
    #: when its last batch finished running on the agent (monotonic)
    last_active: float = field(default_factory=time.monotonic)
    calls: int = 0
    batches: int = 0
    #: set when the device context was reset under this session: every later call fails with it
    lost: str | None = None
    ranges: MappedRanges = field(init=False)
    ops: dict[str, Callable[..., Any]] = field(init=False)
    #: (kind, handle) -> the calls that made that object what it is, in order
    creation_log: dict[tuple[str, int], list[list[Any]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.ranges = MappedRanges(self.base, self.size)
        self.ops = {
            name[3:]: getattr(self.device, name) for name in dir(self.device)
            if name.startswith("op_")
        }

    def record(self, name: str, args: list[Any]) -> None:
        """Note a call that ran, if it creates, configures or destroys a device object."""
        kind = _CREATES.get(name)
        if kind is not None:
            self.creation_log[(kind, args[0])] = [[name, *_portable(args)]]
        elif name == "function_set":
            calls = self.creation_log.get(("function", args[0]))
            if calls is not None:
                calls.append([name, *args])
        elif (kind := _DESTROYS.get(name)) is not None:
            self.creation_log.pop((kind, args[0]), None)
            if kind == "module":
                for key, calls in list(self.creation_log.items()):
                    if key[0] == "function" and calls[0][2] == args[0]:
                        del self.creation_log[key]

    def replay_calls(self) -> list[list[Any]]:
        """The creation log as calls, modules before functions before the rest."""
        order = {"module": 0, "function": 1, "stream": 2, "event": 2, "kernel": 2}
        keys = sorted(self.creation_log, key=lambda k: (order[k[0]], k[1]))
        return [call for key in keys for call in self.creation_log[key]]

    def summary(self) -> dict[str, Any]:
        return {
            "session": self.session_id,
            "kernel_id": self.kernel_id,
            "state": self.state,
            "client": self.client,
            "range": [self.base, self.size],
            "device_bytes": self.device.device_bytes() if self.state == ACTIVE else 0,
            "allocations": len(self.ranges),
            "calls": self.calls,
            "batches": self.batches,
            "started": self.started,
            "idle_s": round(time.monotonic() - self.last_active, 3),
            "lost": self.lost,
        }


def _portable(args: list[Any]) -> list[Any]:
    # frame buffers are only valid during the call: keep bytes
    return [bytes(a) if isinstance(a, memoryview) else a for a in args]
