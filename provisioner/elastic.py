"""ElasticGPUProvisioner: a local kernel that borrows a GPU only while its cells do GPU work.

jupyter_client creates one provisioner per kernel (kernelspec ``metadata.kernel_provisioner``,
``provisioner_name: elastic-gpu``) and keeps the same instance across restarts. It launches the
kernel process as LocalProvisioner does, with the shim switched on in its environment and a
control socket to reach us; the lease itself is held here (provisioner.keeper), because a
kernel busy in a long CPU cell cannot renew anything, and a dead kernel cannot release.

Settings are traitlets: from the kernelspec's ``kernel_provisioner.config`` (jupyter_client passes
it to the constructor), from Jupyter config (``c.ElasticGPUProvisioner.idle_timeout = 120``), else
from the environment (``HARP_AGENTS``, ``HARP_IDLE_TIMEOUT``, ...), else the defaults.

Lifecycle, as jupyter_client drives it (the contract users learned the hard way):

* ``pre_launch`` starts a fresh per-launch ``KernelLease`` (control socket, keeper, lease client);
  a restart first ends the previous one: the old kernel's lease and parked state are dropped.
* ``launch_kernel`` starts the process and a watchdog: a dead kernel frees its GPU within a second.
* ``cleanup`` ends the launch; it may run twice (shutdown_kernel, then cleanup_resources).
* ``get_provisioner_info``/``load_provisioner_info`` carry the lease and the control socket's
  port and key, so a restarted server takes the running kernel and its lease back.
"""

from __future__ import annotations

import asyncio
import getpass
import os
import secrets
import socket
import sys
from pathlib import Path
from typing import Any

from jupyter_client.connect import KernelConnectionInfo
from jupyter_client.provisioning import LocalProvisioner
from traitlets import Float, TraitError, default

from provisioner import background, local_agents
from provisioner.control import ControlError
from provisioner.keeper_config import KeeperConfig
from provisioner.kernel_lease import KernelLease
from provisioner.lease_record import HeldLease, ParkReason
from provisioner.pool import configured_endpoints, resolve_agents
from provisioner.settings import AgentSettings

#: live provisioners by kernel id (the server extension lists them)
_registry: dict[str, ElasticGPUProvisioner] = {}


def live_provisioners() -> dict[str, ElasticGPUProvisioner]:
    return dict(_registry)


def _env_float(name: str, fallback: float) -> float:
    text = os.environ.get(name, "").strip()
    if not text:
        return fallback
    try:
        return float(text)
    except ValueError:
        raise TraitError(f"{name}={text!r} is not a number of seconds") from None


