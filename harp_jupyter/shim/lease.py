"""Where the shim gets its lease: the kernel's provisioner, or (no provisioner) the agents directly.

``LeaseSource.acquire`` blocks until a GPU is granted and returns a ``Grant``: the agent to talk
to and the lease to present in hello. The session calls it at its first GPU call and again after
each park. Two sources:

* ``ControlLeaseSource`` (a kernel started by ElasticGPUProvisioner: ``HARP_CONTROL`` is set): asks
  the provisioner over the control socket (docs/leases-design.md). The provisioner holds and renews
  the lease and applies the idle policy; it may ask this kernel to park (``park_handler``).
* ``DirectLeaseSource`` (``harp run``, plain scripts, tests): holds a lease itself with the same
  lease client the provisioner uses, renewed from a thread, released at exit. No idle release.
"""

from __future__ import annotations

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
from typing import Any

import zmq

from gpu_agent import protocol
from harp_jupyter.shim.errors import GPUUnavailableError
from harp_jupyter.shim.notice import WaitNotice

#: park_handler(reason) -> {"session", "agent", "bytes"} once parked, or None when busy
ParkHandler = Callable[[str], dict[str, Any] | None]

#: seconds without any word from the provisioner after which a control request is sent again
_RESEND_AFTER = 1.0
#: how long a finished profile may take to reach the sidebar before it is given up
SHARE_PROFILE_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class Grant:
    agent: str
    lease: tuple[str, str]  # (lease_id, lease_token)
    #: the agent that holds this kernel's parked state, when it is not ``agent``
    moved_from: str | None = None


