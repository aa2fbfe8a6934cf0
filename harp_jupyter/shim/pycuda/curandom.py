"""pycuda.curandom, forwarded.

``rand`` gives exactly pycuda's numbers: the seed is drawn here, in the user's process, with the
same call pycuda makes (one ``numpy.random.randint(2**31 - 1)`` of NumPy's global generator, so
``numpy.random.seed`` governs it as it does with pycuda); the agent runs pycuda's MD5 generator
with that seed (pycuda's own function on a GPU, the same algorithm in NumPy on the emulated
executor) over the launch shape pycuda's ``splay`` picks for the array's size on that device.
The cuRAND generator classes (XORWOW, MRG32k3a, Sobol and scrambled Sobol, 32 and 64 bits) run
pycuda's own generators on a GPU agent (``_CurandGenerator``); the emulated agent has no cuRAND.
"""

from __future__ import annotations

import random
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np

from harp_jupyter.shim.errors import NotSupportedError
from harp_jupyter.shim.pycuda import driver as drv
from harp_jupyter.shim.pycuda.gpuarray import (
    GPUArray,
    _operand,
    _run,
    _stream_handle,
    empty,
    splay,
    to_gpu,
)
from harp_jupyter.shim.session import get_session

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


def get_curand_version() -> tuple[int, int, int] | None:
    """The cuRAND version of the agent's pycuda; None on an agent without cuRAND (the
    emulated executor), as pycuda answers without it."""
    version = get_session().device.get("curand_version")
    return None if not version else tuple(int(x) for x in version)  # type: ignore[return-value]


class _CurandGenerator:
    """A pycuda.curandom generator run by the agent's pycuda (its kernels, its launch shape):
    the same numbers as pycuda for the same seeds and calls. Its state is device memory of this
    session (``state``)."""

    _kind = ""
    has_box_muller = True
    generator_bits = 32

    def __init__(self, offset: int = 0, seeds: Callable[[int], Any] | None = None) -> None:
        session = get_session()
        self._session = session
        self._handle = session.new_handle()
        count, state_bytes, self.block_count, self.generators_per_block = session.call_sync(
            "curand_new", self._handle, self._kind, {})
        self._finalizer = weakref.finalize(self, session.release_later, "curand_free",
                                           self._handle)
        self._finalizer.atexit = False
        self._state_bytes = int(state_bytes)
        self._state = drv.mem_alloc(self._state_bytes)
        params: list[Any] = [int(offset)]
        if seeds is not None:
            params.append(seeds(int(count)))
        self._call("init", params, None)

    @property
    def state(self) -> Any:
        return self._state

    def _call(self, method: str, params: list[Any], stream: Any) -> None:
        self._session.call("curand_call", self._handle, method, int(self._state),
                           self._state_bytes, [_operand(p) for p in params],
                           _stream_handle(stream))

    # {{{ pycuda's methods

    def fill_uniform(self, data: GPUArray, stream: Any = None) -> None:
        allowed = [np.float32, np.float64, np.int32, np.uint32]
        if self.generator_bits >= 64:
            allowed += [np.int64, np.uint64]
        if data.dtype not in [np.dtype(t) for t in allowed]:
            raise NotImplementedError
        self._call("fill_uniform", [data], stream)

    def fill_normal(self, data: GPUArray, stream: Any = None) -> None:
        if data.dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
            raise NotImplementedError
        self._call("fill_normal", [data], stream)

    def fill_log_normal(self, data: GPUArray, mean: float, stddev: float,
                        stream: Any = None) -> None:
        if data.dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
            raise NotImplementedError
        self._call("fill_log_normal", [data, float(mean), float(stddev)], stream)

    def fill_poisson(self, data: GPUArray, lambda_value: float | None = None,
                     stream: Any = None) -> None:
        inplace = (np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.uint32))
        if data.dtype not in (inplace if lambda_value is None else (np.dtype(np.uint32),)):
            raise NotImplementedError
        params = [data] if lambda_value is None else [data, float(lambda_value)]
        self._call("fill_poisson", params, stream)

    def gen_uniform(self, shape: Any, dtype: Any, stream: Any = None) -> GPUArray:
        result = empty(shape, dtype)
        self.fill_uniform(result, stream)
        return result

    def gen_normal(self, shape: Any, dtype: Any, stream: Any = None) -> GPUArray:
        result = empty(shape, dtype)
        self.fill_normal(result, stream)
        return result

    def gen_log_normal(self, shape: Any, dtype: Any, mean: float, stddev: float,
                       stream: Any = None) -> GPUArray:
        result = empty(shape, dtype)
        self.fill_log_normal(result, mean, stddev, stream)
        return result

    def gen_poisson(self, shape: Any, dtype: Any, lambda_value: float,
                    stream: Any = None) -> GPUArray:
        result = empty(shape, dtype)
        self.fill_poisson(result, lambda_value, stream)
        return result

    def call_skip_ahead(self, i: int, stream: Any = None) -> None:
        self._call("skip_ahead", [int(i)], stream)

    def call_skip_ahead_array(self, i: GPUArray, stream: Any = None) -> None:
        self._call("skip_ahead_array", [i], stream)

    # }}}


