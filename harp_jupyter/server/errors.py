"""The errors the sidebar API answers with: one kind, a message, and what to do about it."""

from __future__ import annotations


class HarpAPIError(Exception):
    """An error for the client: HTTP ``status`` and the JSON body
    ``{"error": {"kind", "message", "hint"}}`` (docs/sidebar-api.md)."""

    def __init__(self, status: int, kind: str, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.status, self.kind, self.message, self.hint = status, kind, message, hint

    def to_json(self) -> dict[str, dict[str, str]]:
        return {"error": {"kind": self.kind, "message": self.message, "hint": self.hint}}


def no_such_kernel(kernel_id: str) -> HarpAPIError:
    return HarpAPIError(404, "NoSuchKernel", f"no running Elastic GPU kernel {kernel_id!r} on "
                        "this server", "refresh the list: the kernel may have been shut down")


def gpu_unavailable(message: str) -> HarpAPIError:
    return HarpAPIError(503, "GPUUnavailable", message,
                        "check that the GPU agents named by HARP_AGENTS are running "
                        "(harp-agent) and reachable from this server")
