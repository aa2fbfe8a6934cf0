"""pycuda.curandom, forwarded.

``rand`` gives exactly pycuda's numbers: the seed is drawn here, in the user's process, with the
same call pycuda makes (one ``numpy.random.randint(2**31 - 1)`` of NumPy's global generator, so
``numpy.random.seed`` governs it as it does with pycuda); the agent runs pycuda's MD5 generator
with that seed (pycuda's own function on a GPU, the same algorithm in NumPy on the emulated
executor) over the launch shape pycuda's ``splay`` picks for the array's size on that device.
The cuRAND generator classes are not forwarded.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from harp_jupyter.shim.errors import NotSupportedError
from harp_jupyter.shim.pycuda.gpuarray import GPUArray, _run, splay

_RAND_DTYPES = (np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.int32),
                np.dtype(np.uint32))


def rand(shape: Any, dtype: Any = np.float32, stream: Any = None) -> GPUArray:
    """Uniform numbers in [0, 1) (float32, float64) or random 32-bit integers, as pycuda's."""
    dtype = np.dtype(dtype)
    if dtype not in _RAND_DTYPES:
        raise NotImplementedError
    result = GPUArray(shape, dtype)
    seed = np.random.randint(2**31 - 1)
    grid, block = splay(result.mem_size)
    return _run("rand_md5", result, [], stream, seed=int(seed), grid=list(grid),
                block=list(block))


def get_curand_version() -> tuple[int, int, int]:
    raise NotSupportedError("cuRAND generators are not forwarded by HARP's shim; use rand()")


_CURAND_CLASSES = (
    "MRG32k3aRandomNumberGenerator", "ScrambledSobol32RandomNumberGenerator",
    "ScrambledSobol64RandomNumberGenerator", "Sobol32RandomNumberGenerator",
    "Sobol64RandomNumberGenerator", "XORWOWRandomNumberGenerator")


def _not_forwarded(name: str) -> type:
    def refuse(self: Any, *args: Any, **kwargs: Any) -> None:
        raise NotSupportedError(f"pycuda.curandom.{name} (cuRAND) is not forwarded by HARP's "
                                "shim; use pycuda.curandom.rand")

    return type(name, (), {"__init__": refuse, "__module__": __name__})


for _name in _CURAND_CLASSES:
    globals()[_name] = _not_forwarded(_name)
del _name


def seed_getter_uniform(n: int) -> GPUArray:
    from harp_jupyter.shim.pycuda.gpuarray import to_gpu

    return to_gpu(np.full(n, np.random.randint(2**31 - 1), np.int32))


def seed_getter_unique(n: int) -> GPUArray:
    from harp_jupyter.shim.pycuda.gpuarray import to_gpu

    return to_gpu(np.random.randint(2**31 - 1, size=n).astype(np.int32))


def generate_direction_vectors(count: int, direction: Any = None) -> Any:
    raise NotSupportedError("cuRAND direction vectors are not forwarded by HARP's shim")


# pycuda's CUDA sources of its generators: compiled on the agent, never here
md5_code = gen_template = gen_log_template = gen_poisson_template = ""
gen_poisson_inplace_template = random_source = random_skip_ahead32_source = ""
random_skip_ahead64_source = mrg32k3a_random_source = mrg32k3a_skip_ahead_sequence_source = ""
scrambledsobol_random_source = sobol_random_source = xorwow_random_source = ""
xorwow_skip_ahead_sequence_source = ""
direction_vector_set = None


def generate_scramble_constants32(count: int) -> Any:
    raise NotSupportedError("cuRAND scramble constants are not forwarded by HARP's shim")


def generate_scramble_constants64(count: int) -> Any:
    raise NotSupportedError("cuRAND scramble constants are not forwarded by HARP's shim")
