"""The provisioners' event loop: one daemon thread per process runs every lease keeper, control
socket and lease client.

Why not the kernel manager's loop: jupyter_client's synchronous ``KernelManager`` runs each call
with ``run_until_complete``, so between calls nothing on that loop runs: no lease renewals, no
answers on the control socket, no watchdog. And ``asyncio.run`` per test or per script would leave
zmq.asyncio sockets bound to a closed loop. A loop of our own runs whatever the caller does; the
provisioner's async methods await its work with ``run`` from any loop, or none.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

_loop: asyncio.AbstractEventLoop | None = None
_lock = threading.Lock()


def loop() -> asyncio.AbstractEventLoop:
    """The background loop, started on first use."""
    global _loop
    with _lock:
        if _loop is None or _loop.is_closed():
            _loop = asyncio.new_event_loop()
            threading.Thread(target=_loop.run_forever, name="harp-provisioner", daemon=True
                             ).start()
        return _loop


def submit(coroutine: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
    """Schedule ``coroutine`` on the background loop (from any thread)."""
    return asyncio.run_coroutine_threadsafe(coroutine, loop())


async def run(coroutine: Coroutine[Any, Any, T]) -> T:
    """Await ``coroutine`` run on the background loop, from whatever loop the caller is on."""
    target = loop()
    try:
        if asyncio.get_running_loop() is target:
            return await coroutine
    except RuntimeError:  # pragma: no cover - run() is always awaited inside a loop
        pass
    return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coroutine, target))


def call(coroutine: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
    """Run ``coroutine`` on the background loop and block for its result (sync callers only:
    never from the background loop itself, which would wait on itself)."""
    if _loop is not None and _running_loop() is _loop:
        coroutine.close()
        raise RuntimeError("call() on the background loop would deadlock: await run() instead")
    return submit(coroutine).result(timeout)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _forget_in_child() -> None:
    # a forked child has the loop object but not its thread: it starts its own on first use
    global _loop, _lock
    _loop = None
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_in_child)
