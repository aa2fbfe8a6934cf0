"""pycuda.elementwise, forwarded: user ElementwiseKernels are compiled and run on the agent."""

from __future__ import annotations

from typing import Any

from harp_jupyter.shim.errors import Error, without_shim_frames
from harp_jupyter.shim.pycuda.gpuarray import GPUArray, _operand, _stream_handle
from harp_jupyter.shim.pycuda.tools import user_dtypes
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
            handle = session.new_handle()
            # pycuda compiles at the first call: a compile error is raised there, not later
            session.call_sync("elementwise_new", handle, self.arguments, self.operation,
                              self.name, {**self._options, "dtypes": user_dtypes()})
            self._handles[id(session)] = handle
        return handle

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        __tracebackhide__ = True  # IPython hides frames that set it
        try:
            self._call(args, kwargs)
        except Error as e:
            e.__traceback__ = without_shim_frames(e.__traceback__)
            raise

    def _call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        session = get_session()
        rng = kwargs.pop("range", None)
        slice_ = kwargs.pop("slice", None)
        stream = kwargs.pop("stream", None)
        if kwargs:
            raise TypeError(f"unknown keyword arguments: {', '.join(kwargs)}")
        span = None
        if slice_ is not None:
            if rng is not None:
                raise TypeError("may not specify both range and slice keyword arguments")
            # as pycuda: a slice is resolved against the first array's size (negative ends)
            size = next(a.size for a in args if isinstance(a, GPUArray))
            span = list(slice_.indices(size))
        elif rng is not None:
            span = [int(rng.start or 0), int(rng.stop), int(1 if rng.step is None else rng.step)]
        session.call("elementwise_call", self._handle(session), [_operand(a) for a in args],
                     span, _stream_handle(stream))