class _PseudoRandomGenerator(_CurandGenerator):
    def __init__(self, seed_getter: Callable[[int], Any] | None = None, offset: int = 0) -> None:
        super().__init__(offset, lambda count: _seeds(seed_getter, count))

    def call_skip_ahead_sequence(self, i: int, stream: Any = None) -> None:
        self._call("skip_ahead_sequence", [int(i)], stream)

    def call_skip_ahead_sequence_array(self, i: GPUArray, stream: Any = None) -> None:
        self._call("skip_ahead_sequence_array", [i], stream)


def _seeds(seed_getter: Callable[[int], Any] | None, count: int) -> GPUArray:
    """One int32 seed per generator, drawn here as pycuda draws them in the user's process."""
    if seed_getter is None:
        return to_gpu(np.asarray(np.random.randint(0, (1 << 31) - 1, count), dtype=np.int32))
    seed = seed_getter(count)
    if not (isinstance(seed, GPUArray) and seed.dtype == np.int32 and seed.size == count):
        raise TypeError("seed must be GPUArray of integers of right length")
    return seed


class XORWOWRandomNumberGenerator(_PseudoRandomGenerator):
    _kind = "XORWOW"


class MRG32k3aRandomNumberGenerator(_PseudoRandomGenerator):
    _kind = "MRG32k3a"

    def call_skip_ahead_subsequence(self, i: int, stream: Any = None) -> None:
        self._call("skip_ahead_subsequence", [int(i)], stream)

    def call_skip_ahead_subsequence_array(self, i: GPUArray, stream: Any = None) -> None:
        self._call("skip_ahead_subsequence_array", [i], stream)


class _SobolGenerator(_CurandGenerator):
    has_box_muller = False

    def __init__(self, dir_vector: Any = None, scramble_vector: Any = None,
                 offset: int = 0) -> None:
        if dir_vector is not None or scramble_vector is not None:
            raise NotSupportedError(
                f"{type(self).__name__}: own direction vectors or scramble constants are not "
                "forwarded by HARP's shim; the defaults (cuRAND's, as pycuda's) are used "
                "without them")
        super().__init__(offset)


class Sobol32RandomNumberGenerator(_SobolGenerator):
    _kind = "Sobol32"

    def __init__(self, dir_vector: Any = None, offset: int = 0) -> None:
        super().__init__(dir_vector, None, offset)


class Sobol64RandomNumberGenerator(_SobolGenerator):
    _kind = "Sobol64"
    generator_bits = 64

    def __init__(self, dir_vector: Any = None, offset: int = 0) -> None:
        super().__init__(dir_vector, None, offset)


class ScrambledSobol32RandomNumberGenerator(_SobolGenerator):
    _kind = "ScrambledSobol32"


class ScrambledSobol64RandomNumberGenerator(_SobolGenerator):
    _kind = "ScrambledSobol64"
    generator_bits = 64


def seed_getter_uniform(n: int) -> GPUArray:
    """pycuda's: one seed from Python's ``random`` module, for every generator."""
    return empty([n], np.int32).fill(random.randint(0, 2**31 - 1))


def seed_getter_unique(n: int) -> GPUArray:
    return to_gpu(np.random.randint(0, 2**31 - 1, n).astype(np.int32))


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
