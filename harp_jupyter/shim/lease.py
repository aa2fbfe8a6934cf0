"""Where the shim gets its lease: the kernel's provisioner, or (no provisioner) the agents directly.

``LeaseSource.acquire`` blocks until a GPU is granted and returns a ``Grant``: the agent to talk
to and the lease to present in hello. The session calls it at its first GPU call and again after
each park. The session attaches itself as the source's ``holder`` (``LeaseHolder``): the source
asks it to park, tells it when the agent ended its lease, and asks how many bytes it allocated.
Two sources, one lease keeper (``provisioner.keeper.LeaseKeeper``) behind both:

* ``ControlLeaseSource`` (a kernel started by ElasticGPUProvisioner: ``HARP_CONTROL`` is set): asks
  the provisioner over the control socket (docs/leases-design.md). The provisioner's keeper holds
  and renews the lease and applies the idle policy; it may ask this kernel to park.
* ``DirectLeaseSource`` (``harp run``, plain scripts, tests): runs the keeper in this process, on
  the background loop of ``provisioner.background``: the same queueing, moves between agents,
  acquire timeout and reclaim by the agent; no idle release unless ``%harp idle`` sets one;
  released at exit.
"""

from __future__ import annotations

import asyncio
import atexit
import getpass
import itertools
import os
import queue
import secrets
import socket as pysocket
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import zmq

from gpu_agent import protocol
from harp_jupyter.shim import notice as notes
from harp_jupyter.shim.endpoints import configured_agents
from harp_jupyter.shim.errors import GPUUnavailableError
from harp_jupyter.shim.notice import WaitNotice
from harp_jupyter.shim.transport import timeout_from_env
from provisioner import background
from provisioner.control import ControlError
from provisioner.keeper import LeaseKeeper
from provisioner.keeper_config import KeeperConfig
from provisioner.lease_client import LeaseClient
from provisioner.lease_record import ParkReason


class LeaseHolder(Protocol):
    """What a lease source asks of the session it leases for (RemoteSession)."""

    def park(self, reason: str = "release") -> dict[str, Any] | None:
        """{"session", "agent", "bytes"} once parked; None when a user thread is busy."""

    def lease_ended(self, lease_id: str | None = None) -> None:
        """The agent ended the lease (``lease_id``, when known) and parked the session itself:
        forget the connection."""

    def allocated_bytes(self) -> int:
        """The bytes the user's live allocations asked for."""

    def attached_under(self, lease_id: str | None) -> bool:
        """Whether the session is (or was last) attached under the lease ``lease_id``."""


#: seconds without any word from the provisioner after which a control request is sent again
_RESEND_AFTER = 1.0
#: how long a finished profile may take to reach the sidebar before it is given up
SHARE_PROFILE_TIMEOUT_S = 3.0
#: how long a direct source's exit may take to release and drop its parked state
CLOSE_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Grant:
    agent: str
    lease: tuple[str, str]  # (lease_id, lease_token)
    #: the agent that holds this kernel's parked state, when it is not ``agent``; ``agent``
    #: itself when the keeper knows the state is gone (the resume then fetches from nowhere)
    moved_from: str | None = None
    #: why the keeper knows the parked state is gone (its agent drained and no other took it)
    state_lost: str | None = None


