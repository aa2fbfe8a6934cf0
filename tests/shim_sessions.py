"""What the shim's lease tests share: a script-like session (the shim's RemoteSession with the
lease source a kernel without a provisioner uses), putting and getting arrays through it, and
polling for a condition with a deadline."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from harp_jupyter.shim.lease import DirectLeaseSource
from harp_jupyter.shim.session import RemoteSession
from tests.agent_client import wait_for


def eventually(check: Callable[[], Any], timeout: float = 30) -> Any:
    """``check()``'s first truthy value, polled until ``timeout`` seconds have passed."""
    return wait_for(check, timeout)


@contextmanager
def script_session(endpoints: list[str]) -> Iterator[tuple[RemoteSession, DirectLeaseSource]]:
    """A session leasing from ``endpoints`` as ``harp run`` does; closed (bye) after."""
    source = DirectLeaseSource(endpoints)
    session = RemoteSession(endpoints[0], lease_source=source)
    source.holder = session
    try:
        yield session, source
    finally:
        session.close()
        source.close()


def put(session: RemoteSession, data: np.ndarray) -> int:
    """Device memory holding ``data`` (synchronised); its address."""
    addr = session.alloc(data.nbytes)
    session.htod(addr, data)
    session.synchronize()
    return addr


def get(session: RemoteSession, addr: int, like: np.ndarray) -> np.ndarray:
    """The array shaped like ``like`` at ``addr``."""
    out = np.empty_like(like)
    session.dtoh_into(out, addr)
    return out
