"""CallErrors: the errors a session's calls met on the agent, held until the next sync point.

Calls are queued and return at once, so an error the agent reports in a batch's reply is kept
here: the first one is raised at the next sync point as the pycuda exception of its kind, naming
the call and the user's line; later ones are counted in its message. An error that ends the
session (its context is gone, the agent could not restore it) is ``lost``: every later use of the
session raises it.
"""

from __future__ import annotations

import threading
from typing import Any

from harp_jupyter.shim.batch import CallMeta
from harp_jupyter.shim.errors import Error, error_from_agent
from harp_jupyter.shim.kernel_output import flush_kernel_output
from harp_jupyter.shim.notice import in_kernel

#: why earlier sessions of this process were lost (their arrays are gone), newest last
lost_sessions: list[str] = []


class CallErrors:
    """The first error since the last sync point, how many came after it, and the loss."""

    def __init__(self, lock: threading.RLock) -> None:
        self._lock = lock
        self.first: Error | None = None
        self.later = 0
        self.lost: Error | None = None

    def note(self, error: Error) -> None:
        if self.first is None:
            self.first = error
        else:
            self.later += 1

    def from_reply(self, meta: CallMeta | None, error: dict[str, Any]) -> None:
        """A batch's reply reported ``error`` for the call ``meta`` (None: not one call's)."""
        if self.first is not None:
            self.later += 1
            return
        op, site = (meta[0], meta[1]) if meta is not None else (None, None)
        first = self.first = error_from_agent(error, op, site)
        if error.get("kind") == "ContextLost":
            # the worker ends with its context: the next GPU call starts a fresh session
            self.lost = first
        if error.get("kind") == "HandleError" and lost_sessions:
            who, again = (("kernel", "re-run the cells that create them") if in_kernel()
                          else ("program", "create them again"))
            first.args = (
                f"{first.args[0]}\n  This {who} lost an earlier GPU session "
                f"({lost_sessions[-1]}); device arrays and pointers made before that are "
                f"gone: {again}.",)

    def raise_first(self) -> None:
        """Raise (and clear) the first error recorded since the last sync point, if any; what
        kernels printed comes out first, as it would locally after a synchronize."""
        flush_kernel_output()
        with self._lock:
            error, self.first = self.first, None
            later, self.later = self.later, 0
        if error is not None:
            if later:
                error.args = (f"{error.args[0]}\n  ({later} later error{'s' if later > 1 else ''}"
                              " before this sync point not shown)",)
            raise error
