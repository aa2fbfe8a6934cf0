"""What a worker knows of its one session: the memory it mapped and the objects it created.

``SessionLog`` keeps the calls that created (and configured) the session's live device objects,
so that a parked session can be recreated in a fresh worker, on this agent or another: park
writes the log into the parked state's manifest, restore replays it. Which op creates, configures
or destroys which kind of object comes from ``protocol.OPS`` and nowhere else.
"""

from __future__ import annotations

from typing import Any

from gpu_agent import protocol as P

#: the order objects are recreated in (functions need their module; the context's limits come
#: first, as the malloc heap's size must be set before a kernel that uses it is launched)
_REPLAY_ORDER = {"limit": -1, "module": 0, "function": 1, "stream": 2, "event": 2, "kernel": 2}


class SessionLog:
    """(kind, handle) -> the calls that made that object what it is, in order."""

    def __init__(self) -> None:
        self._calls: dict[tuple[str, int], list[list[Any]]] = {}

    def __len__(self) -> int:
        return len(self._calls)

    def record(self, name: str, args: list[Any]) -> None:
        """Note a call that ran, if it creates, configures or destroys a device object."""
        op = P.OPS[name]
        if op.creates is not None:
            self._calls[(op.creates, args[0])] = [[name, *_portable(args)]]
        elif op.configures is not None:
            calls = self._calls.get((op.configures, args[0]))
            if calls is not None:
                calls.append([name, *_portable(args)])
        elif op.destroys is not None:
            self._calls.pop((op.destroys, args[0]), None)
            if op.destroys == "module":
                for key, calls in list(self._calls.items()):
                    if key[0] == "function" and calls[0][2] == args[0]:
                        del self._calls[key]

    def replay_calls(self) -> list[list[Any]]:
        """The log as calls, modules before functions before the rest."""
        keys = sorted(self._calls, key=lambda k: (_REPLAY_ORDER.get(k[0], 3), k[1]))
        return [call for key in keys for call in self._calls[key]]


def _portable(args: list[Any]) -> list[Any]:
    # frame buffers are only valid during the call: keep bytes
    return [bytes(a) if isinstance(a, memoryview) else a for a in args]
