"""The Elastic GPU kernels of this server and their leases, as the sidebar sees them.

Knows jupyter_server's kernel and session managers only through the few calls it makes, and
nothing of tornado: the handlers are thin wrappers (docs/sidebar-api.md).
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from harp_jupyter.server.errors import HarpAPIError, gpu_unavailable, no_such_kernel
from provisioner.control import ControlError
from provisioner.elastic import ElasticGPUProvisioner


class ElasticKernels:
    def __init__(self, kernel_manager: Any, session_manager: Any) -> None:
        self.kernel_manager = kernel_manager
        self.session_manager = session_manager

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
        return [k for k in found if isinstance(k, dict)]

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
        return await self.describe(kernel_id, await self.notebook_paths())

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
        return await self.describe(kernel_id, await self.notebook_paths())
