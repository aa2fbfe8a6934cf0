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
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from gpu_agent import protocol
from harp_jupyter.shim import hooks
from harp_jupyter.shim.allocator import AddressAllocator, AddressSpaceExhausted
from harp_jupyter.shim.batch import BUF_POSITIONS, BatchWriter, CallMeta, byte_view
from harp_jupyter.shim.callsite import user_call_site
from harp_jupyter.shim.endpoints import configured_endpoint
from harp_jupyter.shim.errors import (
    Error,
    GPULostError,
    HandleError,
    LeaseLostError,
    LogicError,
    MemoryError,
    ProtocolError,
    StateLostError,
    error_from_agent,
)
from harp_jupyter.shim.kernel_output import flush_kernel_output
from harp_jupyter.shim.lease import LeaseSource, get_lease_source, reset_lease_source
from harp_jupyter.shim.notice import WaitNotice, in_kernel
from harp_jupyter.shim.parked_calls import (
    CarryOver,
    Orphan,
    await_notice,
    carry_over,
    park_wait_from_env,
)
from harp_jupyter.shim.transport import AgentConnection

#: host<->device copies larger than this travel in chunks of this size, one message each, so
#: the agent copies chunk i while chunk i+1 is on the wire
TRANSFER_CHUNK_BYTES = 16 << 20

#: a synchronous host->device copy up to this size is snapshotted by a copy and returns at once;
#: a larger one goes zero-copy and returns when its data is on the wire
SNAPSHOT_COPY_BYTES = 4 << 20


#: how many times one connect leases again when its lease ended before its hello came
REGRANT_ATTEMPTS = 5

#: how long the lease source's word that the agent ended the lease waits for a user thread to
#: finish with the session (past it, the next call's LeaseError does the same)
LEASE_ENDED_LOCK_S = 5.0


