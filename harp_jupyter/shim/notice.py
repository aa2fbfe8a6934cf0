"""WaitNotice: tells the user, once, that their cell waits for a GPU, and updates it in place.

In a Jupyter kernel it is one display output updated as the queue position moves; elsewhere a
line on stderr per change.
"""

from __future__ import annotations

import sys
import time
from typing import Any


def _in_kernel() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


class WaitNotice:
    def __init__(self) -> None:
        self._started = time.monotonic()
        self._handle: Any = None
        self._last: str | None = None

    @property
    def shown(self) -> bool:
        return self._last is not None

    def update(self, state: str, position: int | None = None, agent: str | None = None) -> None:
        if state == "queued":
            where = f" at {agent}" if agent else ""
            goes_on = ("The cell goes on as soon as it is granted (%harp status shows the lease)."
                       if _in_kernel() else "The script goes on as soon as it is granted.")
            text = f"Waiting for a GPU: position {position} in the queue{where}. {goes_on}"
        elif state == "restoring":
            text = f"Restoring this kernel's GPU state on {agent}..."
        else:
            return  # acquiring on a free GPU takes milliseconds: nothing worth showing
        self._show(text)

    def done(self, agent: str) -> None:
        if self._last is not None:
            waited = time.monotonic() - self._started
            self._show(f"Got a GPU on {agent} after waiting {waited:.1f} s.")

    def _show(self, text: str) -> None:
        if text == self._last:
            return
        first = self._last is None
        self._last = text
        if _in_kernel():
            from IPython.display import display

            if first:
                self._handle = display({"text/plain": text}, raw=True, display_id=True)
            elif self._handle is not None:
                self._handle.update({"text/plain": text}, raw=True)
        else:
            print(f"harp: {text}", file=sys.stderr, flush=True)
