"""RemoteSession: the process's forwarding session with one GPU agent.

This is the API the ``pycuda.*`` shim modules are written against (docs/forwarding-design.md,
"The shim's session")::

    s = get_session()               # the process's session; connects (hello) on first need
    s.device / s.emulated           # device_info from welcome / whether the agent is emulated
    h = s.new_handle()              # a fresh small int for a module/function/stream/event/kernel
    s.call(op, *args)               # queued, returns at once (large BUFs: sent before returning)
    s.call_async_buffer(op, *args)  # same, but a large BUF is not waited for (it is kept alive)
    s.call_sync(op, *args)          # flush, wait for the value, raise the first deferred error
    s.call_later(op, *args, on_result=fn)  # fn(value) when the reply arrives (lock held)
    addr = s.alloc(nbytes); s.free(addr)   # client-chosen device addresses
    s.synchronize()

and, added for the driver module: ``htod``, ``dtoh_into``, ``mem_get_info``, ``flush``,
``release_later`` (for finalizers), ``close``, ``lost``, ``endpoint``, ``address_range``.

Every call records the user's call site (the first frame outside harp_jupyter.shim). A call that
fails on the agent is reported in its batch's reply; the first such error is raised at the next
sync point as the pycuda exception of its kind, naming the call and the site.
"""

from __future__ import annotations

import atexit
import itertools
import os
import threading
from collections.abc import Callable
from typing import Any

from gpu_agent import protocol
from harp_jupyter.shim import kernel_output
from harp_jupyter.shim.agent_link import AgentLink
from harp_jupyter.shim.batch import BUF_POSITIONS, BatchWriter, CallMeta
from harp_jupyter.shim.call_errors import CallErrors, lost_sessions
from harp_jupyter.shim.callsite import CallSite, user_call_site
from harp_jupyter.shim.device_memory import DeviceMemory
from harp_jupyter.shim.errors import Error, GPULostError
from harp_jupyter.shim.host_copies import HostCopies
from harp_jupyter.shim.lease import LeaseSource, reset_lease_source
from harp_jupyter.shim.memory_calls import MemoryCalls
from harp_jupyter.shim.parking import SessionParking
from harp_jupyter.shim.restore import SessionRestore

#: how many times in a row a restore may be parked again while it sends the calls that did not
#: run before the error says so (each park means another kernel was waiting for the GPU)
RESTORE_PARKS = 5

#: how long the lease source's word that the agent ended the lease waits for a user thread to
#: finish with the session (past it, the next call's LeaseError does the same)
LEASE_ENDED_LOCK_S = 5.0