class RemoteSession:
    """One session with one agent; see the module docstring."""

    def __init__(self, endpoint: str | None = None, *, token: str | None = None,
                 timeout: float | None = None, lease_source: LeaseSource | None = None) -> None:
        self._endpoint = endpoint
        self._lease_source = lease_source
        #: {session, resume_token, agent} once the agent welcomed us; kept while parked
        self._resume: dict[str, Any] | None = None
        #: writers and connections of earlier leases, closed at the next connect
        self._stale: list[tuple[BatchWriter, AgentConnection]] = []
        #: the id of the lease the current connection was opened with
        self._lease_id: str | None = None
        #: the writer of a session the agent parked by itself, settled at the next connect
        self._orphan: Orphan | None = None
        #: its calls to send again once restored (kept until a connect succeeds)
        self._carried: CarryOver | None = None
        #: how long to wait for the agent's word that it parked this session (HARP_PARK_WAIT)
        self.park_wait = park_wait_from_env()
        #: times this session was parked and restored, for tests and %harp status
        self.parks = 0
        self.restores = 0
        self._token = token
        self._timeout = timeout
        self.lock = threading.RLock()
        self._connection: AgentConnection | None = None
        self._writer: BatchWriter | None = None
        self._allocator: AddressAllocator | None = None
        self._welcome: dict[str, Any] = {}
        #: device_info read from the agents' status before the first lease
        self._device_facts: dict[str, Any] | None = None
        self._handles = itertools.count(1)
        self._first_error: Error | None = None
        self._later_errors = 0
        # (op, *args) of releases from finalizers, sent by the next call on a user thread
        self._deferred: deque[tuple[Any, ...]] = deque()
        self._free_estimate: int | None = None
        self._closed = False
        self._lost_error: Error | None = None
        #: times the user's code waited for the agent (sync points), for tests and profiles
        self.sync_points = 0

    # {{{ connection

    @property
    def endpoint(self) -> str:
        """The agent this session talks to now (or last did)."""
        if self._resume is not None:
            return str(self._resume["agent"])
        if self._endpoint is None:
            self._endpoint = configured_endpoint()
        return self._endpoint

    @property
    def lease_source(self) -> LeaseSource:
        if self._lease_source is None:
            self._lease_source = get_lease_source(self._endpoint)
            self._lease_source.holder = self
        return self._lease_source

    @property
    def parked(self) -> bool:
        """Connected before, and now without a GPU until the next GPU call restores it."""
        return self._writer is None and self._resume is not None

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
        """Lease a GPU and open (or restore) the session on its agent."""
        self._settle_orphan()
        self._close_stale()
        source = self.lease_source
        notice = WaitNotice()
        asked = time.monotonic_ns()
        refused: str | None = None
        for attempt in itertools.count(1):
            grant = source.acquire(self._resume, notice, refused)
            granted = time.monotonic_ns()
            resume = None
            if self._resume is not None:
                resume = {"session": self._resume["session"],
                          "resume_token": self._resume["resume_token"]}
                origin = grant.moved_from or self._resume["agent"]
                if origin != grant.agent:
                    resume["from"] = origin
                    notice.update("restoring", agent=grant.agent)
            connection = AgentConnection(grant.agent, token=self._token, timeout=self._timeout)
            try:
                welcome = connection.hello(
                    lease=grant.lease, resume=resume, address_range=None
                    if self._allocator is None else (self._allocator.base, self._allocator.size))
                break
            except LeaseLostError:
                # granted, then ended (reclaimed, expired) before this hello under load: queue
                # again, as if it had never been granted
                connection.close()
                if attempt >= REGRANT_ATTEMPTS:
                    raise
                refused = grant.lease[0]
            except Error as e:
                connection.close()
                if isinstance(e, StateLostError | GPULostError):
                    self._lost_error = e  # the state is gone: the next GPU call starts afresh
                raise
        data: AgentConnection | None = None
        try:
            base, size = welcome["range"]
            device = welcome.get("device") or {}
            data = AgentConnection(worker_endpoint(str(welcome["worker"]), grant.agent),
                                   token=self._token, timeout=self._timeout, label=grant.agent)
            data.attach(welcome["session"], str(welcome["attach"]))
        except Error as e:
            connection.close()
            if data is not None:
                data.close()
            if isinstance(e, StateLostError | GPULostError):
                # the state is gone: say so now; the next GPU call starts afresh
                self._lost_error = e
            raise
        except (KeyError, TypeError, ValueError) as e:
            connection.close()
            if data is not None:
                data.close()
            raise ProtocolError(f"malformed welcome from {grant.agent}: {e!r}") from None
        if self._allocator is None:
            self._allocator = AddressAllocator(base, size)
        elif (base, size) != (self._allocator.base, self._allocator.size):
            connection.close()
            data.close()
            raise ProtocolError(f"the agent restored this session at {base:#x}, not at "
                                f"{self._allocator.base:#x}: device pointers would be wrong")
        else:
            self.restores += 1
        hooks.note_lease_span("acquire", asked, granted, agent=grant.agent)
        hooks.note_lease_span("restore" if resume else "hello", granted, time.monotonic_ns(),
                              agent=grant.agent, moved_from=(resume or {}).get("from"))
        self._connection = connection
        self._lease_id = grant.lease[0]
        self._welcome = welcome
        self._resume = {"session": welcome["session"], "resume_token": welcome["resume_token"],
                        "agent": grant.agent}
        self._free_estimate = device.get("total_memory")
        self._writer = BatchWriter(data, self._on_call_error, lock=self.lock)
        self._send_carried(self._writer)
        # learn the real free memory with the first reply, at no extra round trip
        self._writer.add("mem_get_info", [], None, self._note_mem_info)
        atexit.register(self.close)

    def park(self, reason: str = "release") -> dict[str, Any] | None:
        """Give the GPU back, keeping the device state: what is queued is sent, every reply is
        awaited (work in flight finishes), then the agent moves this session's device memory to
        its host memory. None (nothing done) when a user thread is using the session now."""
        if not self.lock.acquire(blocking=reason == "release"):
            return None
        try:
            writer, connection = self._writer, self._connection
            if writer is None or connection is None or self._resume is None:
                if self._orphan is not None:  # the agent parked it first: already done
                    return self._parked_already(self._orphan.notice)
                return {"session": None, "agent": None, "bytes": 0}
            parking = time.monotonic_ns()
            try:
                writer.drain()
            except GPULostError as e:  # its worker is gone: parked by the agent, or lost
                error = self._explain_loss(e)
                if error is not None:
                    raise error from None
                return self._parked_already(self._orphan.notice if self._orphan else None)
            writer.close()
            writer.connection.close()
            try:
                connection.send({"t": protocol.PARK, "rid": 1, "token": connection.token})
                while True:
                    reply, _ = connection.recv()
                    if reply.get("t") in (protocol.PARKED, protocol.ERROR, protocol.LOST):
                        break
            except GPULostError as e:
                self._lost_error = e
                raise
            if reply.get("t") != protocol.PARKED:
                # the agent parked it first (a reclaim, the lease's end): its notice says so,
                # or the session's loss with its reason
                notice = reply if reply.get("t") == protocol.LOST else await_notice(
                    connection, str(self._resume["session"]), self.park_wait)
                if notice is not None and notice.get("parked"):
                    self._orphan_writer(notice)
                    return self._parked_already(notice)
                error = (notice or reply).get("e")
                error = error if isinstance(error, dict) else {}
                if notice is not None:
                    self._lost_error = GPULostError(str(error.get("msg") or "lost"))
                raise error_from_agent(error, op="park")
            self._writer = self._connection = None
            connection.close()
            self.parks += 1
            hooks.note_lease_span(f"park ({reason})", parking, time.monotonic_ns(),
                                  agent=self._resume["agent"], bytes=int(reply.get("bytes") or 0))
            return {"session": self._resume["session"], "agent": self._resume["agent"],
                    "bytes": int(reply.get("bytes") or 0)}
        finally:
            self.lock.release()

    def _parked_already(self, notice: dict[str, Any] | None) -> dict[str, Any]:
        """What a park answers when the agent had parked the session by itself first (a
        reclaim or the lease's end raced it): a success, marked ``already``."""
        resume = self._resume or {}
        return {"session": resume.get("session"), "agent": resume.get("agent"),
                "bytes": int((notice or {}).get("bytes") or 0), "already": True}

    def attached_under(self, lease_id: str | None) -> bool:
        """Whether this session attached to its agent under the lease ``lease_id`` (a lease
        that ended before the hello never had it; None: the lease is not named)."""
        return self._lease_id is not None and lease_id in (None, self._lease_id)

    def lease_ended(self, lease_id: str | None = None) -> None:
        """The lease source, when the agent ended this session's lease and parked the session
        itself (reclaimed for a waiting kernel, expired): the connection is done, and the next
        GPU call leases again, restores, and first sends again what the worker did not run
        (``parked_calls``), instead of sending to a worker that is gone."""
        if not self.lock.acquire(timeout=LEASE_ENDED_LOCK_S):
            return
        try:
            if lease_id is None or lease_id == self._lease_id:  # not a newer lease's session
                self._orphan_writer(None)
        finally:
            self.lock.release()

    def _orphan_writer(self, notice: dict[str, Any] | None) -> None:
        """The agent parked this session by itself (lock held): keep its writer for the next
        connect to settle, with the agent's notice once read."""
        writer, connection, resume = self._writer, self._connection, self._resume
        if writer is None or connection is None or resume is None:
            return
        self._orphan = Orphan(writer, connection, str(resume["session"]), notice)
        self._writer = self._connection = None

    def _settle_orphan(self) -> None:
        """Before leasing again: wait for the agent's word on the parked session (it may still
        be parking: a restore must not race it) and sort its unanswered calls."""
        orphan, self._orphan = self._orphan, None
        if orphan is None:
            return
        self._stale.append((orphan.writer, orphan.connection))
        carried = carry_over(orphan, self.park_wait)
        if self._carried is None:
            self._carried = carried
        else:  # a connect failed in between: the older calls go first
            self._carried.resend.extend(carried.resend)
            self._carried.dropped.extend(carried.dropped)
            self._carried.error = self._carried.error or carried.error

    def _send_carried(self, writer: BatchWriter) -> None:
        carried, self._carried = self._carried, None
        if carried is None:
            return
        for batch in carried.resend:
            writer.resend(batch)
        for meta in carried.dropped:
            if meta[3] is not None:
                meta[3]()  # e.g. an allocation that did not run: its addresses are free
        if carried.error is not None:
            if self._first_error is None:
                self._first_error = carried.error
            else:
                self._later_errors += 1

    def allocated_bytes(self) -> int:
        """The bytes the user's live allocations asked for (%harp status, the sidebar)."""
        allocator = self._allocator
        return allocator.requested_bytes if allocator is not None else 0

    def release(self) -> dict[str, Any]:
        """``%harp release``: park now and give the lease back."""
        info = self.park("release") or {"session": None, "agent": None, "bytes": 0}
        self.lease_source.parked(info)
        return info

    def _close_stale(self) -> None:
        stale, self._stale = self._stale, []
        for writer, connection in stale:
            writer.close()
            writer.connection.close()
            connection.close()

    def _explain_loss(self, error: GPULostError) -> Error | None:
        """Why the worker connection dropped, as the agent tells this session's control
        connection: parked by the agent (None: the writer is orphaned, and the next connect
        sends its unanswered calls again), or lost with its reason (returned, to raise). Its
        word is awaited as an event, up to the agent timeout (HARP_AGENT_TIMEOUT: a worker
        that froze gets no word at all); once the agent is known to have ended the lease, the
        next connect waits up to ``park_wait`` for the park itself."""
        connection, resume = self._connection, self._resume
        notice = None
        if connection is not None and resume is not None:
            notice = await_notice(connection, str(resume["session"]),
                                  min(connection.timeout, self.park_wait))
        if notice is None:
            self._lost_error = error
            return error
        agent_error = notice.get("e") if isinstance(notice.get("e"), dict) else {}
        if notice.get("parked") and self._writer is not None:
            self._orphan_writer(notice)
            return None
        lost = GPULostError(str(agent_error.get("msg") or error))
        self._lost_error = lost
        return lost

    def _wait_everything(self, writer: BatchWriter) -> None:
        """Send what is queued and wait for every reply. When the agent parked the session
        meanwhile, lease again, restore, send the calls it did not run, and wait for those."""
        while True:
            try:
                writer.wait_for(writer.flush())
                return
            except GPULostError as e:
                if self._writer is not writer:
                    raise  # not this session's current connection: nothing to explain
                error = self._explain_loss(e)
                if error is not None:
                    raise error from None
            writer = self._ensure_connected()

    @property
    def welcome(self) -> dict[str, Any]:
        self._ensure_connected()
        return self._welcome

    @property
    def device(self) -> dict[str, Any]:
        """device_info (name, compute_capability, attributes, ...): from the agent's welcome
        when connected; before that from the agents' status, so that a device query does not
        lease a GPU (nor wait in a queue for one). Leases when no agent answers the question."""
        if self._writer is None:
            if self._welcome:  # parked: the GPU it last had
                return self._welcome.get("device") or {}
            if self._device_facts is None:
                self._device_facts = self.lease_source.device_facts(self._resume)
            if self._device_facts is not None:
                return self._device_facts
        return self.welcome.get("device") or {}

    @property
    def emulated(self) -> bool:
        """Whether the agent's executor is the emulated one (host memory, no CUDA)."""
        device = self.device
        if "emulated" in device:
            return bool(device["emulated"])
        return self._welcome.get("executor") == "emulated"

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
        if self._lost_error is not None:
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
                self._explain_loss(fatal or GPULostError(writer.connection.lost_message()))
        return self._lost_error is not None

    @property
    def lost_reason(self) -> str:
        if self._lost_error is not None:
            return str(self._lost_error)
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
        if self._lost_error is not None:
            raise GPULostError(str(self._lost_error))

    # }}}

    # {{{ calls

    def new_handle(self) -> int:
        return next(self._handles)

    def call(self, op: str, *args: Any) -> None:
        """Queue a call; returns at once. A large buffer argument is sent before returning."""
        writer = self._ensure_connected()
        if self._deferred:
            self._send_deferred()
        positions = BUF_POSITIONS.get(op)
        if positions is not None and _has_large_buffer(args, positions):
            tracker = writer.add(op, args, user_call_site(2), track=True)
            if tracker is not None:
                writer.wait_sent([tracker])
        else:
            writer.add(op, args, user_call_site(2))

    def call_async_buffer(self, op: str, *args: Any) -> None:
        """Like ``call``, but a large buffer argument is neither copied nor waited for: it is
        kept alive until sent, and must not change before the call executes (``*_async``)."""
        writer = self._ensure_connected()
        if self._deferred:
            self._send_deferred()
        writer.add(op, args, user_call_site(2))

    def call_later(self, op: str, *args: Any, on_result: Callable[[Any], None]) -> None:
        """Queue a call whose value is passed to ``on_result`` when its reply arrives (with the
        session lock held, possibly on the background thread: keep it short). Not called if
        the call fails; the error is raised at the next sync point."""
        writer = self._ensure_connected()
        if self._deferred:
            self._send_deferred()
        writer.add(op, args, user_call_site(2), on_result)

    def call_sync(self, op: str, *args: Any) -> Any:
        """Send everything queued plus this call, wait for its value, raise the first deferred
        error (of any earlier call, or of this one)."""
        writer = self._ensure_connected()
        box: list[Any] = []
        with self.lock:
            if self._deferred:
                self._send_deferred()
            writer.add(op, args, user_call_site(2), box.append, end_batch=True)
            self._wait_all(writer)
        return box[0] if box else None

    def synchronize(self) -> None:
        self.call_sync("synchronize")

    def flush(self) -> None:
        """Send what is queued now, without waiting."""
        if self._writer is not None:
            self._writer.flush()

    def _wait_all(self, writer: BatchWriter) -> None:
        self.sync_points += 1
        self._wait_everything(writer)
        self.raise_deferred_error()

    def raise_deferred_error(self) -> None:
        """Raise (and clear) the first error recorded since the last sync point, if any; what
        kernels printed comes out first, as it would locally after a synchronize."""
        flush_kernel_output()
        with self.lock:
            error, self._first_error = self._first_error, None
            later, self._later_errors = self._later_errors, 0
        if error is not None:
            if later:
                error.args = (f"{error.args[0]}\n  ({later} later error{'s' if later > 1 else ''}"
                              " before this sync point not shown)",)
            raise error

    def _on_call_error(self, meta: CallMeta | None, error: dict[str, Any]) -> None:
        if error.get("kind") == "LeaseError" and self._writer is not None:
            # the agent parked us (lease expired or revoked) before these calls arrived: the
            # next call leases again and resumes; this connection is done
            self._orphan_writer(None)
        if self._first_error is None:
            op, site = (meta[0], meta[1]) if meta is not None else (None, None)
            self._first_error = error_from_agent(error, op, site)
            if error.get("kind") == "ContextLost":
                # the worker ends with its context: the next GPU call starts a fresh session
                self._lost_error = self._first_error
            if error.get("kind") == "HandleError" and _lost_sessions:
                who, again = (("kernel", "re-run the cells that create them") if in_kernel()
                              else ("program", "create them again"))
                self._first_error.args = (
                    f"{self._first_error.args[0]}\n  This {who} lost an earlier GPU session "
                    f"({_lost_sessions[-1]}); device arrays and pointers made before that are "
                    f"gone: {again}.",)
        else:
            self._later_errors += 1

    # }}}

    # {{{ memory

    def alloc(self, nbytes: int) -> int:
        """A device address for ``nbytes`` bytes, chosen here; mapped by the agent in order.
        A request larger than the free device memory last known waits for the agent, so that
        running out raises ``MemoryError`` here, as pycuda does."""
        nbytes = int(nbytes)
        if nbytes <= 0:
            raise LogicError("cuMemAlloc failed: invalid argument (size must be positive)")
        writer = self._ensure_connected()
        site = user_call_site(2)
        with self.lock:
            if self._deferred:
                self._send_deferred()
            allocator = self._allocator
            assert allocator is not None
            if nbytes >= allocator.granularity:
                for chunk, size in allocator.release_spare():
                    writer.add("free", [chunk], site)
                    self._note_unmapped(size)
            try:
                addr, chunks = allocator.allocate(nbytes)
            except AddressSpaceExhausted as e:
                raise MemoryError(f"cuMemAlloc failed: out of memory ({e})") from None
            must_wait = False
            failed: list[int] = []
            for chunk_addr, size in chunks:
                estimate = self._free_estimate
                if estimate is not None:
                    must_wait = must_wait or size > estimate
                    self._free_estimate = estimate - size
                writer.add("alloc", [chunk_addr, size], site, None,
                           _chunk_failed(allocator, chunk_addr, failed))
            if must_wait:
                self._wait_for_alloc(writer, addr, failed)
        return addr

    def _wait_for_alloc(self, writer: BatchWriter, addr: int, failed: list[int]) -> None:
        self._wait_everything(writer)
        if self._first_error is not None:
            if not failed:  # this allocation worked; an earlier call's error is raised
                self.free(addr)
            self.raise_deferred_error()

    def free(self, addr: int) -> None:
        """Release the allocation at ``addr`` (fire-and-forget)."""
        writer = self._writer
        if writer is None or self._closed or self._lost_error is not None:
            return  # nothing mapped, or the session is gone with its memory
        if writer.fatal is not None or writer.connection.lost:
            # its worker is gone (parked by the agent, or lost): the next call decides
            self._deferred.append(("free", int(addr)))
            return
        with self.lock:
            allocator = self._allocator
            assert allocator is not None
            try:
                chunks = allocator.release(int(addr))
            except ValueError:
                raise HandleError(f"cuMemFree failed: no allocation at {int(addr):#x}") from None
            site = user_call_site(2)
            for chunk, size in chunks:
                self._writer.add("free", [chunk], site)
                self._note_unmapped(size)

    def _note_unmapped(self, size: int) -> None:
        if self._free_estimate is not None:
            self._free_estimate += size

    def release_later(self, op: str, *args: Any) -> None:
        """For finalizers (any thread, even inside the lock's owner): queue ``op(*args)`` (e.g.
        ``free`` of an allocation, ``stream_destroy``) for the next call on a user thread."""
        if not self._closed and self._lost_error is None:
            self._deferred.append((op, *args))

    def _send_deferred(self) -> None:
        with self.lock:
            while self._deferred:
                op, *args = self._deferred.popleft()
                if op == "free":
                    if self._allocator is not None and self._allocator.owns(args[0]):
                        self.free(args[0])
                elif self._writer is not None:
                    self._writer.add(op, args, None)

    def mem_get_info(self) -> tuple[int, int]:
        free, total = self.call_sync("mem_get_info")
        self._free_estimate = int(free)
        return int(free), int(total)

    def _note_mem_info(self, value: Any) -> None:
        try:
            self._free_estimate = int(value[0])
        except (TypeError, ValueError, IndexError):
            pass

    # }}}

    # {{{ bulk copies

    def htod(self, dst: int, buffer: Any, stream: int | None = None, *,
             keep: bool = False) -> None:
        """Copy ``buffer`` to device address ``dst``. Large buffers go zero-copy in chunks; the
        call returns once they are sent (the buffer may then change), or at once with ``keep``
        (the buffer must stay unchanged until the copy executed, as for cuMemcpyHtoDAsync)."""
        view = byte_view(buffer)
        nbytes = view.nbytes
        if nbytes == 0:
            return
        writer = self._ensure_connected()
        if self._deferred:
            self._send_deferred()
        site = user_call_site(2)
        if nbytes <= SNAPSHOT_COPY_BYTES and not keep:
            # copying is cheaper than waiting until ZeroMQ has sent the caller's buffer
            writer.add("htod", [int(dst), view.tobytes(), stream], site)
            return
        trackers = []
        for offset in range(0, nbytes, TRANSFER_CHUNK_BYTES):
            chunk = view[offset:offset + TRANSFER_CHUNK_BYTES]
            tracker = writer.add("htod", [int(dst) + offset, chunk, stream], site,
                                 track=not keep, end_batch=True)
            if tracker is not None:
                trackers.append(tracker)
        if trackers:
            writer.wait_sent(trackers)

    def dtoh_into(self, dest: Any, src: int, stream: int | None = None, *,
                  wait: bool = True) -> None:
        """Copy ``len(dest)`` bytes from device address ``src`` into the writable buffer
        ``dest``. With ``wait`` this is a sync point; without, ``dest`` is filled when the
        replies arrive (at the latest by the next sync point)."""
        view = byte_view(dest)
        if view.readonly:
            raise TypeError("the destination buffer is read-only")
        nbytes = view.nbytes
        writer = self._ensure_connected()
        site = user_call_site(2)
        with self.lock:
            if self._deferred:
                self._send_deferred()
            for offset in range(0, nbytes, TRANSFER_CHUNK_BYTES):
                size = min(TRANSFER_CHUNK_BYTES, nbytes - offset)
                writer.add("dtoh", [int(src) + offset, size, stream], site,
                           _copy_into(view[offset:offset + size]),
                           end_batch=wait or nbytes > TRANSFER_CHUNK_BYTES)
            if wait:
                self._wait_all(writer)

    # }}}

    def close(self) -> None:
        """End the session: queued calls are sent, the agent is told bye. Idempotent."""
        with self.lock:
            if self._closed:
                return
            self._closed = True
            writer, connection = self._writer, self._connection
            orphan, self._orphan = self._orphan, None
            if orphan is not None:
                self._stale.append((orphan.writer, orphan.connection))
        if writer is not None:
            writer.close()
            writer.connection.close()
        if connection is not None:
            connection.close(bye=True)
        self._close_stale()
        atexit.unregister(self.close)


