"""pycuda.scan, forwarded: a scan kernel is one array operation on the agent (pycuda's scan
kernels on a GPU; NumPy on the emulated executor, for expressions that read the same in C and
Python: ``a+b``, ``a*b``, ``max(a, b)``, bit operations)."""

from __future__ import annotations

from typing import Any

import numpy as np

from harp_jupyter.shim.pycuda.compiler import SourceModule  # noqa: F401 - pycuda's name
from harp_jupyter.shim.pycuda.gpuarray import GPUArray, _run
from harp_jupyter.shim.pycuda.tools import dtype_to_ctype  # noqa: F401 - pycuda's name

# pycuda's CUDA templates are compiled on the agent; their names exist for code that reads them
SHARED_PREAMBLE = CLUDA_PREAMBLE = SCAN_INTERVALS_SOURCE = ""
INCLUSIVE_UPDATE_SOURCE = EXCLUSIVE_UPDATE_SOURCE = ""


class _ScanKernel:
    exclusive = False

    def __init__(self, dtype: Any, scan_expr: str, neutral: str | None = None,
                 name_prefix: str = "scan", options: list[str] | None = None,
                 preamble: str = "", devices: Any = None) -> None:
        self.dtype = np.dtype(dtype)
        self.scan_expr = str(scan_expr)
        self.neutral = None if neutral is None else str(neutral)
        if self.exclusive and self.neutral is None:
            raise ValueError("neutral element is required for exclusive scan")
        self.name_prefix = name_prefix
        self.options = [str(o) for o in options or []]
        self.preamble = str(preamble)

    def __call__(self, input_ary: GPUArray, output_ary: GPUArray | str | None = None,
                 allocator: Any = None, stream: Any = None) -> GPUArray:
        if output_ary is None:
            output_ary = input_ary  # in place, as pycuda
        elif isinstance(output_ary, str) and output_ary == "new":
            output_ary = GPUArray(input_ary.shape, input_ary.dtype,
                                  allocator=allocator or input_ary.allocator)
        assert isinstance(output_ary, GPUArray)
        if input_ary.size:
            _run("scan", output_ary, [input_ary], stream, expression=self.scan_expr,
                 neutral=self.neutral, exclusive=self.exclusive, preamble=self.preamble,
                 options=self.options)
        return output_ary


class InclusiveScanKernel(_ScanKernel):
    exclusive = False


class ExclusiveScanKernel(_ScanKernel):
    exclusive = True