class ElasticGPUProvisioner(LocalProvisioner, AgentSettings):  # type: ignore[misc]
    idle_timeout = Float(
        help="Seconds without GPU work after which the kernel's GPU is released (its device "
             "state is parked on the agent and restored at the next GPU call); 0 = never. "
             "Default: $HARP_IDLE_TIMEOUT, else 60.",
    ).tag(config=True)
    lease_ttl = Float(
        help="Lease time-to-live asked of the agent; renewed every third of it, so a lease of a "
             "dead server frees its GPU after at most this long. The agent may shorten it. "
             "Default: $HARP_LEASE_TTL, else 30.",
    ).tag(config=True)
    acquire_timeout = Float(
        help="Seconds a GPU call may wait in an agent's queue before it fails; 0 = as long as "
             "it takes. Default: $HARP_ACQUIRE_TIMEOUT, else 0.",
    ).tag(config=True)
    reclaim_after = Float(
        help="Seconds without GPU work after which this kernel's GPU may be taken back for a "
             "kernel waiting in the queue (its device state is parked and restored at its next "
             "GPU call; a running cell is never interrupted). Passed to the agent in the lease "
             "request; the agent's own --reclaim-after caps it. Without waiters only "
             "idle_timeout applies. Default: $HARP_RECLAIM_AFTER, else 3.",
    ).tag(config=True)
    reach_timeout = Float(
        help="Seconds a GPU call keeps asking, with backoff, while no agent of the pool "
             "answers (an agent restarting is back within it) before it fails saying so; the "
             "acquire_timeout instead when that is set. Default: $HARP_REACH_TIMEOUT, else 30.",
    ).tag(config=True)
    park_timeout = Float(
        help="Seconds the kernel has to park its session when asked (idle release); past it the "
             "lease is released at the agent anyway and the agent parks the session itself. "
             "Default: $HARP_PARK_TIMEOUT, else 30.",
    ).tag(config=True)
    park_ttl = Float(
        help="Seconds the agent should keep this kernel's parked state (passed to the agent in "
             "the lease request; the agent's own --park-ttl caps it); 0 = the agent's default. "
             "Default: $HARP_PARK_TTL, else 0.",
    ).tag(config=True)
    park_limit = Float(
        help="Most bytes of parked state the agent should keep for this kernel (passed in the "
             "lease request); 0 = the agent's default. Default: $HARP_PARK_LIMIT, else 0.",
    ).tag(config=True)
    @default("idle_timeout")
    def _idle_timeout_default(self) -> float:
        return _env_float("HARP_IDLE_TIMEOUT", 60.0)

    @default("lease_ttl")
    def _lease_ttl_default(self) -> float:
        return _env_float("HARP_LEASE_TTL", 30.0)

    @default("acquire_timeout")
    def _acquire_timeout_default(self) -> float:
        return _env_float("HARP_ACQUIRE_TIMEOUT", 0.0)

    @default("reclaim_after")
    def _reclaim_after_default(self) -> float:
        return _env_float("HARP_RECLAIM_AFTER", 3.0)

    @default("reach_timeout")
    def _reach_timeout_default(self) -> float:
        return _env_float("HARP_REACH_TIMEOUT", 30.0)

    @default("park_timeout")
    def _park_timeout_default(self) -> float:
        return _env_float("HARP_PARK_TIMEOUT", 30.0)

    @default("park_ttl")
    def _park_ttl_default(self) -> float:
        return _env_float("HARP_PARK_TTL", 0.0)

    @default("park_limit")
    def _park_limit_default(self) -> float:
        return _env_float("HARP_PARK_LIMIT", 0.0)

    # per-launch state; the kernel secret lives as long as the kernel id (restarts keep it)
    _launch: KernelLease | None = None
    _kernel_secret: str | None = None

    # {{{ configuration

    def agent_endpoints(self) -> list[str]:
        """The configured agents, names expanded; ``["auto"]`` for local agents."""
        try:
            return configured_endpoints(self.agents)
        except ValueError as e:
            raise TraitError(str(e)) from None

    async def _resolve_agents(self) -> list[str]:
        """The agents for one acquire."""
        try:
            return await resolve_agents(self.agents, self.token)
        except local_agents.NoLocalGPU as e:
            raise ControlError("GPUUnavailable", str(e)) from None

    def _keeper_config(self) -> KeeperConfig:
        if self._kernel_secret is None:
            self._kernel_secret = secrets.token_urlsafe(24)
        info: dict[str, Any] = {"host": socket.gethostname(),
                                "kernel_name": getattr(self.kernel_spec, "display_name", "")}
        if self.park_ttl > 0:
            info["park_ttl"] = self.park_ttl
        if self.park_limit > 0:
            info["park_limit"] = int(self.park_limit)
        return KeeperConfig(
            kernel_id=str(self.kernel_id), kernel_secret=self._kernel_secret, user=_user(),
            lease_ttl=self.lease_ttl, idle_timeout=self.idle_timeout,
            reclaim_after=self.reclaim_after, acquire_timeout=self.acquire_timeout or None,
            park_timeout=self.park_timeout, reach_timeout=self.reach_timeout, info=info)

    # }}}

    # {{{ lifecycle

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        await self._end_launch()  # a restart: the old kernel's lease and GPU state go
        # a bad setting fails the launch, not a later cell
        endpoints = await asyncio.to_thread(self.agent_endpoints)
        kwargs = await super().pre_launch(**kwargs)
        cmd = list(kwargs.get("cmd") or [])
        if cmd and cmd[0] in ("python", "python3"):
            cmd[0] = sys.executable  # the kernel runs where the shim and its .pth are installed
        kwargs["cmd"] = cmd
        launch = self._new_launch()
        await background.run(launch.start())
        self._launch = launch
        env = kwargs["env"]
        env.update({
            "HARP_SHIM": "1",
            "HARP_CONTROL": str(launch.control.endpoint),
            "HARP_CONTROL_KEY": launch.control.key,
            "HARP_KERNEL_ID": str(self.kernel_id),
            "HARP_AGENTS": ",".join(endpoints),
        })
        if self.token:
            env["HARP_TOKEN"] = self.token
        if self.acquire_timeout > 0:
            env["HARP_ACQUIRE_TIMEOUT"] = f"{self.acquire_timeout:g}"
        if endpoints == ["auto"]:
            background.submit(self._warm_local_agents())
        return kwargs

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> KernelConnectionInfo:
        connection_info = await super().launch_kernel(cmd, **kwargs)
        process, launch = self.process, self._launch
        if launch is not None and process is not None:
            background.loop().call_soon_threadsafe(
                launch.watch, lambda: process.poll() is None)
        _registry[str(self.kernel_id)] = self
        return connection_info

    async def cleanup(self, restart: bool = False) -> None:
        await self._end_launch()
        if not restart:
            _registry.pop(str(self.kernel_id), None)
        await super().cleanup(restart=restart)

    def _new_launch(self) -> KernelLease:
        return KernelLease(self._keeper_config(), self._resolve_agents, self.token)

    async def _end_launch(self) -> None:
        launch, self._launch = self._launch, None
        if launch is not None:
            await background.run(launch.stop())

    async def _warm_local_agents(self) -> None:
        try:
            await self._resolve_agents()  # start them now: the first GPU call needs them
        except Exception as e:
            self.log.warning("harp: local GPU agents: %s", e)

    # }}}

    # {{{ what the server extension uses

    def lease_state(self) -> dict[str, Any]:
        """The kernel's lease state dict (docs/leases-design.md)."""
        launch = self._launch
        if launch is None:
            return {"state": "none", "kernel_id": self.kernel_id, "agent": None,
                    "message": "the kernel is not running"}
        return launch.lease_state()

    async def current_lease_state(self, max_age: float = 1.0) -> dict[str, Any]:
        """lease_state() with the session's figures (memory, idleness) at most ``max_age`` s
        old: asks the agent when they are older."""
        launch = self._launch
        if launch is not None:
            await background.run(launch.refresh(max_age))
        return self.lease_state()

    def latest_profile(self) -> dict[str, Any] | None:
        """The kernel's latest ``%%harp profile`` (display JSON plus ``at``), if any."""
        launch = self._launch
        return launch.latest_profile if launch is not None else None

    async def lease_gpu(self) -> dict[str, Any]:
        """Lease a GPU now, before the kernel's next GPU cell; the lease state once granted or
        queued. ControlError (GPUUnavailable, ...) when no GPU can be leased."""
        launch = self._launch
        if launch is None:
            raise ControlError("NoSuchKernel", "the kernel is not running")
        return await background.run(launch.lease_now())

    async def release_gpu(self) -> bool:
        """Park the kernel's GPU state and release its lease now; False if the kernel is busy."""
        launch = self._launch
        if launch is None:
            return False
        return await background.run(launch.keeper.release(ParkReason.RELEASE))

    async def detach(self) -> None:
        """Stop serving the kernel's lease and control socket without ending the lease, so
        another server process can take both over with ``load_provisioner_info`` (call
        ``get_provisioner_info`` first). The lease expires unless the new owner renews it."""
        launch, self._launch = self._launch, None
        if launch is not None:
            await background.run(launch.detach())
        _registry.pop(str(self.kernel_id), None)

    # }}}

    # {{{ persistence: a restarted server takes the kernel and its lease back

    async def get_provisioner_info(self) -> dict[str, Any]:
        info = await super().get_provisioner_info()
        launch = self._launch
        keeper = launch.keeper if launch is not None else None
        lease = keeper.lease if keeper is not None else None
        info["harp"] = {
            "kernel_secret": self._kernel_secret,
            "control_port": launch.control.port if launch is not None else None,
            "control_key": launch.control.key if launch is not None else None,
            "lease": None if lease is None else {
                "agent": lease.agent, "lease_id": lease.lease_id, "token": lease.token,
                "ttl": lease.ttl, "granted_at": lease.granted_at},
            "parked_at": keeper.parked_at if keeper is not None else None,
            "agents_seen": sorted(keeper.agents_seen) if keeper is not None else [],
        }
        return info

    async def load_provisioner_info(self, provisioner_info: dict) -> None:
        await super().load_provisioner_info(provisioner_info)
        harp = provisioner_info.get("harp") or {}
        self._kernel_secret = harp.get("kernel_secret") or self._kernel_secret
        await self._end_launch()
        if not harp.get("control_port"):
            return
        saved = harp.get("lease")
        lease = None if not saved else HeldLease(
            saved["agent"], saved["lease_id"], saved["token"], float(saved["ttl"]),
            saved.get("granted_at"))
        launch = self._new_launch()
        await background.run(launch.start(control_port=int(harp["control_port"]),
                                          control_key=harp.get("control_key"), lease=lease,
                                          parked_at=harp.get("parked_at"),
                                          agents_seen=harp.get("agents_seen")))
        self._launch = launch
        pid = self.pid
        if pid:
            background.loop().call_soon_threadsafe(launch.watch, lambda: _pid_alive(pid))
        _registry[str(self.kernel_id)] = self

    # }}}


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a kernel this process did not start: no Popen to poll).
    A zombie counts as dead: it runs no code, it only waits for its parent to reap it."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc (macOS): signal 0 is all we can know
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


def _user() -> str:
    try:
        return os.environ.get("JUPYTERHUB_USER") or getpass.getuser()
    except Exception:
        return ""