def worker_endpoint(advertised: str, agent: str) -> str:
    """The worker's endpoint as this machine reaches it: a worker bound on every interface
    (``tcp://0.0.0.0:PORT``) is at the host this client reached the agent at."""
    scheme, _, rest = advertised.partition("://")
    host, _, port = rest.rpartition(":")
    if host in ("0.0.0.0", "*", "::", "[::]", ""):
        agent_host = agent.partition("://")[2].rpartition(":")[0]
        return f"{scheme}://{agent_host}:{port}"
    return advertised


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


def _copy_into(target: memoryview) -> Callable[[Any], None]:
    def copy(value: Any) -> None:
        source = byte_view(value)
        if source.nbytes != target.nbytes:
            raise ProtocolError(f"dtoh returned {source.nbytes} bytes, expected {target.nbytes}")
        target[:] = source

    return copy


def _chunk_failed(allocator: AddressAllocator, chunk_addr: int,
                  failed: list[int]) -> Callable[[], None]:
    def forget() -> None:
        allocator.forget_chunk(chunk_addr)
        failed.append(chunk_addr)

    return forget


# {{{ the process's session

_session: RemoteSession | None = None
_session_lock = threading.Lock()


#: why earlier sessions of this process were lost (their arrays are gone), newest last
_lost_sessions: list[str] = []


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
                if session.lost and session._allocator is not None:
                    _lost_sessions.append(session.lost_reason.splitlines()[0])
                if session.lost and session._lease_source is not None:
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
