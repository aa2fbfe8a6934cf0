"""pycuda.elementwise, forwarded: user ElementwiseKernels are compiled and run on the agent."""

from __future__ import annotations

from typing import Any

from harp_jupyter.shim.pycuda.gpuarray import GPUArray, _operand, _stream_handle
from harp_jupyter.shim.session import RemoteSession, get_session


class ElementwiseKernel:
    def __init__(self, arguments: str | list[Any], operation: str, name: str = "kernel",
                 keep: bool = False, options: list[str] | None = None, preamble: str = "",
                 loop_prep: str = "", after_loop: str = "") -> None:
        if not isinstance(arguments, str):
            arguments = ", ".join(arg.declarator() for arg in arguments)
        self.arguments, self.operation, self.name = arguments, operation, name
        self._options = {"options": list(options or []), "preamble": preamble,
                         "loop_prep": loop_prep, "after_loop": after_loop}
        self._handles: dict[int, int] = {}  # per session: created lazily, once

    def _handle(self, session: RemoteSession) -> int:
        handle = self._handles.get(id(session))
        if handle is None:
            handle = self._handles[id(session)] = session.new_handle()
            session.call("elementwise_new", handle, self.arguments, self.operation, self.name,
                         self._options)
        return handle

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        session = get_session()
        rng = kwargs.pop("range", None)
        slice_ = kwargs.pop("slice", None)
        stream = kwargs.pop("stream", None)
        if kwargs:
            raise TypeError(f"unknown keyword arguments: {', '.join(kwargs)}")
        span = rng if rng is not None else slice_
        if span is not None:
            start, stop, step = span.start or 0, span.stop, span.step or 1
            if stop is None:
                stop = next(a.size for a in args if isinstance(a, GPUArray))
            span = [int(start), int(stop), int(step)]
        session.call("elementwise_call", self._handle(session), [_operand(a) for a in args],
                     span, _stream_handle(stream))
