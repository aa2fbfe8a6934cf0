"""Kernel ``printf`` output for the user's stdout (issue 12), the shim's half.

The agent's worker captures the text CUDA flushes to its stdout at a synchronize and sends it in
the next reply as ``"out": "<text>"``. The transport calls ``note_reply_output(reply)`` for every
reply, in order, on whatever thread receives it; the session calls ``flush_kernel_output()`` at
each sync point on the user's thread, before it raises any deferred error, so the text lands in
the running cell (ipykernel routes a user thread's stdout to its cell) in the order it came.
"""

from __future__ import annotations

import sys
import threading
from typing import Any

_lock = threading.Lock()
#: text not written yet (a sync point looks before it calls ``flush_kernel_output``)
pending: list[str] = []


def note_reply_output(reply: dict[str, Any]) -> None:
    """Keep the ``out`` text of a reply (any thread), in arrival order."""
    text = reply.get("out")
    if isinstance(text, str) and text:
        with _lock:
            pending.append(text)


def flush_kernel_output() -> None:
    """Write the kept text to ``sys.stdout`` now (the user's thread, at a sync point)."""
    with _lock:
        if not pending:
            return
        text = "".join(pending)
        pending.clear()
    sys.stdout.write(text)
    sys.stdout.flush()