class LeaseSource(ABC):
    #: the session leasing through this source (set by the session when it first uses it)
    holder: LeaseHolder | None = None

    @abstractmethod
    def acquire(self, resume: dict[str, Any] | None, notice: WaitNotice,
                refused: str | None = None) -> Grant:
        """Block until a GPU is granted. ``resume`` = {session, resume_token, agent} of the
        parked session, if any (the source prefers that agent). ``refused``: the id of the
        lease the last grant gave, which the agent refused at hello (it ended before the
        session attached): never granted again."""

    @abstractmethod
    def parked(self, info: dict[str, Any]) -> None:
        """The session parked on its own initiative (``%harp release``): release the lease."""

    @abstractmethod
    def lost(self, reason: str) -> None:
        """The agent died under the session: forget the lease."""

    @abstractmethod
    def status(self) -> dict[str, Any]:
        """The lease state dict (docs/leases-design.md)."""

    @abstractmethod
    def set_idle(self, seconds: float) -> None:
        """``%harp idle``: release the GPU after this many seconds without GPU work."""

    def device_facts(self, resume: dict[str, Any] | None) -> dict[str, Any] | None:
        """The device_info of the agent the next acquire would most likely get, from the
        agents' status, without leasing (``Device(0).name()`` must not wait in a queue); None
        when no agent answers (the caller then leases, which says what is wrong)."""
        return None

    def share_profile(self, profile: dict[str, Any]) -> bool:
        """Hand the latest ``%%harp profile`` to whoever shows it (the lab's sidebar, through
        the provisioner); False when there is nobody."""
        return False

    def close(self) -> None:  # noqa: B027 - optional hook
        pass


def _grant(grant: dict[str, Any]) -> Grant:
    """The keeper's grant; what it had to say with it (the parked state went with a drained
    agent) is said now."""
    note = grant.get("note")
    if isinstance(note, str) and note:
        notes.say(note[:1].upper() + note[1:] + ".")
    lease = grant["lease"]
    lost = grant.get("state_lost")
    return Grant(str(grant["agent"]), (str(lease[0]), str(lease[1])), grant.get("from"),
                 lost if isinstance(lost, str) and lost else None)


# {{{ the provisioner's control socket


