"""KernelLease: what one kernel launch runs on the provisioners' background loop.

It wires the kernel's control socket to its LeaseKeeper (handlers stay thin: the keeper holds the
logic), is the keeper's way to the kernel (``KernelLink``: asks it to park, tells it when the agent
ended its lease), owns the lease client the keeper talks to agents with, and watches the kernel
process: when the process dies, its lease is released and its parked state dropped at once (the
GPU is not held until the lease expires, and nobody will ever restore that state).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import zmq.asyncio

from provisioner import changes
from provisioner.control import ControlError, ControlRequest, ControlServer, KernelNotConnected
from provisioner.keeper import LeaseKeeper
from provisioner.keeper_config import AgentsSource, KeeperConfig
from provisioner.lease_client import LeaseClient
from provisioner.lease_record import HOLDING, HeldLease, KeeperState, ParkReason

log = logging.getLogger("harp.provisioner.kernel_lease")

WATCH_EVERY_S = 0.2
AGENT_TIMEOUT_S = 5.0
LEASE_NOW_SETTLE_S = 5.0
#: how long the kernel may take to say how many bytes its allocations cover (the sidebar waits)
MEMORY_ASK_TIMEOUT_S = 1.0


class KernelLease:
    def __init__(self, config: KeeperConfig, agents: AgentsSource, token: str | None) -> None:
        self.config = config
        self.client = LeaseClient(token=token, timeout=AGENT_TIMEOUT_S,
                                  on_push=self._on_push,
                                  context=zmq.asyncio.Context.instance())
        self.keeper = LeaseKeeper(config, self.client, agents, self, on_change=changes.publish)
        self.control = ControlServer({
            "acquire": self._on_acquire, "parked": self._on_parked, "lost": self._on_lost,
            "status": self._on_status, "set_idle": self._on_set_idle, "bye": self._on_bye,
            "profile": self._on_profile, "device": self._on_device,
        })
        self._watchdog: asyncio.Task[None] | None = None
        self._leasing: asyncio.Task[Any] | None = None  # lease_now's acquire, kept alive
        #: the kernel's latest %%harp profile (its display JSON), for the sidebar
        self.latest_profile: dict[str, Any] | None = None
        self._stopped = False

    async def start(self, *, control_port: int | None = None, control_key: str | None = None,
                    lease: HeldLease | None = None, parked_at: str | None = None,
                    agents_seen: list[str] | None = None) -> None:
        """Serve the control socket (on a given port and key: a kernel that already knows
        them) and take over ``lease`` if a previous server held one."""
        await self.control.start(control_port, control_key)
        if lease is not None or parked_at is not None or agents_seen:
            self.keeper.adopt(lease, parked_at, agents_seen)

    def watch(self, is_alive: Callable[[], bool]) -> None:
        """Stop everything (release, drop parked state) when ``is_alive()`` turns False."""
        if self._watchdog is None:
            self._watchdog = asyncio.ensure_future(self._watch(is_alive))

    async def _watch(self, is_alive: Callable[[], bool]) -> None:
        while is_alive():
            await asyncio.sleep(WATCH_EVERY_S)
        log.info("kernel %s exited: releasing its GPU lease", self.config.kernel_id)
        self._watchdog = None  # stop() must not cancel the task running it
        await self.stop()

    async def stop(self) -> None:
        """Release the lease, drop parked state everywhere, close the sockets; idempotent."""
        if self._stopped:
            return
        self._stopped = True
        self._stop_watchdog()
        try:
            await self.keeper.shutdown()
        finally:
            await self.control.close()
            await self.client.close()

    async def detach(self) -> None:
        """Stop serving this kernel without ending its lease (a handover to another server,
        which takes it with load_provisioner_info); idempotent."""
        if self._stopped:
            return
        self._stopped = True
        self._stop_watchdog()
        self.keeper.detach()
        await self.control.close()
        await self.client.close()

    def _stop_watchdog(self) -> None:
        watchdog, self._watchdog = self._watchdog, None
        if watchdog is not None and watchdog is not asyncio.current_task():
            watchdog.cancel()

    def lease_state(self) -> dict[str, Any]:
        return self.keeper.lease_state()

    async def refresh(self, max_age: float) -> None:
        """The lease state's figures at most ``max_age`` s old (the sidebar asks): the
        session's from its agent, the allocated bytes from the kernel itself."""
        await self.keeper.refresh(max_age)
        if self.keeper.state not in HOLDING or not self.control.kernel_connected:
            return
        try:
            answer = await self.control.ask({"t": "memory"}, MEMORY_ASK_TIMEOUT_S)
        except (TimeoutError, KernelNotConnected):
            return  # busy beyond a second, or gone: the agent's figures stand alone
        allocated = answer.get("allocated")
        if type(allocated) is int and allocated >= 0:
            self.keeper.note_memory_allocated(allocated)

    async def lease_now(self, settle_s: float = LEASE_NOW_SETTLE_S) -> dict[str, Any]:
        """Lease a GPU before the kernel asks (the sidebar's Lease button); returns the lease
        state once granted or queued, or after ``settle_s``. A queued lease keeps waiting in
        the background; the kernel's next GPU call gets it without waiting again. Raises
        ControlError when no GPU can be leased."""
        if self.keeper.state in (*HOLDING, KeeperState.ACQUIRING, KeeperState.QUEUED):
            return self.keeper.lease_state()
        task = asyncio.ensure_future(self.keeper.acquire())
        self._leasing = task
        task.add_done_callback(_log_lease_failure)
        deadline = asyncio.get_running_loop().time() + settle_s
        while not task.done() and self.keeper.state not in (KeeperState.HELD,
                                                             KeeperState.QUEUED):
            if asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.02)
        if task.done() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]
        return self.keeper.lease_state()

    # {{{ to the kernel (the keeper's KernelLink)

    async def ask_park(self, reason: ParkReason) -> dict[str, Any]:
        return await self.control.ask({"t": "park", "reason": str(reason)},
                                      self.config.park_timeout)

    def lease_ended(self, reason: ParkReason, message: str, lease_id: str) -> None:
        """The kernel drops its connection to the parked session, so that its next GPU call
        leases again and restores; a reclaimed kernel tells its user why at its next cell."""
        if self.control.kernel_connected:
            self.control.push_soon({"t": "lease_ended", "reason": str(reason),
                                    "message": message, "lease": lease_id})

    def _on_push(self, endpoint: str, lease: dict[str, Any]) -> None:
        self.keeper.on_push(endpoint, lease)

    # }}}

    # {{{ control handlers (thin: the keeper decides)

    async def _on_acquire(self, request: ControlRequest) -> dict[str, Any]:
        resume = request.header.get("resume")

        async def progress(message: dict[str, Any]) -> None:
            await request.send({"t": "acquire_progress", **message})

        refused = request.header.get("refused")
        return await self.keeper.acquire(resume if isinstance(resume, dict) else None, progress,
                                         refused if isinstance(refused, str) else None)

    async def _on_parked(self, request: ControlRequest) -> dict[str, Any]:
        await self.keeper.parked(request.header)
        return {"t": "ok"}

    async def _on_lost(self, request: ControlRequest) -> dict[str, Any]:
        await self.keeper.lost(str(request.header.get("reason") or "the agent is unreachable"))
        return {"t": "ok"}

    async def _on_status(self, request: ControlRequest) -> dict[str, Any]:
        return {"t": "status", **self.keeper.lease_state()}

    async def _on_set_idle(self, request: ControlRequest) -> dict[str, Any]:
        seconds = request.header.get("seconds")
        if type(seconds) not in (int, float) or seconds <= 0:
            raise ControlError("ProtocolError", "set_idle needs a positive number of seconds")
        self.keeper.set_idle(float(seconds))
        return {"t": "ok"}

    async def _on_profile(self, request: ControlRequest) -> dict[str, Any]:
        profile = request.header.get("profile")
        if not isinstance(profile, dict):
            raise ControlError("ProtocolError", "profile needs a 'profile' object")
        at = time.time()
        self.latest_profile = {**profile, "at": at}
        changes.publish({**self.keeper.lease_state(), "previous": self.keeper.state,
                         "profile_at": at})
        return {"t": "ok"}

    async def _on_device(self, request: ControlRequest) -> dict[str, Any]:
        resume = request.header.get("resume")
        agent = resume.get("agent") if isinstance(resume, dict) else None
        return {"t": "device", "device": await self.keeper.device_facts(agent)}

    async def _on_bye(self, request: ControlRequest) -> None:
        # the kernel is exiting; the watchdog sees the process end and releases
        log.debug("kernel %s said bye", self.config.kernel_id)
        return None

    # }}}


def _log_lease_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.info("lease requested from the sidebar failed: %s", task.exception())
