"""Lease changes onto jupyter_server's event bus, where the lab's event stream picks them up."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from provisioner import changes

LEASE_EVENT_SCHEMA_ID = "https://harp-jupyter.dev/events/lease"
LEASE_EVENT_SCHEMA = Path(__file__).parent / "schemas" / "lease-v1.yaml"
_FIELDS = ("kernel_id", "state", "previous", "agent", "gpu", "emulated", "position", "message",
           "parked_reason", "reclaim_after", "profile_at")


class LeaseEvents:
    """Subscribes to the provisioners' lease changes (they happen on the provisioners' loop
    thread) and emits each as an event from the server's own loop."""

    def __init__(self, event_logger: Any, io_loop: Any) -> None:
        self.event_logger = event_logger
        self.io_loop = io_loop
        self._unsubscribe: Callable[[], None] | None = None

    def start(self) -> None:
        self.event_logger.register_event_schema(LEASE_EVENT_SCHEMA)
        self._unsubscribe = changes.subscribe(self._on_change)

    def stop(self) -> None:
        unsubscribe, self._unsubscribe = self._unsubscribe, None
        if unsubscribe is not None:
            unsubscribe()

    def _on_change(self, change: dict[str, Any]) -> None:
        self.io_loop.add_callback(self._emit, change)  # thread-safe, unlike emit

    def _emit(self, change: dict[str, Any]) -> None:
        data = {k: change[k] for k in _FIELDS if k in change}
        data["message"] = str(data.get("message") or "")
        self.event_logger.emit(schema_id=LEASE_EVENT_SCHEMA_ID, data=data)
