"""NVTX ranges of the user's code onto the timeline, and on to the agent.

While a profile runs, ``nvtx.push_range``/``pop_range`` and ``nvtx.annotate`` (as a context
manager) are wrapped: each range is recorded, and, when the session is connected to an agent,
also opened there (``nvtx_push`` in the call stream, in order with the GPU work) so Nsight
Systems on the GPU server shows it. A name bound before the profile started
(``from nvtx import push_range``) or an ``@nvtx.annotate`` decorator applied earlier is not
seen: use ``nvtx.push_range`` or ``with nvtx.annotate(...)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from harp_jupyter.profiler.recorder import Recorder
from harp_jupyter.shim.callsite import user_call_site


class NvtxHook:
    def __init__(self, recorder: Recorder, forward: Callable[[str], bool],
                 close: Callable[[], None]) -> None:
        """``forward(name)`` opens the range on the agent (True if it did), ``close()`` closes
        the innermost one forwarded."""
        self.recorder = recorder
        self.forward, self.close = forward, close
        self._forwarded: list[bool] = []
        self._saved: list[tuple[Any, str, Any]] = []

    def push(self, message: Any) -> None:
        name = str(getattr(message, "string", message) or "range")
        self.recorder.nvtx_push(name, user_call_site(3))
        self._forwarded.append(self.forward(name))

    def pop(self) -> None:
        self.recorder.nvtx_pop()
        if self._forwarded and self._forwarded.pop():
            self.close()

    def install(self) -> bool:
        """Wrap the nvtx package's entry points; False when it is not installed."""
        try:
            import nvtx
            import nvtx.nvtx as nvtx_module
        except ImportError:
            return False
        hook = self
        push_range, pop_range = nvtx.push_range, nvtx.pop_range

        def wrapped_push(message: Any = None, *args: Any, **kwargs: Any) -> Any:
            hook.push(message)
            return push_range(message, *args, **kwargs)

        def wrapped_pop(*args: Any, **kwargs: Any) -> Any:
            result = pop_range(*args, **kwargs)
            hook.pop()
            return result

        enter, exit_ = nvtx.annotate.__enter__, nvtx.annotate.__exit__

        def wrapped_enter(self: Any) -> Any:
            hook.push((getattr(self, "init_args", None) or ("annotate",))[0] or "annotate")
            return enter(self)

        def wrapped_exit(self: Any, *exc: Any) -> Any:
            result = exit_(self, *exc)
            hook.pop()
            return result

        for owner, name, value in ((nvtx, "push_range", wrapped_push),
                                   (nvtx, "pop_range", wrapped_pop),
                                   (nvtx_module, "push_range", wrapped_push),
                                   (nvtx_module, "pop_range", wrapped_pop),
                                   (nvtx.annotate, "__enter__", wrapped_enter),
                                   (nvtx.annotate, "__exit__", wrapped_exit)):
            self._saved.append((owner, name, owner.__dict__[name] if isinstance(owner, type)
                                else getattr(owner, name)))
            setattr(owner, name, value)
        return True

    def uninstall(self) -> None:
        while self._saved:
            owner, name, value = self._saved.pop()
            setattr(owner, name, value)
