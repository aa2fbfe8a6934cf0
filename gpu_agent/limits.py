"""Every bound the agent keeps on what a client can make it hold, in one place.

Each field is a ``harp-agent`` flag (cli.py builds them from this table's metadata), has a default
derived from the machine where that matters, and crossing it is a clear error to that client
alone. README "Bounds" lists them; tests cross each one.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field, fields
from typing import Any

MiB = 1 << 20
GiB = 1 << 30


def host_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 16 * GiB


def shm_room(path: str = "/dev/shm") -> int:
    """Free bytes of the memory-backed file system parked state lives in (0 when absent)."""
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return 0


def _flag(default: Any, help_text: str, *, unit: str = "", metavar: str | None = None) -> Any:
    return field(default=default, metadata={"help": help_text, "unit": unit, "metavar": metavar})


@dataclass
class AgentLimits:
    """The agent's bounds; ``None`` fields are derived by ``resolved`` from the machine."""

    max_control_message: int = _flag(
        1 * MiB,
        "largest message the supervisor takes, before any authentication (ZeroMQ's maxmsgsize: "
        "a larger one is dropped unread)",
        unit="bytes",
        metavar="BYTES",
    )
    max_frame: int = _flag(
        256 * MiB,
        "largest frame a worker takes from its client, and largest dtoh one call may return "
        "(told to the shim in its welcome: copies go in pieces within it, and a larger "
        "buffer, such as a module image, is the user's clear error)",
        unit="bytes",
        metavar="BYTES",
    )
    session_objects: int = _flag(
        4096,
        "device objects one session may hold at once (modules, kernels, streams, events, cuRAND "
        "generators); creating one more is refused",
        metavar="N",
    )
    pinned_staging: int = _flag(
        64 * MiB,
        "page-locked host memory each worker keeps for device-to-host copies of 64 KiB and more "
        "(reused once sent; 0: pageable buffers only; the emulated executor keeps pageable ones)",
        unit="bytes",
        metavar="BYTES",
    )
    pending_gpu_timings: int = _flag(
        100_000,
        "GPU timings a profiled session keeps until its notebook collects them (two CUDA events "
        "each): past it the session's GPU ops are not timed and its profile says how many",
        metavar="N",
    )
    unread_replies: int = _flag(
        8,
        "replies a connection may leave unread: past it the worker stops reading that client's "
        "batches (back-pressure) and the supervisor drops that client's replies (it also keeps "
        "room for one push per queued lease)",
        metavar="N",
    )
    max_sessions: int = _flag(
        64,
        "sessions the agent keeps, active and parked: past it the oldest parked state is "
        "dropped (its kernel told so); new sessions are refused when all are active",
        metavar="N",
    )
    sessions_per_kernel: int = _flag(
        4, "parked sessions one kernel may keep here: past it its oldest is dropped", metavar="N"
    )
    max_queue: int = _flag(256, "lease requests that may wait in the queue", metavar="N")
    lease_ttl: float = _flag(
        30.0,
        "a lease not renewed for this long expires; also the longest a request may ask for",
        unit="seconds",
        metavar="SECONDS",
    )
    min_lease_ttl: float = _flag(
        1.0, "the shortest ttl a lease request may ask for", unit="seconds", metavar="SECONDS"
    )
    max_secret: int = _flag(
        256,
        "longest kernel_id, kernel_secret or user a client may send",
        unit="characters",
        metavar="N",
    )
    max_lease_info: int = _flag(
        16 << 10,
        "largest lease info map, and largest client description in hello, (packed) a client or "
        "a peer agent may send: the agent keeps both and shows them in status replies",
        unit="bytes",
        metavar="BYTES",
    )
    watchdog: float = _flag(
        600.0,
        "a batch that runs longer than this (a hung kernel) ends its session: the worker is "
        "killed, its tenant told, everyone else untouched",
        unit="seconds",
        metavar="SECONDS",
    )
    reclaim_after: float = _flag(
        3.0,
        "when a kernel waits in the queue, a holder whose session has had no GPU work for this "
        "long is parked at once and the waiter served (a kernel may ask for less, not more)",
        unit="seconds",
        metavar="SECONDS",
    )
    disconnect_grace: float = _flag(
        2.0,
        "how long a session whose client connection dropped waits for it to come back "
        "before it is ended and its memory freed (a process that exits without bye)",
        unit="seconds",
        metavar="SECONDS",
    )
    worker_start_timeout: float = _flag(
        120.0,
        "how long a worker may take to create its CUDA context and say it is ready",
        unit="seconds",
        metavar="SECONDS",
    )
    drain_grace: float = _flag(
        25.0,
        "on SIGTERM, how long running cells may take to finish and parked state to move to "
        "another agent (--pool) before the agent exits anyway (keep it below the pod's "
        "terminationGracePeriodSeconds; the Kubernetes default is 30 s)",
        unit="seconds",
        metavar="SECONDS",
    )
    drain_offer_timeout: float = _flag(
        10.0,
        "during a drain, how long another agent of the pool may go without answering an offer "
        "of parked state or fetching a piece of it before the next agent is offered it (a dead "
        "agent of --pool must not hold the state until the grace ends)",
        unit="seconds",
        metavar="SECONDS",
    )
    fetch_timeout: float = _flag(
        30.0,
        "how long moving parked state from another agent may wait for each answer",
        unit="seconds",
        metavar="SECONDS",
    )
    park_memory: int | None = _flag(
        None,
        "host memory (a memory-backed directory, --park-memory-dir) for parked device "
        "memory before spilling to --park-dir (default: half of this machine's memory, at "
        "most what the directory has free)",
        unit="bytes",
        metavar="BYTES",
    )
    park_limit: int | None = _flag(
        None,
        "all parked state, memory and disk (sessions' device memory, and the code nvcc made "
        "for them, which a restore loads instead of compiling again): a park that can't fit is "
        "dropped and its kernel told (default: --park-memory plus what --park-dir has free, at "
        "most 4x --park-memory)",
        unit="bytes",
        metavar="BYTES",
    )
    park_ttl: float = _flag(
        86400.0, "parked state older than this is dropped", unit="seconds", metavar="SECONDS"
    )
    park_memory_dir: str = _flag(
        "/dev/shm", "memory-backed directory for parked state (tmpfs)", metavar="DIR"
    )
    park_dir: str | None = _flag(
        None,
        "directory parked state spills to past --park-memory (default: a temporary directory)",
        metavar="DIR",
    )
    nvcc_cpu: float = _flag(
        300.0,
        "CPU time each process of one nvcc compile (the agent's, or a client's CUDA C) may "
        "use; past it the compile is a CompileError to that client",
        unit="seconds",
        metavar="SECONDS",
    )
    nvcc_memory: int = _flag(
        8 * GiB,
        "address space each process of one nvcc compile may use (a template that instantiates "
        "itself without end); past it the compile is a CompileError to that client",
        unit="bytes",
        metavar="BYTES",
    )
    nvcc_wall: float = _flag(
        300.0,
        "wall-clock time one nvcc compile may take (keep it below --watchdog, which ends the "
        "whole session); past it the compile is stopped, a CompileError to that client",
        unit="seconds",
        metavar="SECONDS",
    )
    slots: int = _flag(
        1,
        "leases this GPU serves at once, each in its own worker with its own "
        "CUDA context and memory cap",
        metavar="N",
    )
    slot_memory: float | None = _flag(
        None,
        "device memory of each slot: bytes, or a fraction of the device (default: the device's "
        "memory less the workers' contexts, shared equally)",
        metavar="BYTES|FRACTION",
    )

    @classmethod
    def flags(cls) -> list[tuple[str, Any]]:
        """(name, dataclass field) of every bound, for the command line."""
        return [(f.name, f) for f in fields(cls)]

    def park_budget(self) -> tuple[int, int]:
        """(memory, limit) for parked state: the memory tier is what the flag says or half of
        this machine's memory, never more than the memory-backed directory has free (a
        container's /dev/shm is often 64 MiB); the limit adds the disk tier."""
        memory = self.park_memory
        if memory is None:
            memory = min(host_memory() // 2, shm_room(self.park_memory_dir))
        limit = self.park_limit
        if limit is None:
            disk = (
                shm_room(self.park_dir)
                if self.park_dir
                else shm_room(os.environ.get("TMPDIR", "/tmp"))
            )
            limit = memory + min(disk // 2, 4 * max(memory, 1 * GiB))
        return memory, limit

    def slot_bytes(self, device_total: int, context_bytes: int) -> int:
        """The memory cap of one slot on a device of ``device_total`` bytes."""
        value = self.slot_memory
        if value is not None and 0 < value <= 1:
            return int(device_total * value)
        if value is not None and value > 1:
            return int(value)
        # one context per slot and one for the warm spare stay on the device
        room = device_total - (self.slots + 1) * context_bytes
        return max(room // self.slots, 0)
