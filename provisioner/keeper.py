"""LeaseKeeper: one kernel's GPU lease, from acquire to release (docs/leases-design.md).

It knows nothing of jupyter_client: the provisioner feeds it the kernel's control requests and
gives it a way to ask the kernel to park. States (as the sidebar shows them)::

    none -> acquiring -> (queued ->) held -> parking -> parked -> acquiring ...
    any with a lease -> lost (the agent died or ended the lease behind our back)

While held it renews every ``lease_ttl / 3`` s (the agent expires leases a dead server stops
renewing) and applies the idle policy with what each renewal reports: the session's ``idle_s``
and ``busy``. Idle past ``idle_timeout`` and not busy: the kernel is asked to park (so no call of
its can race the park), and the lease is released when it has; a kernel that does not answer
within ``park_timeout`` gets its lease released anyway (the agent parks the session itself).

Every public coroutine runs on one event loop (the provisioners' background loop); an asyncio
lock makes acquire, park and release one at a time, so a kernel's acquire never slips between a
park and the release that follows it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from provisioner.control import ControlError
from provisioner.lease_client import AgentUnreachable, LeaseClient, LeaseRefused
from provisioner.selection import choose_agent, is_free, likely_agent

log = logging.getLogger("harp.provisioner.keeper")

STATES = ("none", "acquiring", "queued", "held", "parking", "parked", "lost")
#: while queued in a pool of several agents, how often the others are asked whether one is free
QUEUE_RECHECK_S = 2.0
#: lease states after which the agent no longer knows the lease as ours
ENDED = ("released", "revoked", "expired")

#: ask_park(reason) -> the kernel's answer ({"t": "parked", session, agent, bytes} or
#: {"t": "busy"}); raises TimeoutError or provisioner.control.KernelNotConnected
AskPark = Callable[[str], Awaitable[dict[str, Any]]]
#: progress(message) while queued: {"state", "position", "agent"}
Progress = Callable[[dict[str, Any]], Awaitable[None]]
#: the agent endpoints to choose from, resolved at each acquire (local agents start lazily)
AgentsSource = Callable[[], Awaitable[list[str]]]
#: on_change(lease_state() plus "previous": the state before) at each state or queue-position
#: change, on the keeper's loop; must not block (the sidebar's events)
OnChange = Callable[[dict[str, Any]], None]


@dataclass
class KeeperConfig:
    kernel_id: str
    kernel_secret: str
    user: str = ""
    lease_ttl: float = 30.0
    #: seconds without GPU work before the lease is released; <= 0: never on idle
    idle_timeout: float = 60.0
    #: give up waiting in a queue after this long; None: wait as long as it takes
    acquire_timeout: float | None = None
    park_timeout: float = 30.0
    #: how long an agent may take to answer a status message at acquire (a dead agent in the
    #: pool costs each acquire this much)
    status_timeout: float = 2.0
    #: passed in lease_request ``info`` (host, park limits, ...)
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class HeldLease:
    agent: str
    lease_id: str
    token: str
    ttl: float
    granted_at: float | None = None  # wall clock


def idle_left(idle_timeout: float, session: dict[str, Any] | None, seconds_since_report: float,
              seconds_held: float) -> float | None:
    """Seconds until the idle policy releases, from the last renew report; None = never.

    A busy session never counts down. The report is ``seconds_since_report`` old, so that much
    more idleness has passed since. A lease is never idle for longer than it has been held: a
    session parked long ago and being restored right now reports a large ``idle_s``, and must
    not be parked again before its kernel has had a chance to use the GPU it just got. Without a
    session (the kernel has not said hello yet, or it failed) the lease is idle since its grant.
    """
    if idle_timeout <= 0:
        return None
    if session is not None and session.get("busy"):
        return idle_timeout
    idle_s = seconds_held
    if session is not None and session.get("state", "active") == "active":
        idle_s = min(idle_s, float(session.get("idle_s") or 0.0) + seconds_since_report)
    return max(0.0, idle_timeout - idle_s)


class LeaseKeeper:
    def __init__(self, config: KeeperConfig, client: LeaseClient, agents: AgentsSource,
                 ask_park: AskPark, *, clock: Callable[[], float] = time.time,
                 on_change: OnChange | None = None) -> None:
        self.config = config
        self.on_change = on_change
        self.client = client
        self._agents = agents
        self._ask_park = ask_park
        self._clock = clock
        self._lock = asyncio.Lock()
        self.state = "none"
        self.message = ""
        self.position: int | None = None
        self.lease: HeldLease | None = None
        #: the agent holding this kernel's parked state (prefer it at the next acquire)
        self.parked_at: str | None = None
        self.parked_bytes = 0
        #: facts for lease_state(): from the agent's status at acquire and each renewal
        self.device: dict[str, Any] = {}
        self.session: dict[str, Any] | None = None
        self._reported_at = 0.0  # monotonic time of the last session report
        self._keeper: asyncio.Task[None] | None = None
        self._reschedule = asyncio.Event()  # wakes the keeper early (the idle timeout changed)
        self._acquiring: asyncio.Task[Any] | None = None
        self.agents_seen: set[str] = set()
        self.closed = False
        #: GPU time of leases that ended, and when the current one started being held
        self._gpu_seconds = 0.0
        self._held_from: float | None = None
        self._told: tuple[str, int | None] = ("none", None)

    # {{{ what the kernel asks

    async def acquire(self, resume: dict[str, Any] | None = None,
                      progress: Progress | None = None) -> dict[str, Any]:
        """Lease a GPU; returns the ``grant`` {agent, lease: [id, token], from}. ``resume`` =
        {session, resume_token, agent} of the kernel's parked session, if any."""
        async with self._lock:
            self._check_open()
            if self.lease is not None and self.state == "held":
                return self._grant(None)
            parked_at = (resume or {}).get("agent") or self.parked_at
            self._acquiring = asyncio.current_task()
            try:
                return await self._acquire(parked_at if isinstance(parked_at, str) else None,
                                           progress)
            except asyncio.CancelledError:
                await self._drop_lease(quietly=True)
                raise
            finally:
                self._acquiring = None

    async def parked(self, info: dict[str, Any]) -> None:
        """The kernel parked its session on its own (``%harp release``): release the lease."""
        async with self._lock:
            self._note_parked(info)
            await self._drop_lease()
            self._set("parked", "released: the device state is parked on the agent")

    async def lost(self, reason: str) -> None:
        """The agent died under the kernel: forget the lease (released best effort, in case
        the agent lives and only the kernel's connection broke)."""
        async with self._lock:
            await self._drop_lease(quietly=True)
            self.parked_at = None
            self._set("lost", f"GPU lost: {reason}")

    async def device_facts(self, parked_at: str | None) -> dict[str, Any] | None:
        """The device_info of the agent this kernel's next acquire would most likely get (its
        own lease's, else the pool's choice), from the agents' status: no lease is taken."""
        preferred = self.lease.agent if self.lease is not None else (parked_at or self.parked_at)
        try:
            agents = await self._agents()
        except ControlError:
            return None
        statuses = await self.client.statuses(agents, self.config.status_timeout)
        if not statuses:
            return None
        device = statuses[likely_agent(statuses, preferred)].get("device")
        return device if isinstance(device, dict) else None

    def set_idle(self, seconds: float) -> None:
        self.config.idle_timeout = float(seconds)
        self._reschedule.set()

    async def release(self, reason: str = "release") -> bool:
        """Park the kernel's session and give the GPU back now (the sidebar's Release button).
        False when the kernel is busy and kept it."""
        async with self._lock:
            if self.lease is None or self.state != "held":
                return False
            return await self._park(reason)

    def adopt(self, lease: HeldLease | None, parked_at: str | None = None,
              agents_seen: list[str] | None = None) -> None:
        """Take over a lease a previous server held for this kernel (load_provisioner_info):
        keep renewing it; if it ended meanwhile, the first renewal says so."""
        self.parked_at = parked_at
        self.agents_seen.update(agents_seen or ())
        if parked_at:
            self.agents_seen.add(parked_at)
        if lease is None:
            self._set("parked" if parked_at else "none", "")
            return
        self.lease = lease
        self.agents_seen.add(lease.agent)
        self._note_session(None)
        self._set("held", "taken over from a previous server")
        self._start_keeping()

    # }}}

    # {{{ acquire

    async def _acquire(self, parked_at: str | None, progress: Progress | None
                       ) -> dict[str, Any]:
        self._set("acquiring", "")
        try:
            agents = await self._agents()
            statuses = await self.client.statuses(agents, self.config.status_timeout)
            if not statuses:
                raise ControlError("GPUUnavailable", (
                    f"no GPU agent answered at {', '.join(agents) or '(none configured)'}: is "
                    "harp-agent running there? (HARP_AGENTS names the agents)"))
            agent = choose_agent(statuses, parked_at)
            self._note_device(statuses[agent])
            self.agents_seen.add(agent)
            c = self.config
            try:
                reply = await self.client.request(agent, c.kernel_id, c.kernel_secret, c.user,
                                                  ttl=c.lease_ttl, info=c.info)
            except LeaseRefused as e:
                raise ControlError(e.kind, f"the GPU agent at {agent} refused the lease: "
                                           f"{e.msg}") from None
            self.lease = HeldLease(agent, reply["id"], reply["token"],
                                   float(reply.get("ttl") or c.lease_ttl))
            lease = await self._wait_in_queue(reply, progress, [a for a in agents if a != agent],
                                              parked_at)
            if lease.get("state") != "held":
                self.lease = None
                raise ControlError("LeaseError", f"the lease on {agent} was "
                                                 f"{lease.get('state')} while waiting for it")
        except AgentUnreachable as e:
            await self._drop_lease(quietly=True)
            self._set("none", str(e))
            raise ControlError("GPUUnavailable", str(e)) from None
        except ControlError as e:
            await self._drop_lease(quietly=True)
            self._set("none", e.msg)
            raise
        except Exception as e:  # e.g. a bad agent setting: the user's cell must say what
            await self._drop_lease(quietly=True)
            self._set("none", str(e))
            raise ControlError("GPUUnavailable", f"cannot lease a GPU: {e}") from None
        assert self.lease is not None
        self.lease.granted_at = self._clock()
        self._note_session(lease.get("session"))
        self._set("held", "")
        self._start_keeping()
        return self._grant(parked_at)

    async def _wait_in_queue(self, lease: dict[str, Any], progress: Progress | None,
                             others: list[str] | None = None, parked_at: str | None = None
                             ) -> dict[str, Any]:
        """Wait until the queued lease is granted. With other agents in the pool, look every
        QUEUE_RECHECK_S for one that has become free and move there (the state follows)."""
        assert self.lease is not None
        held = self.lease
        deadline = (time.monotonic() + self.config.acquire_timeout
                    if self.config.acquire_timeout else None)
        told: int | None = None
        while lease.get("state") == "queued":
            position = lease.get("position")
            self.position = position
            self._set("queued", f"position {position} in the queue at {held.agent}")
            if progress is not None and position != told:
                told = position
                await progress({"state": "queued", "position": position, "agent": held.agent})
            wait = held.ttl / 3 if not others else min(held.ttl / 3, QUEUE_RECHECK_S)
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ControlError("GPUUnavailable", (
                        f"no GPU was free within {self.config.acquire_timeout:g} s "
                        f"(HARP_ACQUIRE_TIMEOUT); still position {position} at {held.agent}"))
                wait = min(wait, left)
            try:
                changed = await self.client.wait_change(
                    held.agent, {"id": held.lease_id, "token": held.token, "ttl": held.ttl},
                    wait)
            except LeaseRefused as e:
                raise ControlError(e.kind, f"the queued lease at {held.agent} ended: "
                                           f"{e.msg}") from None
            lease = changed
            if lease.get("state") == "queued" and others:
                moved = await self._move_to_a_free_agent(others, parked_at)
                if moved is not None:
                    held, lease = moved
        self.position = None
        return lease

    async def _move_to_a_free_agent(self, others: list[str], parked_at: str | None
                                    ) -> tuple[HeldLease, dict[str, Any]] | None:
        """If another agent is free now, lease there and give up the queued lease; the new
        lease and its state, or None (nothing free, or it was taken first)."""
        statuses = await self.client.statuses(others, self.config.status_timeout)
        free = {e: s for e, s in statuses.items() if is_free(s)}
        if not free:
            return None
        agent = choose_agent(free, parked_at)
        c = self.config
        try:
            reply = await self.client.request(agent, c.kernel_id, c.kernel_secret, c.user,
                                              ttl=c.lease_ttl, info=c.info)
        except (AgentUnreachable, LeaseRefused) as e:
            log.debug("moving to %s: %s", agent, e)
            return None
        new = HeldLease(agent, reply["id"], reply["token"], float(reply.get("ttl") or c.lease_ttl))
        if reply.get("state") != "held":  # someone else got there first: stay where we were
            await self._release_at_agent(new)
            return None
        old, self.lease = self.lease, new
        if old is not None:
            await self._release_at_agent(old)
        self._note_device(statuses[agent])
        self.agents_seen.add(agent)
        log.info("kernel %s: moved from the queue at %s to the free agent %s",
                 c.kernel_id, old.agent if old else "?", agent)
        return new, reply

    async def _release_at_agent(self, lease: HeldLease, *, quietly: bool = True) -> None:
        try:
            await self.client.release(lease.agent, lease.lease_id, lease.token)
        except (AgentUnreachable, LeaseRefused) as e:
            # dead agent: nothing to release; ended lease: nothing either
            (log.debug if quietly else log.info)("release of %s at %s: %s", lease.lease_id,
                                                 lease.agent, e)

    def _grant(self, parked_at: str | None) -> dict[str, Any]:
        assert self.lease is not None
        agent = self.lease.agent
        moved = parked_at if parked_at and parked_at != agent else None
        return {"t": "grant", "agent": agent, "lease": [self.lease.lease_id, self.lease.token],
                "from": moved}

    # }}}

    # {{{ renewals and the idle policy

    def _start_keeping(self) -> None:
        if self._keeper is None or self._keeper.done():
            self._keeper = asyncio.ensure_future(self._keep())

    async def _keep(self) -> None:
        """Renew every ttl/3; between renewals wake early when the idle countdown runs out."""
        try:
            while not self.closed and self.lease is not None:
                await self._sleep(self._next_tick())
                lease = self.lease
                if lease is None or self.closed:
                    return
                if self.state != "held":
                    continue  # parking: the parker decides
                try:
                    info = await self.client.renew(lease.agent, lease.lease_id, lease.token)
                except AgentUnreachable as e:
                    async with self._lock:
                        if self.lease is lease:
                            self.lease, self.session = None, None
                            self.parked_at = None
                            self._set("lost", f"GPU lost: {e}")
                    return
                except LeaseRefused as e:
                    async with self._lock:
                        if self.lease is lease:
                            self._lease_ended(lease, e.msg)
                    return
                self._note_session(info.get("session"))
                if self._idle_due():
                    async with self._lock:
                        if self.lease is lease and self.state == "held" and self._idle_due():
                            await self._park("idle")
        except asyncio.CancelledError:
            raise
        except Exception:  # never let the keeper die silently: the lease would just expire
            log.exception("lease keeper of kernel %s failed", self.config.kernel_id)

    async def refresh(self, max_age: float) -> None:
        """Renew now if the last session report is older than ``max_age`` s, so lease_state()
        shows current memory and idleness (the sidebar asks); failures are left to the keeper
        loop, which renews again soon and handles them."""
        lease = self.lease
        if lease is None or self.state != "held":
            return
        if self.session is not None and time.monotonic() - self._reported_at < max_age:
            return
        try:
            info = await self.client.renew(lease.agent, lease.lease_id, lease.token)
        except (AgentUnreachable, LeaseRefused):
            return
        if self.lease is lease:
            self._note_session(info.get("session"))

    def _next_tick(self) -> float:
        lease = self.lease
        every = (lease.ttl if lease else self.config.lease_ttl) / 3
        left = self.idle_left_s()
        return every if left is None else min(every, max(left, 0.2))

    async def _sleep(self, seconds: float) -> None:
        self._reschedule.clear()
        try:
            await asyncio.wait_for(self._reschedule.wait(), seconds)
        except TimeoutError:
            pass

    def _idle_due(self) -> bool:
        left = self.idle_left_s()
        return left is not None and left <= 0

    def idle_left_s(self) -> float | None:
        if self.lease is None or self.state not in ("held", "parking"):
            return None
        held_s = self._clock() - (self.lease.granted_at or self._clock())
        return idle_left(self.config.idle_timeout, self.session,
                         time.monotonic() - self._reported_at, held_s)

    async def _park(self, reason: str) -> bool:
        """Ask the kernel to park, then release (lock held). False when the kernel is busy."""
        lease = self.lease
        assert lease is not None
        self._set("parking", f"parking ({reason})")
        try:
            answer: dict[str, Any] | None = await asyncio.wait_for(
                self._ask_park(reason), self.config.park_timeout)
        except TimeoutError:
            answer = None
            log.warning("kernel %s did not park within %g s: releasing its lease at %s anyway",
                        self.config.kernel_id, self.config.park_timeout, lease.agent)
        except Exception as e:  # no kernel to ask (not connected): the agent parks it
            log.info("kernel %s could not be asked to park (%s): releasing at the agent",
                     self.config.kernel_id, e)
            answer = None
        if self.lease is not lease:
            return True  # the lease ended meanwhile (lost, expired)
        if answer is not None and answer.get("t") == "busy":
            self._set("held", "")
            return False
        if answer is not None and answer.get("t") == "parked":
            self._note_parked(answer)
        else:
            self.parked_at = lease.agent  # the agent parks the session when the lease ends
        await self._drop_lease()
        self._set("parked", f"released after {reason}: the device state is parked on "
                            f"{self.parked_at or lease.agent}")
        return True

    # }}}

    # {{{ pushes from the agent

    def on_push(self, endpoint: str, lease: dict[str, Any]) -> None:
        """A lease change the agent pushed; only the end of our held lease matters here (queue
        moves are awaited by the acquire itself)."""
        held = self.lease
        if held is None or lease.get("id") != held.lease_id or lease.get("state") not in ENDED:
            return
        if self.state in ("held", "parking"):
            self._lease_ended(held, f"the agent at {endpoint} {lease.get('state')} the lease")

    def _lease_ended(self, lease: HeldLease, why: str) -> None:
        """The agent ended our lease (expired, revoked): it parked the session itself."""
        self.lease = None
        self.parked_at = lease.agent
        self._set("parked", f"{why}; the device state is parked on {lease.agent}")
        if self._keeper is not None and self._keeper is not asyncio.current_task():
            self._keeper.cancel()
        self._keeper = None

    # }}}

    async def _drop_lease(self, *, quietly: bool = False) -> None:
        """Release our lease at its agent (held or queued) and forget it."""
        lease, self.lease = self.lease, None
        self.position = None
        keeper, self._keeper = self._keeper, None
        if keeper is not None and keeper is not asyncio.current_task():
            keeper.cancel()
        if lease is not None:
            await self._release_at_agent(lease, quietly=quietly)

    def detach(self) -> None:
        """Stop renewing without releasing: another server takes the lease over (it has the
        lease from get_provisioner_info). Nothing else changes; the lease expires unless the new
        owner renews it."""
        self.closed = True
        for task in (self._keeper, self._acquiring):
            if task is not None and task is not asyncio.current_task():
                task.cancel()
        self._keeper = None

    async def shutdown(self) -> None:
        """Release the lease and drop this kernel's parked state on every agent; idempotent.
        Run when the kernel process is gone or restarts (its state is unreachable then)."""
        if self.closed:
            return
        self.closed = True
        acquiring = self._acquiring
        if acquiring is not None and acquiring is not asyncio.current_task():
            acquiring.cancel()
        async with self._lock:
            await self._drop_lease(quietly=True)
            # parked state of this kernel can only be where it held a lease (a move goes to
            # the agent of the new lease), so the agents it has seen are every agent that may
            # hold some; asking the whole pool would start local agents just to say goodbye
            agents = set(self.agents_seen)
            if self.parked_at:
                agents.add(self.parked_at)
            await asyncio.gather(*(self._drop_parked(a) for a in sorted(agents)))
            self.parked_at = None
            self._set("none", "the kernel ended")

    async def _drop_parked(self, agent: str) -> None:
        try:
            await self.client.drop_parked(agent, self.config.kernel_id, self.config.kernel_secret)
        except (AgentUnreachable, LeaseRefused) as e:
            log.debug("drop_parked at %s: %s", agent, e)

    # {{{ state

    def _check_open(self) -> None:
        if self.closed:
            raise ControlError("GPUUnavailable", "this kernel is shutting down")

    def _set(self, state: str, message: str) -> None:
        assert state in STATES, state
        previous = self.state
        if state != previous:
            log.debug("kernel %s: %s -> %s %s", self.config.kernel_id, previous, state, message)
        self.state, self.message = state, message
        if state != "queued":
            self.position = None
        if state not in ("held", "parking"):
            self.session = None
        holding = state in ("held", "parking")
        if holding and self._held_from is None:
            self._held_from = self._clock()
        elif not holding and self._held_from is not None:
            self._gpu_seconds += self._clock() - self._held_from
            self._held_from = None
        self._tell(previous)

    def _tell(self, previous: str) -> None:
        told = (self.state, self.position)
        if told == self._told or self.on_change is None:
            self._told = told
            return
        self._told = told
        try:
            self.on_change({**self.lease_state(), "previous": previous})
        except Exception:  # a listener's bug must not break the lease
            log.exception("lease change listener of kernel %s failed", self.config.kernel_id)

    def gpu_seconds(self) -> float:
        """Seconds this kernel has held a GPU, over all its leases."""
        current = self._clock() - self._held_from if self._held_from is not None else 0.0
        return self._gpu_seconds + current

    def _note_session(self, session: Any) -> None:
        self.session = session if isinstance(session, dict) else None
        self._reported_at = time.monotonic()

    def _note_parked(self, info: dict[str, Any]) -> None:
        if info.get("session"):
            self.parked_at = str(info.get("agent") or (self.lease.agent if self.lease else ""))
            self.parked_bytes = int(info.get("bytes") or 0)
        elif self.lease is not None:
            self.parked_at = self.lease.agent  # nothing was connected: whatever is there stays

    def _note_device(self, status: dict[str, Any]) -> None:
        device = status.get("device") if isinstance(status.get("device"), dict) else {}
        memory = status.get("memory") if isinstance(status.get("memory"), dict) else {}
        self.device = {"gpu": device.get("name"),
                       "emulated": bool(status.get("emulated", device.get("emulated"))),
                       "memory_total": memory.get("total", device.get("total_memory"))}

    def lease_state(self) -> dict[str, Any]:
        """The lease state dict of docs/leases-design.md (``%harp status``, the sidebar)."""
        lease = self.lease
        held = lease is not None and self.state in ("held", "parking")
        granted = lease.granted_at if held and lease is not None else None
        session = self.session or {}
        left = self.idle_left_s() if held else None
        return {
            "state": self.state,
            "agent": lease.agent if lease is not None else self.parked_at,
            "gpu": self.device.get("gpu"),
            "emulated": self.device.get("emulated"),
            "memory_used": session.get("device_bytes") if held else None,
            "memory_total": self.device.get("memory_total"),
            "held_since": granted,
            "held_s": round(self._clock() - granted, 1) if granted is not None else None,
            "idle_timeout": self.config.idle_timeout,
            "idle_left_s": round(left, 1) if left is not None else None,
            "position": self.position,
            "gpu_seconds": round(self.gpu_seconds(), 3),
            "parked_bytes": self.parked_bytes if self.parked_at and not held else 0,
            "kernel_id": self.config.kernel_id,
            "message": self.message,
        }

    # }}}
