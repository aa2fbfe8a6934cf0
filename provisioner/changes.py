"""Lease changes of every Elastic GPU kernel in this process, for whoever listens.

Each kernel's LeaseKeeper publishes its ``lease_state()`` (plus ``previous``) at each state or
queue-position change; the jupyter_server extension subscribes and turns them into events for
the lab. Listeners run on the provisioners' background loop thread and must not block: hand the
change to your own loop (``IOLoop.add_callback`` is thread-safe).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger("harp.provisioner.changes")

Listener = Callable[[dict[str, Any]], None]

_listeners: list[Listener] = []
_lock = threading.Lock()


def subscribe(listener: Listener) -> Callable[[], None]:
    """Call ``listener(change)`` at every lease change; returns the unsubscribe function."""
    with _lock:
        _listeners.append(listener)

    def unsubscribe() -> None:
        with _lock:
            if listener in _listeners:
                _listeners.remove(listener)

    return unsubscribe


def publish(change: dict[str, Any]) -> None:
    with _lock:
        listeners = list(_listeners)
    for listener in listeners:
        try:
            listener(change)
        except Exception:  # one broken listener must not silence the others
            log.exception("lease change listener failed")
