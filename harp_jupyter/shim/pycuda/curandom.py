"""pycuda.curandom's ``rand``, forwarded: uniform numbers in [0, 1) uploaded to the agent.

They are drawn on the client with NumPy (pycuda draws them on the GPU with an MD5 generator): the
same distribution, another sequence. The cuRAND generator classes are not forwarded.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from harp_jupyter.shim.errors import NotSupportedError
from harp_jupyter.shim.pycuda.gpuarray import GPUArray, to_gpu

_rng = np.random.default_rng()


def rand(shape: Any, dtype: Any = np.float32, stream: Any = None) -> GPUArray:
    dtype = np.dtype(dtype)
    if dtype.kind == "c":
        values = _rng.random(shape) + 1j * _rng.random(shape)
    elif dtype.kind in "iu":
        values = _rng.integers(np.iinfo(dtype).min, np.iinfo(dtype).max, shape, endpoint=True)
    else:
        values = _rng.random(shape)
    return to_gpu(np.asarray(values, dtype))


def get_curand_version() -> tuple[int, int, int]:
    raise NotSupportedError("cuRAND generators are not forwarded by HARP's shim; use rand()")


def __getattr__(name: str) -> Any:
    if name[0].isupper():
        raise NotSupportedError(f"pycuda.curandom.{name} (cuRAND) is not forwarded by HARP's "
                                "shim; use pycuda.curandom.rand")
    raise AttributeError(name)
