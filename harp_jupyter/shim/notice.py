"""What a cell tells its user about the GPU lease.

``WaitNotice`` tells, once, that the cell waits for a GPU, and updates it in place: in a Jupyter
kernel one display output updated as the queue position moves; elsewhere a line on stderr per
change. ``tell_next_cell`` keeps a note about something that happened between cells (the agent
took the idle GPU back for a waiting notebook) until ``show_pending`` shows it, once: at the start
of the next cell (the magics extension's ``pre_run_cell`` hook) or, in a script, at its next
acquire.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any


def reclaimed() -> str:
    """The note a kernel (or a script) whose GPU the agent reclaimed shows at its next cell (or
    its next acquire)."""
    return (f"This {'kernel' if in_kernel() else 'program'}'s GPU was parked while idle because "
            "another notebook was waiting. Its device memory is kept: the next GPU call leases a "
            "GPU again (queueing like anyone else if none is free) and restores it.")


_pending: list[str] = []
_pending_lock = threading.Lock()


def tell_next_cell(text: str) -> None:
    """A lease source, when something happened to the GPU between cells; shown once."""
    with _pending_lock:
        if text not in _pending:
            _pending.append(text)


def show_pending() -> None:
    """Show the notes kept by ``tell_next_cell`` and forget them (pre_run_cell, acquire)."""
    with _pending_lock:
        texts = list(_pending)
        _pending.clear()
    for text in texts:
        say(text)


def say(text: str) -> None:
    """Show ``text`` to the user now: a display output in a kernel, a line on stderr in a
    script."""
    if in_kernel():
        from IPython.display import display

        display({"text/plain": text}, raw=True)
    else:
        print(f"harp: {text}", file=sys.stderr, flush=True)


def in_kernel() -> bool:
    """Whether this runs in a Jupyter kernel (cells, displays), not a plain script."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


class WaitNotice:
    def __init__(self) -> None:
        show_pending()  # a script has no cells: its next acquire is where it hears
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
                       if in_kernel() else "The script goes on as soon as it is granted.")
            text = f"Waiting for a GPU: position {position} in the queue{where}. {goes_on}"
        elif state == "unreachable":
            text = (f"Waiting for a GPU agent to answer at {agent}: none answered yet (is "
                    "harp-agent running there?). Asking again.")
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
        if in_kernel():
            from IPython.display import display

            if first:
                self._handle = display({"text/plain": text}, raw=True, display_id=True)
            elif self._handle is not None:
                self._handle.update({"text/plain": text}, raw=True)
        else:
            print(f"harp: {text}", file=sys.stderr, flush=True)
