"""One thin handler per endpoint of docs/sidebar-api.md over a shared error-mapping base."""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from typing import Any

from jupyter_server.auth.decorator import authorized
from jupyter_server.base.handlers import APIHandler
from jupyter_server.utils import url_path_join
from tornado import web

from harp_jupyter.server.errors import HarpAPIError
from harp_jupyter.server.kernels import ElasticKernels
from harp_jupyter.server.pool import PoolView

log = logging.getLogger("harp.server")

KERNEL_ID = r"(?P<kernel_id>[\w-]+)"


class HarpHandler(APIHandler):  # type: ignore[misc]
    auth_resource = "kernels"  # the sidebar reads and steers kernels

    @property
    def kernels(self) -> ElasticKernels:
        return self.settings["harp_kernels"]  # type: ignore[no-any-return]

    @property
    def pool(self) -> PoolView:
        return self.settings["harp_pool"]  # type: ignore[no-any-return]

    async def answer(self, work: Awaitable[dict[str, Any]]) -> None:
        """Finish with ``work``'s JSON, or with the error JSON of docs/sidebar-api.md."""
        try:
            body = await work
        except HarpAPIError as e:
            self.set_status(e.status)
            self.finish(e.to_json())
            return
        except Exception as e:
            log.exception("harp: %s %s failed", self.request.method, self.request.path)
            error = HarpAPIError(500, "InternalError", f"{type(e).__name__}: {e}",
                                 "this is a bug; the Jupyter server's log has the traceback")
            self.set_status(500)
            self.finish(error.to_json())
            return
        self.finish(body)


class KernelsHandler(HarpHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        async def listing() -> dict[str, Any]:
            return {"kernels": await self.kernels.list(), "agents": self.pool.configured(),
                    "problem": self.pool.problem()}

        await self.answer(listing())


class KernelLeaseHandler(HarpHandler):
    @web.authenticated
    @authorized
    async def post(self, kernel_id: str) -> None:
        async def lease() -> dict[str, Any]:
            return {"kernel": await self.kernels.lease(kernel_id)}

        await self.answer(lease())


class KernelReleaseHandler(HarpHandler):
    @web.authenticated
    @authorized
    async def post(self, kernel_id: str) -> None:
        async def release() -> dict[str, Any]:
            return {"kernel": await self.kernels.release(kernel_id)}

        await self.answer(release())


class KernelProfileHandler(HarpHandler):
    @web.authenticated
    @authorized
    async def get(self, kernel_id: str) -> None:
        async def profile() -> dict[str, Any]:
            return {"profile": self.kernels.profile(kernel_id)}

        await self.answer(profile())


class PoolHandler(HarpHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        async def snapshot() -> dict[str, Any]:
            return await self.pool.snapshot(await self.kernels.notebook_paths())

        await self.answer(snapshot())


def routes(base_url: str) -> list[tuple[str, type[HarpHandler]]]:
    api = url_path_join(base_url, "harp", "api")
    return [
        (url_path_join(api, "kernels"), KernelsHandler),
        (url_path_join(api, "kernels", KERNEL_ID, "lease"), KernelLeaseHandler),
        (url_path_join(api, "kernels", KERNEL_ID, "release"), KernelReleaseHandler),
        (url_path_join(api, "kernels", KERNEL_ID, "profile"), KernelProfileHandler),
        (url_path_join(api, "pool"), PoolHandler),
    ]