class ControlLeaseSource(LeaseSource):
    """Talks to the kernel's provisioner; one background thread owns the socket."""

    def __init__(self, endpoint: str, key: str, *, timeout: float = 10.0) -> None:
        self.endpoint = endpoint
        self._key = key
        self._timeout = timeout
        self._context = zmq.Context()
        self._wake_address = f"inproc://harp-control-{id(self)}"
        self._waiters: dict[int, queue.SimpleQueue[dict[str, Any]]] = {}
        self._rids = itertools.count(1)
        self._local = threading.local()
        self._closed = False
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="harp-control",
                                        daemon=True)
        self._thread.start()
        ready.wait(5)

    # {{{ background thread: the only user of the DEALER

    def _run(self, ready: threading.Event) -> None:
        dealer = self._context.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(self.endpoint)
        wake = self._context.socket(zmq.PULL)
        wake.bind(self._wake_address)
        ready.set()
        poller = zmq.Poller()
        poller.register(dealer, zmq.POLLIN)
        poller.register(wake, zmq.POLLIN)
        try:
            while not self._closed:
                events = dict(poller.poll(500))
                if wake in events:
                    while wake.poll(0):
                        message = wake.recv()
                        if message == b"":
                            return
                        dealer.send(message)
                if dealer in events:
                    while dealer.poll(0):
                        self._dispatch(dealer, dealer.recv_multipart())
        finally:
            dealer.close(0)
            wake.close(0)

    def _dispatch(self, dealer: zmq.Socket, parts: list[bytes]) -> None:
        try:
            header = protocol.unpack_header(parts[0])
        except protocol.ProtocolError:
            return
        kind = header.get("t")
        if kind == "park":
            dealer.send(protocol.pack_header(self._park_reply(header)))
            return
        if kind == "memory":
            holder = self.holder
            dealer.send(protocol.pack_header({
                "t": "memory", "rid": header.get("rid"), "key": self._key,
                "allocated": holder.allocated_bytes() if holder is not None else 0}))
            return
        if kind == "lease_ended":
            lease = header.get("lease")
            _lease_ended(self.holder, str(header.get("reason") or ""),
                         lease if isinstance(lease, str) else None)
            return
        waiter = self._waiters.get(header.get("rid"))  # type: ignore[arg-type]
        if waiter is not None:
            waiter.put(header)

    def _park_reply(self, header: dict[str, Any]) -> dict[str, Any]:
        holder = self.holder
        rid = header.get("rid")
        try:
            info = holder.park(str(header.get("reason", "idle"))) if holder else {
                "session": None, "agent": None, "bytes": 0}
        except Exception as e:  # the provisioner must hear back whatever happened
            return {"t": "busy", "rid": rid, "key": self._key, "error": repr(e)}
        if info is None:
            return {"t": "busy", "rid": rid, "key": self._key}
        return {"t": "parked", "rid": rid, "key": self._key, **info}

    # }}}

    def _send(self, header: dict[str, Any]) -> None:
        push = getattr(self._local, "push", None)
        if push is None:
            push = self._local.push = self._context.socket(zmq.PUSH)
            push.setsockopt(zmq.LINGER, 1000)
            push.connect(self._wake_address)
        push.send(protocol.pack_header({**header, "key": self._key}))

    def _request(self, header: dict[str, Any], timeout: float | None = None,
                 on_progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        rid = next(self._rids)
        waiter: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
        self._waiters[rid] = waiter
        message = {**header, "rid": rid}
        try:
            self._send(message)
            limit = self._timeout if timeout is None else timeout
            deadline = time.monotonic() + limit
            heard = False
            while True:
                left = max(0.0, deadline - time.monotonic())
                try:
                    # Until the provisioner has said anything about this request, resend it now
                    # and then: ZeroMQ drops a message sent while a restarted server is being
                    # reconnected to. The server answers each (sender, rid) once.
                    reply = waiter.get(timeout=left if heard else min(left, _RESEND_AFTER))
                except queue.Empty:
                    if time.monotonic() < deadline:
                        self._send(message)
                        continue
                    raise GPUUnavailableError(
                        f"the Jupyter server that manages this kernel did not answer within "
                        f"{limit:g} s ({self.endpoint}); if it was restarted or stopped, restart "
                        "this kernel from JupyterLab to get a GPU again") from None
                heard = True
                if reply.get("t") == "acquire_progress" and on_progress is not None:
                    on_progress(reply)
                    continue
                if reply.get("t") == "error":
                    error = reply.get("e") if isinstance(reply.get("e"), dict) else {}
                    raise GPUUnavailableError(str(error.get("msg") or reply.get("e")))
                return reply
        finally:
            self._waiters.pop(rid, None)

    def acquire(self, resume: dict[str, Any] | None, notice: WaitNotice,
                refused: str | None = None) -> Grant:
        def progress(message: dict[str, Any]) -> None:
            notice.update(str(message.get("state")), message.get("position"),
                          message.get("agent"))

        wait = float(os.environ.get("HARP_ACQUIRE_TIMEOUT") or 86400) + self._timeout
        reply = self._request({"t": "acquire", "resume": resume, "refused": refused}, wait,
                              progress)
        lease = reply.get("lease")
        if reply.get("t") != "grant" or not (isinstance(lease, list) and len(lease) == 2):
            raise GPUUnavailableError(f"unexpected answer to acquire: {reply.get('t')!r}")
        notice.done(str(reply["agent"]))
        return _grant(reply)

    def parked(self, info: dict[str, Any]) -> None:
        self._request({"t": "parked", **info})

    def lost(self, reason: str) -> None:
        try:
            self._request({"t": "lost", "reason": reason})
        except GPUUnavailableError:
            pass

    def status(self) -> dict[str, Any]:
        reply = self._request({"t": "status"})
        return {k: v for k, v in reply.items() if k not in ("t", "rid", "key")}

    def set_idle(self, seconds: float) -> None:
        self._request({"t": "set_idle", "seconds": float(seconds)})

    def device_facts(self, resume: dict[str, Any] | None) -> dict[str, Any] | None:
        try:
            reply = self._request({"t": "device", "resume": resume})
        except GPUUnavailableError:
            return None
        device = reply.get("device")
        return device if isinstance(device, dict) else None

    def share_profile(self, profile: dict[str, Any]) -> bool:
        try:
            # a nicety after the cell has shown its profile: never keep the user waiting long
            self._request({"t": "profile", "profile": profile}, timeout=SHARE_PROFILE_TIMEOUT_S)
        except GPUUnavailableError:
            return False
        return True

    def close(self) -> None:
        if self._closed:
            return
        try:
            self._send({"t": "bye"})
            push = getattr(self._local, "push", None)
            if push is not None:
                push.send(b"")
        except zmq.ZMQError:
            pass
        self._closed = True
        self._thread.join(2)
        self._context.destroy(0)


# }}}

# {{{ no provisioner: the keeper runs in this process


class DirectLeaseSource(LeaseSource):
    """Holds a lease on one of ``endpoints`` with the one lease keeper, run on the process's
    background loop; blocking calls from user threads wait for it there.

    Used where no provisioner exists (``harp run``, scripts, tests). The agent reclaims it when
    idle while someone waits, like any kernel (``HARP_RECLAIM_AFTER``); ``%harp release`` and
    exit release it; no idle release unless ``%harp idle`` sets one."""

    def __init__(self, endpoints: list[str], *, token: str | None = None) -> None:
        self.endpoints = endpoints
        self.kernel_id = os.environ.get("HARP_KERNEL_ID") or f"{pysocket.gethostname()}:" \
            f"{os.getpid()}:{secrets.token_hex(3)}"
        self._client = LeaseClient(token=token if token is not None else
                                   os.environ.get("HARP_TOKEN"), on_push=self._on_push)
        self.keeper = LeaseKeeper(_direct_config(self.kernel_id), self._client, self._agents,
                                  self)
        self._closed = False
        atexit.register(self.close)

    # {{{ the keeper's KernelLink (on the background loop)

    async def ask_park(self, reason: ParkReason) -> dict[str, Any]:
        holder = self.holder
        if holder is None:
            return {"t": "parked", "session": None, "agent": None, "bytes": 0}
        info = await asyncio.to_thread(holder.park, str(reason))
        return {"t": "busy"} if info is None else {"t": "parked", **info}

    def lease_ended(self, reason: ParkReason, message: str, lease_id: str) -> None:
        _lease_ended(self.holder, str(reason), lease_id)

    async def _agents(self) -> list[str]:
        return list(self.endpoints)

    def _on_push(self, endpoint: str, lease: dict[str, Any]) -> None:
        self.keeper.on_push(endpoint, lease)

    # }}}

    def acquire(self, resume: dict[str, Any] | None, notice: WaitNotice,
                refused: str | None = None) -> Grant:
        # the keeper's progress arrives on the background loop; the notice is shown from the
        # caller's thread, where the cell's output goes
        updates: queue.SimpleQueue[dict[str, Any] | None] = queue.SimpleQueue()

        async def progress(message: dict[str, Any]) -> None:
            updates.put(message)

        future = background.submit(self.keeper.acquire(resume, progress, refused))
        future.add_done_callback(lambda _: updates.put(None))
        try:
            while True:
                try:
                    message = updates.get(timeout=0.5)
                except queue.Empty:
                    continue
                if message is None:
                    break
                notice.update(str(message.get("state")), message.get("position"),
                              message.get("agent"))
            grant = future.result()
        except ControlError as e:
            raise GPUUnavailableError(e.msg) from None
        except BaseException:  # KeyboardInterrupt: leave the queue
            future.cancel()
            raise
        notice.done(str(grant["agent"]))
        return _grant(grant)

    def parked(self, info: dict[str, Any]) -> None:
        background.call(self.keeper.parked(info))

    def lost(self, reason: str) -> None:
        background.call(self.keeper.lost(reason))

    def status(self) -> dict[str, Any]:
        async def read() -> dict[str, Any]:
            return self.keeper.lease_state()

        return background.call(read())

    def set_idle(self, seconds: float) -> None:
        background.loop().call_soon_threadsafe(self.keeper.set_idle, float(seconds))

    def device_facts(self, resume: dict[str, Any] | None) -> dict[str, Any] | None:
        return background.call(self.keeper.device_facts((resume or {}).get("agent")))

    def close(self) -> None:
        """Release the lease and drop this process's parked state (exit, a new source)."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        try:
            background.call(self.keeper.shutdown(), CLOSE_TIMEOUT_S)
            background.call(self._client.close(), CLOSE_TIMEOUT_S)
        except Exception:  # exiting: the agent expires what was not released
            pass


def _direct_config(kernel_id: str) -> KeeperConfig:
    try:
        user = getpass.getuser()
    except Exception:
        user = ""
    timeout = _seconds("HARP_ACQUIRE_TIMEOUT", 0.0)
    return KeeperConfig(kernel_id, secrets.token_urlsafe(18), user, idle_timeout=0.0,
                        reclaim_after=_seconds("HARP_RECLAIM_AFTER", 3.0),
                        # a script without an agent says so within the agent timeout
                        reach_timeout=timeout_from_env(),
                        acquire_timeout=timeout if timeout > 0 else None,
                        info={**_lease_info(), "holder": "process"})


def _lease_ended(holder: LeaseHolder | None, reason: str, lease_id: str | None) -> None:
    """The agent ended the lease: the session forgets its connection (so that its next GPU
    call leases again and restores), and a reclaimed kernel's next cell says why."""
    # only a kernel that used the GPU under that lease was parked; one whose lease ended
    # before its hello (granted, never attached) has nothing to be told: it queues again
    if reason == ParkReason.RECLAIM and holder is not None and holder.attached_under(lease_id):
        notes.tell_next_cell(notes.reclaimed())
    if holder is not None:
        # not on the thread that told us: it must go on serving (park asks, replies)
        threading.Thread(target=holder.lease_ended, args=(lease_id,), name="harp-lease-ended",
                         daemon=True).start()


# }}}

_source: LeaseSource | None = None
_source_lock = threading.Lock()


def get_lease_source(endpoint: str | None = None) -> LeaseSource:
    """The process's lease source: the provisioner's if HARP_CONTROL is set, else a direct one
    on ``endpoint`` or the agents of HARP_AGENTS / HARP_AGENT."""
    global _source
    control = os.environ.get("HARP_CONTROL") if endpoint is None else None
    with _source_lock:
        if control:
            if not isinstance(_source, ControlLeaseSource) or _source.endpoint != control:
                _replace(ControlLeaseSource(control, os.environ.get("HARP_CONTROL_KEY", "")))
        else:
            endpoints = [endpoint] if endpoint else configured_agents()
            if not isinstance(_source, DirectLeaseSource) or _source.endpoints != endpoints:
                _replace(DirectLeaseSource(endpoints))
        assert _source is not None
        return _source


def _replace(source: LeaseSource) -> None:
    global _source
    old, _source = _source, source
    if old is not None:
        old.close()


def _lease_info() -> dict[str, Any]:
    """Who asks, and how long the agent should keep its parked state (HARP_PARK_TTL seconds,
    HARP_PARK_LIMIT bytes; the agent's own limits cap them)."""
    info: dict[str, Any] = {"host": pysocket.gethostname(), "pid": os.getpid()}
    for key, variable in (("park_ttl", "HARP_PARK_TTL"), ("park_limit", "HARP_PARK_LIMIT")):
        value = _seconds(variable, 0.0)
        if value > 0:
            info[key] = value
    return info


def _seconds(variable: str, default: float) -> float:
    text = os.environ.get(variable, "").strip()
    if not text:
        return default
    try:
        return float(text)
    except ValueError:
        raise GPUUnavailableError(f"{variable}={text!r} is not a number") from None


def reset_lease_source() -> None:
    global _source
    with _source_lock:
        source, _source = _source, None
    if source is not None:
        source.close()


def _forget_in_child() -> None:
    global _source, _source_lock
    _source = None
    _source_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_in_child)
