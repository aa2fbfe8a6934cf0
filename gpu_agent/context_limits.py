"""A session's CUDA context limits (``Context.get_limit``/``set_limit``: ops limit_get and
limit_set), and the device memory they make the driver reserve.

Every worker has a context of its own, so a limit a tenant sets changes that tenant's context
only. What it can take from the others is device memory: the driver reserves the malloc heap, the
printf FIFO and every resident thread's stack outside any allocation the agent maps. Those bytes
beyond what CUDA's defaults reserve (the slot's size already allows for a context at its defaults)
count against the session's slot, as its mapped memory does; a value that does not fit is
pycuda's MemoryError to that session alone, before CUDA is asked. The same accounting covers
memory an operation needs only while it runs (``Scratch``: a cuRAND generator's set-up).

This module knows no CUDA: the executors apply what it allows (the emulated one only remembers
the values, starting from CUDA's defaults).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from gpu_agent.errors import AgentError
from gpu_agent.sizes import format_bytes


@dataclass(frozen=True, slots=True)
class Limit:
    """One ``pycuda.driver.limit``: CUDA's default, the device bytes a value makes the driver
    reserve (``threads``: how many threads can be resident on the device), and why a tenant may
    not raise it, where it may not."""

    default: int
    reserve: Callable[[int, int], int]
    #: values above ``default`` are refused with this reason (None: any value that fits)
    refuse_above_default: str | None = None


#: a pending device-side launch's record in the driver's launch pool; the driver does not say
#: its size: this is an upper estimate, so the count errs on the tenant's side of the slot
PENDING_LAUNCH_BYTES = 4 << 10

LIMITS: dict[str, Limit] = {
    # every thread that can be resident gets a stack of this many bytes
    "STACK_SIZE": Limit(1024, lambda value, threads: value * threads),
    "PRINTF_FIFO_SIZE": Limit(1 << 20, lambda value, threads: value),
    "MALLOC_HEAP_SIZE": Limit(8 << 20, lambda value, threads: value),
    "DEV_RUNTIME_PENDING_LAUNCH_COUNT": Limit(
        2048, lambda value, threads: value * PENDING_LAUNCH_BYTES),
    "DEV_RUNTIME_SYNC_DEPTH": Limit(
        2, lambda value, threads: 0,
        refuse_above_default=(
            "each level past 2 makes the driver keep a whole grid's state for every level of "
            "device-side cudaDeviceSynchronize, hundreds of MiB it does not report, so it "
            "cannot be counted against your GPU slot; CUDA 12's dynamic parallelism does not "
            "synchronise in device code at all (values up to 2 are accepted)")),
}


def _unknown(name: str) -> AgentError:
    return AgentError("LogicError", f"cuCtxGetLimit failed: unknown limit {name[:64]!r} (one of "
                      f"{', '.join(LIMITS)})")


class ContextLimits:
    """One session's limit values and the slot bytes they (and running ``scratch``) take.

    ``threads``: resident threads of the device (SMs x threads per SM); ``room``: free bytes of
    the session's slot now, or None where it has no cap."""

    def __init__(self, threads: int, room: Callable[[], int | None]) -> None:
        self.threads = threads
        self._room = room
        self.values = {name: limit.default for name, limit in LIMITS.items()}
        self._scratch = 0

    def get(self, name: str) -> int:
        try:
            return self.values[name]
        except KeyError:
            raise _unknown(name) from None

    def extra_bytes(self, values: dict[str, int] | None = None) -> int:
        """Device bytes ``values`` (the current ones by default) reserve beyond CUDA's defaults,
        plus scratch memory of an operation now running."""
        values = self.values if values is None else values
        extra = 0
        for name, limit in LIMITS.items():
            extra += max(limit.reserve(values[name], self.threads)
                         - limit.reserve(limit.default, self.threads), 0)
        return extra + self._scratch

    def check_set(self, name: str, value: int) -> None:
        """Refuse (``AgentError``, to this session alone) a value this tenant may not set or that
        its slot has no room for; the caller then sets it and calls ``set``."""
        limit = LIMITS.get(name)
        if limit is None:
            raise _unknown(name)
        if limit.refuse_above_default is not None and value > limit.default:
            raise AgentError("LogicError", f"Context.set_limit({name}, {value}) is refused by "
                             f"this GPU agent: {limit.refuse_above_default}")
        self._check_room(self.extra_bytes({**self.values, name: value}) - self.extra_bytes(),
                         f"Context.set_limit({name}, {value}) (memory the driver reserves)")

    def set(self, name: str, value: int) -> None:
        self.values[name] = value

    def _check_room(self, more: int, what: str) -> None:
        room = self._room()
        if more <= 0 or room is None or more <= room:
            return
        raise AgentError(
            "MemoryError", f"out of memory: {what} needs {format_bytes(more)} more device "
            f"memory, {format_bytes(max(room, 0))} of this GPU slot is free: free device memory "
            "first, or ask for less", "CUDA_ERROR_OUT_OF_MEMORY")

    @contextmanager
    def scratch(self, nbytes: int, what: str) -> Iterator[None]:
        """Count ``nbytes`` of device memory an operation holds while it runs (MemoryError when
        the slot has no room for them)."""
        self._check_room(nbytes, what)
        self._scratch += nbytes
        try:
            yield
        finally:
            self._scratch -= nbytes

    def stack_scratch(self, stack: int) -> int:
        """The extra bytes raising the stack limit to ``stack`` for a while would reserve."""
        now = self.values["STACK_SIZE"]
        return max(stack - now, 0) * self.threads