class RemoteSession:
    """One session with one agent; see the module docstring. Its parts: ``AgentLink`` (lease,
    hello, resume), ``SessionParking`` (parks, and the agent's own), ``DeviceMemory``
    (addresses) with ``MemoryCalls`` (alloc/free), ``CallErrors`` (the deferred errors),
    ``SessionRestore`` (connect or restore, send again what a park cut), ``HostCopies`` (the
    host<->device copies); the session keeps the call API."""

    def __init__(self, endpoint: str | None = None, *, token: str | None = None,
                 timeout: float | None = None, lease_source: LeaseSource | None = None) -> None:
        self.lock = threading.RLock()
        self._link = AgentLink(endpoint, token=token, timeout=timeout, lease_source=lease_source,
                               holder=self, on_state_lost=self.note_lost)
        self._parking = SessionParking(self, self._link)
        self._memory = DeviceMemory()
        #: the memory's deque, read by every call (one attribute, not two)
        self._deferred = self._memory.deferred
        self._writer: BatchWriter | None = None
        self._handles = itertools.count(1)
        self._errors = CallErrors(self.lock)
        self._closed = False
        #: times the user's code waited for the agent (sync points), for tests and profiles
        self.sync_points = 0
        self._restore = SessionRestore(self, self._link, self._parking, self._memory)
        self._memory_calls = MemoryCalls(self, self._memory, self._errors, self._restore)
        self._copies = HostCopies(self, self._restore)
        # a park copies mapped memory: the cache of freed allocations is given back first
        self._parking.before_park = self._memory_calls.release_cache

    # {{{ connection

    @property
    def endpoint(self) -> str:
        """The agent this session talks to now (or last did)."""
        return self._link.endpoint

    @property
    def lease_source(self) -> LeaseSource:
        return self._link.lease_source

    @property
    def restores(self) -> int:
        """Times this session was restored, for tests and %harp status."""
        return self._restore.restores

    @property
    def parks(self) -> int:
        """Times this session was parked, for tests and %harp status."""
        return self._parking.parks

    @property
    def parked(self) -> bool:
        """Connected before, and now without a GPU until the next GPU call restores it."""
        return self._writer is None and self._link.resume is not None

    def _ensure_connected(self) -> BatchWriter:
        writer = self._writer
        if writer is not None and writer.fatal is None:
            return writer
        if writer is not None and self.lost:  # its worker is gone: parked, or lost
            raise GPULostError(self.lost_reason)
        with self.lock:
            self._check_usable()
            if self._writer is None:
                self._connect()
            assert self._writer is not None
            return self._writer

    def connect(self) -> None:
        """Lease a GPU and open or restore the session now (``%harp lease``)."""
        self._ensure_connected()

    def _connect(self) -> None:
        # RESTORE_PARKS is read here, at each connect (a test lowers it on this module)
        self._restore.connect(RESTORE_PARKS)
        atexit.register(self.close)

    def park(self, reason: str = "release") -> dict[str, Any] | None:
        """Give the GPU back, keeping the device state: what is queued is sent, every reply is
        awaited (work in flight finishes), then the agent moves this session's device memory to
        its host memory. None (nothing done) when a user thread is using the session now."""
        if not self.lock.acquire(blocking=reason == "release"):
            return None
        try:
            return self._parking.park(reason)
        finally:
            self.lock.release()

    def attached_under(self, lease_id: str | None) -> bool:
        """Whether this session attached to its agent under the lease ``lease_id`` (a lease
        that ended before the hello never had it; None: the lease is not named)."""
        return self._link.attached_under(lease_id)

    def lease_ended(self, lease_id: str | None = None) -> None:
        """The lease source, when the agent ended this session's lease and parked the session
        itself (reclaimed for a waiting kernel, expired): the connection is done, and the next
        GPU call leases again, restores, and first sends again what the worker did not run
        (``parked_calls``), instead of sending to a worker that is gone."""
        if not self.lock.acquire(timeout=LEASE_ENDED_LOCK_S):
            return
        try:
            if lease_id is None or lease_id == self._link.lease_id:  # not a newer lease's
                self._parking.orphan_writer(None)
        finally:
            self.lock.release()

    @property
    def max_frame(self) -> int:
        """The largest frame the agent takes (its welcome's; the protocol's before one)."""
        writer = self._writer
        return writer.max_frame if writer is not None else protocol.MAX_FRAME_BYTES

    # the ParkingHost side: what parking and the link tell this session

    def current_writer(self) -> BatchWriter | None:
        return self._writer

    def use_writer(self, writer: BatchWriter) -> None:
        self._writer = writer

    def drop_writer(self) -> None:
        self._writer = None

    def note_lost(self, error: Error) -> None:
        self._errors.lost = error

    def note_error(self, error: Error) -> None:
        self._errors.note(error)

    def allocated_bytes(self) -> int:
        """The bytes the user's live allocations asked for (%harp status, the sidebar)."""
        return self._memory.requested_bytes

    def release(self) -> dict[str, Any]:
        """``%harp release``: park now and give the lease back."""
        info = self.park("release") or {"session": None, "agent": None, "bytes": 0}
        self.lease_source.parked(info)
        return info

    @property
    def welcome(self) -> dict[str, Any]:
        self._ensure_connected()
        return self._link.welcome

    @property
    def device(self) -> dict[str, Any]:
        """device_info (name, compute_capability, attributes, ...): from the agent's welcome
        when connected; before that from the agents' status, so that a device query does not
        lease a GPU (nor wait in a queue for one). Leases when no agent answers the question."""
        if self._writer is None:
            if self._link.welcome:  # parked: the GPU it last had
                return self._link.welcome.get("device") or {}
            facts = self._link.read_device_facts()
            if facts is not None:
                return facts
        return self.welcome.get("device") or {}

    @property
    def emulated(self) -> bool:
        """Whether the agent's executor is the emulated one (host memory, no CUDA)."""
        device = self.device
        if "emulated" in device:
            return bool(device["emulated"])
        return self._link.welcome.get("executor") == "emulated"

    @property
    def address_range(self) -> tuple[int, int]:
        base, size = self.welcome["range"]
        return base, size

    @property
    def connected(self) -> bool:
        return self._writer is not None

    @property
    def lost(self) -> bool:
        """The agent or this session on it is gone; nothing more can be done with it."""
        if self._errors.lost is not None:
            return True
        writer = self._writer
        if writer is None:
            return False
        fatal = writer.fatal
        if fatal is not None and not isinstance(fatal, GPULostError):
            return True
        if fatal is None and not writer.connection.lost:
            return False
        # the worker's connection dropped: parked by the agent (not lost), or lost
        with self.lock:
            if self._writer is writer:
                self._parking.explain_loss(
                    fatal or GPULostError(writer.connection.lost_message()))
        return self._errors.lost is not None

    @property
    def lost_reason(self) -> str:
        if self._errors.lost is not None:
            return str(self._errors.lost)
        writer = self._writer
        if writer is not None and writer.fatal is not None:
            return str(writer.fatal)
        return "lost"

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_usable(self) -> None:
        if self._closed:
            raise GPULostError("this GPU session was closed; start a new one with get_session()")
        if self._errors.lost is not None:
            raise GPULostError(str(self._errors.lost))

    # }}}

    # {{{ calls

    def new_handle(self) -> int:
        return next(self._handles)

    def call(self, op: str, *args: Any) -> None:
        """Queue a call; returns at once. A large buffer argument is sent before returning."""
        writer = self._ensure_connected()
        if self._deferred:
            self._memory_calls.send_deferred()
        positions = BUF_POSITIONS.get(op)
        if positions is not None and _has_large_buffer(args, positions):
            self._restore.send_tracked(writer, [(op, args)], user_call_site(2))
        else:
            self._add(writer, op, args, user_call_site(2))

    def call_inline(self, op: str, *args: Any) -> None:
        """``call`` for a call whose buffer arguments are all ``bytes`` shorter than
        ``protocol.MAX_INLINE_BYTES`` (a kernel's packed arguments): queued as it is, the hot
        path of a launch."""
        writer = self._writer
        if writer is None or writer.fatal is not None or self._deferred:
            self.call(op, *args)  # connects, or sends what waits first
            return
        try:
            writer.add_inline([op, *args], user_call_site(2))
        except GPULostError as e:
            self._restore.parked_meanwhile(writer, e)

    def call_async_buffer(self, op: str, *args: Any) -> None:
        """Like ``call``, but a large buffer argument is neither copied nor waited for: it is
        kept alive until sent, and must not change before the call executes (``*_async``)."""
        writer = self._ensure_connected()
        if self._deferred:
            self._memory_calls.send_deferred()
        self._add(writer, op, args, user_call_site(2))

    def call_later(self, op: str, *args: Any, on_result: Callable[[Any], None]) -> None:
        """Queue a call whose value is passed to ``on_result`` when its reply arrives (with the
        session lock held, possibly on the background thread: keep it short). Not called if
        the call fails; the error is raised at the next sync point."""
        writer = self._ensure_connected()
        if self._deferred:
            self._memory_calls.send_deferred()
        self._add(writer, op, args, user_call_site(2), on_result)

    def call_sync(self, op: str, *args: Any,
                  on_result: Callable[[Any], None] | None = None) -> Any:
        """Send everything queued plus this call, wait for its value, raise the first deferred
        error (of any earlier call, or of this one). ``on_result`` gets the value when this
        call worked, even if an earlier call's error is raised (to free what it made)."""
        writer = self._ensure_connected()
        box: list[Any] = []
        keep: Callable[[Any], None] = box.append
        if on_result is not None:
            def keep(value: Any) -> None:
                box.append(value)
                on_result(value)

        with self.lock:
            if self._deferred:
                self._memory_calls.send_deferred()
            self._sync_one(writer, [op, *args], (op, user_call_site(2), keep, None))
        return box[0] if box else None

    def _sync_one(self, writer: BatchWriter, call: list[Any], meta: CallMeta) -> None:
        """Send everything queued plus ``call`` and wait for every reply (a sync point), the
        lock held. With nothing in flight it goes with the calls queued as one batch straight
        to its reply (``BatchWriter.call_alone``); otherwise, or when the link drops
        meanwhile, the general way: queued, sent, waited for, and when the agent parked the
        session, restored and sent again."""
        try:
            if writer.call_alone(call, meta):
                self.sync_points += 1
                if self._errors.first is not None or kernel_output.pending:
                    self._errors.raise_first()
                return
            writer.add(call[0], call[1:], meta[1], meta[2], meta[3], end_batch=True)
        except GPULostError as e:
            self._restore.parked_meanwhile(writer, e)
        self._wait_all(self._current_or_restored(writer))

    def _add(self, writer: BatchWriter, op: str, args: Any, site: CallSite | None,
             on_result: Callable[[Any], None] | None = None,
             on_error: Callable[[], None] | None = None, *, end_batch: bool = False) -> None:
        """Queue a call on ``writer``. When its link dropped because the agent parked the
        session, the call is kept and sent again after the restore (the next GPU call leases
        again), as a call queued before the drop is; ``writer`` is then no longer current."""
        try:
            writer.add(op, args, site, on_result, on_error, end_batch=end_batch)
        except GPULostError as e:
            self._restore.parked_meanwhile(writer, e)

    def _current_or_restored(self, writer: BatchWriter) -> BatchWriter:
        """``writer``, or the restored session's when the agent parked it under a send."""
        return writer if self._writer is writer else self._ensure_connected()

    def synchronize(self) -> None:
        self.call_sync("synchronize")

    def flush(self) -> None:
        """Send what is queued now, without waiting."""
        if self._writer is not None:
            self._writer.flush()

    def _wait_all(self, writer: BatchWriter) -> None:
        self.sync_points += 1
        self._restore.wait_everything(writer)
        self._errors.raise_first()

    def raise_deferred_error(self) -> None:
        """Raise (and clear) the first error recorded since the last sync point, if any; what
        kernels printed comes out first, as it would locally after a synchronize."""
        self._errors.raise_first()

    def _on_call_error(self, meta: CallMeta | None, error: dict[str, Any]) -> None:
        if error.get("kind") == "LeaseError" and self._writer is not None:
            # the agent parked us (lease expired or revoked) before these calls arrived: the
            # next call leases again and resumes; this connection is done
            self._parking.orphan_writer(None)
        self._errors.from_reply(meta, error)

    # }}}

    # {{{ memory

    def alloc(self, nbytes: int) -> int:
        """A device address for ``nbytes`` bytes, chosen here; mapped by the agent in order.
        A request larger than the free device memory last known waits for the agent, so that
        running out raises ``MemoryError`` here, as pycuda does."""
        return self._memory_calls.alloc(nbytes)

    def free(self, addr: int) -> None:
        """Release the allocation at ``addr`` (fire-and-forget)."""
        self._memory_calls.free(addr)

    def release_later(self, op: str, *args: Any) -> None:
        """For finalizers (any thread, even inside the lock's owner): queue ``op(*args)`` (e.g.
        ``free`` of an allocation, ``stream_destroy``) for the next call on a user thread."""
        self._memory_calls.release_later(op, *args)

    def mem_get_info(self) -> tuple[int, int]:
        return self._memory_calls.mem_get_info()

    # }}}

    # {{{ host<->device copies (HostCopies)

    def htod(self, dst: int, buffer: Any, stream: int | None = None, *,
             keep: bool = False) -> None:
        """Copy ``buffer`` to device address ``dst``: returning once it is sent (the buffer may
        then change); with ``keep``, at once (the buffer must stay unchanged until the copy
        executed, as for cuMemcpyHtoDAsync)."""
        self._copies.htod(dst, buffer, stream, keep=keep)

    def dtoh_into(self, dest: Any, src: int, stream: int | None = None, *,
                  wait: bool = True) -> None:
        """Copy ``len(dest)`` bytes from device address ``src`` into the writable buffer
        ``dest``. With ``wait`` this is a sync point; without, ``dest`` is filled when the
        replies arrive (at the latest by the next sync point)."""
        self._copies.dtoh_into(dest, src, stream, wait=wait)

    def _send_deferred(self) -> None:
        """Send what finalizers left for a user thread (``release_later``) first."""
        if self._deferred:
            self._memory_calls.send_deferred()

    # }}}

    def close(self) -> None:
        """End the session: queued calls are sent, the agent is told bye. Idempotent."""
        with self.lock:
            if self._closed:
                return
            self._closed = True
            writer, connection = self._writer, self._link.connection
            orphan, self._parking.orphan = self._parking.orphan, None
            if orphan is not None:
                self._link.retire(orphan.writer, orphan.connection)
        if writer is not None:
            writer.close()
            writer.connection.close()
        if connection is not None:
            connection.close(bye=True)
        self._link.close_stale()
        atexit.unregister(self.close)


