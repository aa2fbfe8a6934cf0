"""pycuda.tools, forwarded: the helpers pycuda code and pycuda's own tests use."""

from __future__ import annotations

import functools
import gc
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from harp_jupyter.shim.pycuda import driver as cuda

product = itertools.product  # pycuda.tools re-exports it; pycuda's tests use it

_CTYPES = {
    np.dtype(np.bool_): "bool", np.dtype(np.int8): "signed char",
    np.dtype(np.uint8): "unsigned char", np.dtype(np.int16): "short",
    np.dtype(np.uint16): "unsigned short", np.dtype(np.int32): "int",
    np.dtype(np.uint32): "unsigned int", np.dtype(np.int64): "long",
    np.dtype(np.uint64): "unsigned long", np.dtype(np.float16): "__half",
    np.dtype(np.float32): "float", np.dtype(np.float64): "double",
    np.dtype(np.complex64): "pycuda::complex<float>",
    np.dtype(np.complex128): "pycuda::complex<double>",
}


def dtype_to_ctype(dtype: Any, with_fp_tex_hack: bool = False) -> str:
    dtype = np.dtype(dtype)
    if with_fp_tex_hack and dtype in (np.dtype(np.float32), np.dtype(np.float64)):
        return "fp_tex_float" if dtype == np.float32 else "fp_tex_double"
    try:
        return _CTYPES[dtype]
    except KeyError:
        raise ValueError(f"unable to map dtype '{dtype}'") from None


@dataclass
class Argument:
    dtype: np.dtype
    name: str

    def __init__(self, dtype: Any, name: str) -> None:
        self.dtype, self.name = np.dtype(dtype), name


class VectorArg(Argument):
    def declarator(self) -> str:
        return f"{dtype_to_ctype(self.dtype)} *{self.name}"

    struct_char = "P"


class ScalarArg(Argument):
    def declarator(self) -> str:
        return f"{dtype_to_ctype(self.dtype)} {self.name}"

    @property
    def struct_char(self) -> str:
        return self.dtype.char


_C_TYPES = {ctype: dtype for dtype, ctype in _CTYPES.items()}
_C_TYPES.update({"char": np.dtype(np.int8), "long long": np.dtype(np.int64),
                 "unsigned long long": np.dtype(np.uint64), "unsigned": np.dtype(np.uint32),
                 "size_t": np.dtype(np.uintp), "float2": np.dtype(np.complex64)})


def parse_c_arg(c_arg: str) -> Argument:
    decl = c_arg.replace("const", "").replace("__restrict__", "").strip()
    is_vector = "*" in decl
    decl = decl.replace("*", " ")
    *type_words, name = decl.split()
    ctype = " ".join(type_words)
    dtype = _C_TYPES.get(ctype)
    if dtype is None:
        raise ValueError(f"unknown type {ctype!r} in argument {c_arg!r}")
    return (VectorArg if is_vector else ScalarArg)(dtype, name)


def get_arg_type(c_arg: str) -> str:
    return parse_c_arg(c_arg).struct_char


class DeviceMemoryPool:
    """Keeps freed device blocks for reuse, as pycuda's pool does (memory of the session)."""

    def __init__(self, allocator: Callable[[int], Any] | None = None) -> None:
        self._allocator = allocator or cuda.mem_alloc
        self._held: dict[int, list[Any]] = {}
        self.active_blocks = 0
        self.stopped_holding = False

    @property
    def held_blocks(self) -> int:
        return sum(len(blocks) for blocks in self._held.values())

    def allocate(self, nbytes: int) -> PooledDeviceAllocation:
        size = 1 << max(int(nbytes) - 1, 0).bit_length()
        blocks = self._held.get(size)
        block = blocks.pop() if blocks else self._allocator(size)
        self.active_blocks += 1
        return PooledDeviceAllocation(self, block, size)

    __call__ = allocate

    def _give_back(self, block: Any, size: int) -> None:
        self.active_blocks -= 1
        if self.stopped_holding:
            block.free()
        else:
            self._held.setdefault(size, []).append(block)

    def free_held(self) -> None:
        for blocks in self._held.values():
            for block in blocks:
                block.free()
        self._held.clear()

    def stop_holding(self) -> None:
        self.stopped_holding = True
        self.free_held()


class PooledDeviceAllocation:
    def __init__(self, pool: DeviceMemoryPool, block: Any, size: int) -> None:
        self._pool, self._block, self.size = pool, block, size
        self._freed = False

    def __int__(self) -> int:
        return int(self._block)

    __index__ = __int__

    def free(self) -> None:
        if not self._freed:
            self._freed = True
            self._pool._give_back(self._block, self.size)

    def __del__(self) -> None:
        self.free()


class PageLockedMemoryPool:
    """Host buffers (the client has no pinned memory of the GPU's; plain NumPy arrays)."""

    def allocate(self, shape: Any, dtype: Any, order: str = "C") -> np.ndarray:
        return np.empty(shape, dtype, order=order)

    def free_held(self) -> None:
        pass

    def stop_holding(self) -> None:
        pass


class DeviceData:
    def __init__(self, dev: Any = None) -> None:
        dev = dev or cuda.Context.get_device()
        attr = cuda.device_attribute
        self.max_threads = dev.get_attribute(attr.MAX_THREADS_PER_BLOCK)
        self.warp_size = dev.get_attribute(attr.WARP_SIZE)
        self.warps_per_mp = dev.get_attribute(attr.MAX_THREADS_PER_MULTIPROCESSOR) // max(
            self.warp_size, 1)
        self.thread_blocks_per_mp = 32
        self.registers = dev.get_attribute(attr.MAX_REGISTERS_PER_BLOCK)
        self.shared_memory = dev.get_attribute(attr.MAX_SHARED_MEMORY_PER_BLOCK)
        self.smem_granularity = 128
        self.smem_alloc_granularity = 128

    def align(self, bytes_: int, word_size: int = 4) -> int:
        return (bytes_ + self.smem_granularity * word_size - 1) // (
            self.smem_granularity * word_size) * self.smem_granularity * word_size

    def align_dtype(self, elements: int, dtype_size: int) -> int:
        return self.align(elements * dtype_size) // dtype_size


def get_default_device(default: int = 0) -> Any:
    return cuda.Device(default)


def make_default_context(ctx_maker: Callable[[Any], Any] | None = None) -> Any:
    device = get_default_device()
    return ctx_maker(device) if ctx_maker else device.make_context()


context_dependent_memoized_functions: list[Any] = []


def context_dependent_memoize(func: Callable[..., Any]) -> Callable[..., Any]:
    cache: dict[Any, Any] = {}

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        key = (args, frozenset(kwargs.items()))
        if key not in cache:
            context_dependent_memoized_functions.append(cache)
            cache[key] = func(*args, **kwargs)
        return cache[key]

    return wrapper


def clear_context_caches() -> None:
    for cache in context_dependent_memoized_functions:
        cache.clear()


def mark_cuda_test(inner: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(inner)
    def test(*args: Any, **kwargs: Any) -> Any:
        cuda.init()
        ctx = make_default_context()
        try:
            return inner(*args, **kwargs)
        finally:
            ctx.pop()
            clear_context_caches()
            gc.collect()

    return test


def init_cuda_context_fixture() -> Iterator[None]:
    cuda.init()
    ctx = make_default_context()
    yield
    ctx.pop()
    clear_context_caches()
    gc.collect()
