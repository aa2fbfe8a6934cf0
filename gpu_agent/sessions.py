"""One client session on the agent: its address range, what it mapped, and its device objects."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gpu_agent.executors.base import ExecutorSession
from gpu_agent.memory_map import MappedRanges


@dataclass
class ClientSession:
    session_id: str
    routing_id: bytes
    slot: int
    base: int
    size: int
    device: ExecutorSession
    client: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    last_seen: float = field(default_factory=time.monotonic)
    calls: int = 0
    batches: int = 0
    #: set when the device context was reset under this session: every later call fails with it
    lost: str | None = None
    ranges: MappedRanges = field(init=False)
    ops: dict[str, Callable[..., Any]] = field(init=False)

    def __post_init__(self) -> None:
        self.ranges = MappedRanges(self.base, self.size)
        self.ops = {
            name[3:]: getattr(self.device, name) for name in dir(self.device)
            if name.startswith("op_")
        }

    def summary(self) -> dict[str, Any]:
        return {
            "session": self.session_id,
            "client": self.client,
            "range": [self.base, self.size],
            "device_bytes": self.ranges.mapped_bytes,
            "allocations": len(self.ranges),
            "calls": self.calls,
            "batches": self.batches,
            "started": self.started,
            "lost": self.lost,
        }
