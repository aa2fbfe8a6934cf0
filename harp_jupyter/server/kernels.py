"""The Elastic GPU kernels of this server and their leases, as the sidebar sees them.

Knows jupyter_server's kernel and session managers only through the few calls it makes, and
nothing of tornado: the handlers are thin wrappers (docs/sidebar-api.md).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from typing import Any

from harp_jupyter.server.errors import HarpAPIError, gpu_unavailable, no_such_kernel
from provisioner.control import ControlError
from provisioner.elastic import ElasticGPUProvisioner

#: agent endpoints -> {endpoint: {kernel id: bytes parked there}} (PoolView.parked_by_kernel)
ParkedSource = Callable[[list[str]], Awaitable[dict[str, dict[str, int]]]]


class ElasticKernels:
    def __init__(self, kernel_manager: Any, session_manager: Any,
                 parked_source: ParkedSource | None = None) -> None:
        self.kernel_manager = kernel_manager
        self.session_manager = session_manager
        self.parked_source = parked_source

    def provisioner(self, kernel_id: str) -> ElasticGPUProvisioner:
        if kernel_id not in self.kernel_manager.list_kernel_ids():
            raise no_such_kernel(kernel_id)
        found = getattr(self.kernel_manager.get_kernel(kernel_id), "provisioner", None)
        if not isinstance(found, ElasticGPUProvisioner):
            raise no_such_kernel(kernel_id)
        return found

    async def notebook_paths(self) -> dict[str, str]:
        """kernel id -> the path of the notebook (or console) session using it."""
        sessions = await self.session_manager.list_sessions()
        return {s["kernel"]["id"]: s["path"] for s in sessions
                if isinstance(s.get("kernel"), dict) and s.get("path")}

    async def list(self) -> list[dict[str, Any]]:
        paths = await self.notebook_paths()
        found = await asyncio.gather(*(self.describe(kernel_id, paths) for kernel_id in
                                       self.kernel_manager.list_kernel_ids()),
                                     return_exceptions=True)
        for failure in found:
            if isinstance(failure, BaseException) and not isinstance(failure, HarpAPIError):
                raise failure  # HarpAPIError: another kernelspec, or it just went away
        kernels = [k for k in found if isinstance(k, dict)]
        await self._parked_bytes_from_agents(kernels)
        return kernels

    async def _parked_bytes_from_agents(self, kernels: list[dict[str, Any]]) -> None:
        """A kernel's parked bytes as its agent has them parked. The kernel's keeper knows them
        only when the kernel parked itself (Release, idle timeout); when the agent parked it (a
        reclaim for a waiting kernel) the keeper has 0, or the figure of an earlier park. A held
        kernel with no device bytes yet may still have its state parked there (leased from the
        sidebar: its next GPU call restores it), which the card says rather than "0 B". An
        agent that does not answer leaves the keeper's figure."""
        parked = [k for k in kernels if k.get("agent") and (
            k.get("state") == "parked" or (k.get("state") == "held" and not k.get("memory_used")))]
        if not parked or self.parked_source is None:
            return
        try:
            at_agents = await self.parked_source(sorted({str(k["agent"]) for k in parked}))
        except Exception:  # the figure stays the keeper's; the listing must not fail for it
            return
        for kernel in parked:
            nbytes = at_agents.get(str(kernel["agent"]), {}).get(str(kernel["kernel_id"]))
            if nbytes is not None:
                kernel["parked_bytes"] = nbytes

    async def describe(self, kernel_id: str, paths: dict[str, str]) -> dict[str, Any]:
        provisioner = self.provisioner(kernel_id)
        known = provisioner.lease_state()
        # a lease granted a moment ago reports the session as the agent had it before the
        # kernel restored its parked memory (0 B): ask the agent again rather than show that
        stale = known.get("state") == "held" and not known.get("memory_used")
        state = await provisioner.current_lease_state(max_age=0.0 if stale else 1.0)
        kernel = self.kernel_manager.get_kernel(kernel_id)
        path = paths.get(kernel_id)
        spec = getattr(provisioner, "kernel_spec", None)
        return {
            **state,
            "kernel_id": kernel_id,
            "path": path,
            "name": os.path.basename(path) if path else getattr(spec, "display_name", None),
            "execution_state": getattr(kernel, "execution_state", "unknown"),
            "profile_at": (provisioner.latest_profile() or {}).get("at"),
        }

    async def lease(self, kernel_id: str) -> dict[str, Any]:
        provisioner = self.provisioner(kernel_id)
        try:
            await provisioner.lease_gpu()
        except ControlError as e:
            if e.kind == "NoSuchKernel":
                raise no_such_kernel(kernel_id) from None
            raise gpu_unavailable(e.msg) from None
        return await self.describe_one(kernel_id)

    async def describe_one(self, kernel_id: str) -> dict[str, Any]:
        kernel = await self.describe(kernel_id, await self.notebook_paths())
        await self._parked_bytes_from_agents([kernel])
        return kernel

    def profile(self, kernel_id: str) -> dict[str, Any]:
        found = self.provisioner(kernel_id).latest_profile()
        if found is None:
            raise HarpAPIError(404, "NoProfile", "this kernel has not been profiled yet",
                               "run a cell with %%harp profile in its notebook")
        return found

    async def release(self, kernel_id: str) -> dict[str, Any]:
        """Park and release; a kernel holding nothing is left as it is (nothing to do)."""
        provisioner = self.provisioner(kernel_id)
        if provisioner.lease_state().get("state") == "held":
            released = await provisioner.release_gpu()
            if not released and provisioner.lease_state().get("state") == "held":
                raise HarpAPIError(
                    409, "KernelBusy", "the kernel is running GPU work and keeps its GPU until "
                    "that work ends", "release it when the cell has finished, or interrupt the "
                    "kernel first")
        return await self.describe_one(kernel_id)