def _has_large_buffer(args: tuple[Any, ...], positions: tuple[int, ...]) -> bool:
    for i in positions:
        value = args[i] if i < len(args) else None
        if value is None or type(value) is bytes:
            continue
        try:
            if memoryview(value).nbytes >= protocol.MAX_INLINE_BYTES:
                return True
        except TypeError:
            pass
    return False


# {{{ the process's session

_session: RemoteSession | None = None
_session_lock = threading.Lock()


def get_session() -> RemoteSession:
    """The process's session (a new one after the previous was lost or closed)."""
    session = _session
    if session is None or session.closed or session.lost:
        session = _new_session()
    return session


def _new_session() -> RemoteSession:
    global _session
    with _session_lock:
        session = _session
        if session is None or session.closed or session.lost:
            if session is not None and not session.closed:
                if session.lost and session._memory.allocator is not None:
                    lost_sessions.append(session.lost_reason.splitlines()[0])
                if session.lost and session._link.has_lease_source:
                    session.lease_source.lost(session.lost_reason)
                session.close()
            session = _session = RemoteSession()
        return session


def _forget_session_in_child() -> None:
    # A forked child must not use the parent's sockets; its first GPU call connects anew.
    global _session, _session_lock
    _session = None
    _session_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_session_in_child)


def reset_session() -> None:
    """Close the process's session (tests, deactivate); the next get_session() starts anew."""
    global _session
    with _session_lock:
        session, _session = _session, None
    if session is not None:
        session.close()
    reset_lease_source()


# }}}
