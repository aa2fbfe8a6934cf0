"""pycuda.reduction, forwarded: user ReductionKernels are compiled and run on the agent."""

from __future__ import annotations

from typing import Any

import numpy as np

from gpu_agent.protocol import dtype_text
from harp_jupyter.shim.pycuda.gpuarray import GPUArray, _operand, _stream_handle
from harp_jupyter.shim.pycuda.tools import user_dtypes
from harp_jupyter.shim.session import RemoteSession, get_session


class ReductionKernel:
    def __init__(self, dtype_out: Any, neutral: str, reduce_expr: str,
                 map_expr: str | None = None, arguments: str | None = None,
                 name: str = "reduce_kernel", keep: bool = False,
                 options: list[str] | None = None, preamble: str = "",
                 allocator: Any = None) -> None:
        self.dtype_out = np.dtype(dtype_out)
        self.neutral, self.reduce_expr = str(neutral), reduce_expr
        self.map_expr, self.arguments = map_expr or "", arguments or ""
        self.allocator = allocator
        self._options = {"name": name, "options": list(options or []), "preamble": preamble}
        self._handles: dict[int, int] = {}

    def _handle(self, session: RemoteSession) -> int:
        handle = self._handles.get(id(session))
        if handle is None:
            handle = self._handles[id(session)] = session.new_handle()
            session.call("reduction_new", handle, dtype_text(self.dtype_out), self.neutral,
                         self.reduce_expr, self.map_expr, self.arguments,
                         {**self._options, "dtypes": user_dtypes()})
        return handle

    def __call__(self, *args: Any, **kwargs: Any) -> GPUArray:
        session = get_session()
        stream = kwargs.pop("stream", None)
        out = kwargs.pop("out", None)
        kwargs.pop("allocator", None)
        if kwargs:
            raise TypeError(f"unknown keyword arguments: {', '.join(kwargs)}")
        if out is None:
            out = GPUArray((), self.dtype_out, allocator=self.allocator)
        session.call("reduction_call", self._handle(session), out.descriptor,
                     [_operand(a) for a in args], _stream_handle(stream))
        return out
