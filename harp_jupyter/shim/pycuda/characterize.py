"""pycuda.characterize, forwarded: facts about the agent's GPU."""

from __future__ import annotations

import struct

from harp_jupyter.shim.errors import NotSupportedError
from harp_jupyter.shim.pycuda import driver as cuda
from harp_jupyter.shim.pycuda.tools import context_dependent_memoize  # noqa: F401 - pycuda's


def platform_bits() -> int:
    return struct.calcsize("P") * 8


def has_stack() -> bool:
    return cuda.Context.get_device().compute_capability() >= (2, 0)


def has_double_support() -> bool:
    return cuda.Context.get_device().compute_capability() >= (1, 3)


def sizeof(type_name: str, preamble: str = "") -> int:
    raise NotSupportedError("pycuda.characterize.sizeof (a probe kernel compiled for the GPU) is "
                            "not forwarded by HARP's shim")
