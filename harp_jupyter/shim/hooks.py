"""Hooks that layers above the shim install into it, so that the shim never imports them.

The shim is the lowest layer of harp_jupyter (it runs in every kernel, before anything else is
imported); the profiler sits above it and sets these while a ``%%harp profile`` records.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

#: lease_span(name, start_ns, end_ns, **args): a span on the profile's "lease" track (acquire,
#: hello, restore, park), in ``time.monotonic_ns()``; None while no profile records
lease_span: Callable[..., None] | None = None


def note_lease_span(name: str, start_ns: int, end_ns: int, **args: Any) -> None:
    """The session, at each acquire, hello, restore and park."""
    hook = lease_span
    if hook is not None:
        hook(name, start_ns, end_ns, **args)