class LeaseSource(ABC):
    park_handler: ParkHandler | None = None

    @abstractmethod
    def acquire(self, resume: dict[str, Any] | None, notice: WaitNotice) -> Grant:
        """Block until a GPU is granted. ``resume`` = {session, resume_token, agent} of the
        parked session, if any (the source prefers that agent)."""

    @abstractmethod
    def parked(self, info: dict[str, Any]) -> None:
        """The session parked on its own initiative (``%harp release``): release the lease."""

    @abstractmethod
    def lost(self, reason: str) -> None:
        """The agent died under the session: forget the lease."""

    @abstractmethod
    def status(self) -> dict[str, Any]:
        """The lease state dict (docs/leases-design.md)."""

    def set_idle(self, seconds: float) -> None:
        raise GPUUnavailableError("the idle timeout is applied by the Elastic GPU kernel's "
                                  "provisioner; this process has none (no HARP_CONTROL)")

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
        if header.get("t") == "park":
            reply = self._park_reply(header)
            dealer.send(protocol.pack_header(reply))
            return
        waiter = self._waiters.get(header.get("rid"))  # type: ignore[arg-type]
        if waiter is not None:
            waiter.put(header)

    def _park_reply(self, header: dict[str, Any]) -> dict[str, Any]:
        handler = self.park_handler
        rid = header.get("rid")
        try:
            info = handler(str(header.get("reason", "idle"))) if handler else {
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

    def acquire(self, resume: dict[str, Any] | None, notice: WaitNotice) -> Grant:
        def progress(message: dict[str, Any]) -> None:
            notice.update(str(message.get("state")), message.get("position"),
                          message.get("agent"))

        wait = float(os.environ.get("HARP_ACQUIRE_TIMEOUT") or 86400) + self._timeout
        reply = self._request({"t": "acquire", "resume": resume}, wait, progress)
        lease = reply.get("lease")
        if reply.get("t") != "grant" or not (isinstance(lease, list) and len(lease) == 2):
            raise GPUUnavailableError(f"unexpected answer to acquire: {reply.get('t')!r}")
        notice.done(str(reply["agent"]))
        return Grant(str(reply["agent"]), (str(lease[0]), str(lease[1])), reply.get("from"))

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

# {{{ no provisioner: hold the lease ourselves


class DirectLeaseSource(LeaseSource):
    """Holds a lease on one of ``endpoints`` with provisioner.lease_client, renewed from a thread.

    Used where no provisioner exists (``harp run``, scripts, tests). It never releases on idle;
    ``%harp release`` and exit do."""

    def __init__(self, endpoints: list[str], *, token: str | None = None) -> None:
        from provisioner.lease_client import BlockingLeaseClient

        self.endpoints = endpoints
        self._token = token if token is not None else os.environ.get("HARP_TOKEN")
        self.kernel_id = os.environ.get("HARP_KERNEL_ID") or f"{pysocket.gethostname()}:" \
            f"{os.getpid()}:{secrets.token_hex(3)}"
        self._secret = secrets.token_urlsafe(18)
        try:
            self._user = getpass.getuser()
        except Exception:
            self._user = ""
        self._client = BlockingLeaseClient(token=self._token)
        self._lock = threading.Lock()
        self._lease: dict[str, Any] | None = None
        self._agent: str | None = None
        self._granted_at: float | None = None
        self._state = "none"
        self._renewer: threading.Thread | None = None
        self._stop = threading.Event()
        atexit.register(self.close)

    def acquire(self, resume: dict[str, Any] | None, notice: WaitNotice) -> Grant:
        from provisioner.selection import choose_agent

        with self._lock:
            if self._lease is not None and self._state == "held":
                assert self._agent is not None
                return Grant(self._agent, (self._lease["id"], self._lease["token"]))
            self._state = "acquiring"
            statuses = self._client.statuses(self.endpoints)
            if not statuses:
                self._state = "none"
                raise GPUUnavailableError(
                    f"no GPU agent answered at {', '.join(self.endpoints)}: is harp-agent running "
                    "there? (HARP_AGENTS / HARP_AGENT name the agents)")
            parked_at = resume.get("agent") if resume else None
            agent = choose_agent(statuses, parked_at)
            lease = self._client.request(agent, self.kernel_id, self._secret, self._user,
                                         info={**_lease_info(), "holder": "process"})
            while lease["state"] == "queued":
                self._state = "queued"
                notice.update("queued", lease.get("position"), agent)
                lease = {**self._client.wait_change(agent, lease), "token": lease["token"]}
            if lease["state"] != "held":
                self._state = "none"
                raise GPUUnavailableError(f"the lease on {agent} was {lease['state']} while "
                                          "waiting for it")
            self._lease, self._agent, self._state = lease, agent, "held"
            self._granted_at = time.time()
            self._start_renewer(lease.get("ttl") or 30.0)
            notice.done(agent)
            moved = parked_at if parked_at and parked_at != agent else None
            return Grant(agent, (lease["id"], lease["token"]), moved)

    def _start_renewer(self, ttl: float) -> None:
        if self._renewer is not None and self._renewer.is_alive():
            return
        self._stop.clear()
        self._renewer = threading.Thread(target=self._renew_loop, args=(ttl / 3,),
                                         name="harp-lease-renew", daemon=True)
        self._renewer.start()

    def _renew_loop(self, every: float) -> None:
        while not self._stop.wait(every):
            with self._lock:
                lease, agent = self._lease, self._agent
                if lease is None or agent is None:
                    return
                try:
                    self._client.renew(agent, lease["id"], lease["token"])
                except Exception:
                    self._lease, self._state = None, "lost"
                    return

    def _release(self) -> None:
        lease, agent = self._lease, self._agent
        self._lease = None
        self._stop.set()
        if lease is not None and agent is not None:
            try:
                self._client.release(agent, lease["id"], lease["token"])
            except Exception:
                pass  # the agent expires it

    def device_facts(self, resume: dict[str, Any] | None) -> dict[str, Any] | None:
        from provisioner.selection import likely_agent

        statuses = self._client.statuses(self.endpoints)
        if not statuses:
            return None
        device = statuses[likely_agent(statuses, (resume or {}).get("agent"))].get("device")
        return device if isinstance(device, dict) else None

    def parked(self, info: dict[str, Any]) -> None:
        with self._lock:
            self._release()
            self._state = "parked"

    def lost(self, reason: str) -> None:
        with self._lock:
            self._release()  # best effort: the agent may be alive (its parked state was dropped)
            self._state = "lost"

    def status(self) -> dict[str, Any]:
        held = self._state == "held" and self._granted_at is not None
        return {"state": self._state, "agent": self._agent, "kernel_id": self.kernel_id,
                "held_since": self._granted_at if held else None,
                "held_s": round(time.time() - self._granted_at, 1) if held and
                self._granted_at else None, "idle_timeout": None, "idle_left_s": None,
                "position": None, "message": "no provisioner: the lease is held until exit"}

    def close(self) -> None:
        with self._lock:
            self._release()
            for endpoint in self.endpoints:
                try:
                    self._client.drop_parked(endpoint, self.kernel_id, self._secret)
                except Exception:
                    pass
        self._client.close()
        atexit.unregister(self.close)


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
        try:
            value = float(os.environ.get(variable) or 0)
        except ValueError:
            raise GPUUnavailableError(
                f"{variable}={os.environ[variable]!r} is not a number") from None
        if value > 0:
            info[key] = value
    return info


def configured_agents() -> list[str]:
    from harp_jupyter.shim.session import configured_endpoint
    from provisioner.pool import expand_endpoints, parse_endpoints

    text = os.environ.get("HARP_AGENTS", "").strip()
    if not text or text == "auto":
        return [configured_endpoint()]
    return expand_endpoints(parse_endpoints(text))


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
