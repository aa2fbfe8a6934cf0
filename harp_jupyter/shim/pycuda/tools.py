"""pycuda.tools, forwarded: the helpers pycuda code and pycuda's own tests use."""

from __future__ import annotations

import functools
import gc
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from gpu_agent.protocol import dtype_text
from harp_jupyter.shim.pycuda import driver as cuda

product = itertools.product  # pycuda.tools re-exports it; pycuda's tests use it


def bitlog2(value: int) -> int:
    """The index of the highest set bit of ``value`` (floor of log2; 0 for 0)."""
    return max(int(value).bit_length() - 1, 0)


# {{{ the registry of C names for dtypes (pycuda.compyte.dtypes, which pycuda.tools re-exports)


class TypeNameNotKnown(RuntimeError):
    """No C name is registered for a dtype."""


_NAME_OF_DTYPE: dict[np.dtype, str] = {}
_DTYPE_OF_NAME: dict[str, np.dtype] = {}
#: names the agent's pycuda knows by itself (gpuarray.vec's): never sent
_BUILTIN_NAMES: set[str] = set()


def mark_builtin_dtypes() -> None:
    """The names registered so far are pycuda's own (the agent's pycuda registers them too)."""
    _BUILTIN_NAMES.update(_DTYPE_OF_NAME)


def user_dtypes() -> list[list[str]]:
    """``[[c_name, dtype text], ...]`` of the dtypes user code registered: the agent registers
    them before it compiles a user kernel, so that kernels over struct types (a ReductionKernel
    of a registered dtype) compile there as they do with pycuda."""
    return [[name, dtype_text(dtype)] for name, dtype in _DTYPE_OF_NAME.items()
            if name not in _BUILTIN_NAMES]


def register_dtype(dtype: Any, c_names: str | list[str], alias_ok: bool = False) -> None:
    """Give ``dtype`` its C name(s); the first is what ``dtype_to_ctype`` answers."""
    dtype = np.dtype(dtype)
    names = [c_names] if isinstance(c_names, str) else list(c_names)
    for name in names:
        known = _DTYPE_OF_NAME.get(name)
        if known is not None and known != dtype:
            raise RuntimeError(f"name '{name}' already registered to different dtype")
    if not alias_ok and dtype in _NAME_OF_DTYPE and _NAME_OF_DTYPE[dtype] != names[0]:
        raise RuntimeError(f"dtype '{dtype}' already registered as '{_NAME_OF_DTYPE[dtype]}'")
    _NAME_OF_DTYPE.setdefault(dtype, names[0])
    for name in names:
        _DTYPE_OF_NAME[name] = dtype


def get_or_register_dtype(c_names: str | list[str], dtype: Any = None) -> np.dtype:
    """The dtype of a C name; with ``dtype``, registers it under the name(s) first."""
    names = [c_names] if isinstance(c_names, str) else list(c_names)
    if dtype is None:
        try:
            return _DTYPE_OF_NAME[names[0]]
        except KeyError:
            raise TypeNameNotKnown(f"C name '{names[0]}' is not known") from None
    register_dtype(dtype, names, alias_ok=True)
    return np.dtype(dtype)

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


def base_dtype_to_ctype(dtype: Any) -> str:
    """The C name of ``dtype`` (built-in types and the registered ones)."""
    dtype = np.dtype(dtype)
    registered = _NAME_OF_DTYPE.get(dtype)
    if registered is not None:
        return registered
    try:
        return _CTYPES[dtype]
    except KeyError:
        raise ValueError(f"unable to map dtype '{dtype}'") from None


def dtype_to_ctype(dtype: Any, with_fp_tex_hack: bool = False) -> str:
    dtype = np.dtype(dtype)
    if with_fp_tex_hack and dtype in (np.dtype(np.float32), np.dtype(np.float64)):
        return "fp_tex_float" if dtype == np.float32 else "fp_tex_double"
    return base_dtype_to_ctype(dtype)


# }}}


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

    #: bits of a size kept below its leading bit: bins are 1/4 of a power of two apart
    mantissa_bits = 2

    def bin_number(self, size: int) -> int:
        """The bin of allocations of ``size`` bytes: exponent and the next mantissa bits."""
        size = int(size)
        exponent = bitlog2(size)
        shift = exponent - self.mantissa_bits
        shifted = size >> shift if shift >= 0 else size << -shift
        mantissa = shifted & ((1 << self.mantissa_bits) - 1)
        return exponent << self.mantissa_bits | mantissa

    def alloc_size(self, bin_number: int) -> int:
        """The bytes a block of bin ``bin_number`` has: the largest size of that bin."""
        exponent = bin_number >> self.mantissa_bits
        mantissa = bin_number & ((1 << self.mantissa_bits) - 1)
        shift = exponent - self.mantissa_bits
        head = (1 << self.mantissa_bits | mantissa)
        if shift < 0:
            return head >> -shift
        return head << shift | ((1 << shift) - 1)

    def allocate(self, nbytes: int) -> PooledDeviceAllocation:
        size = self.alloc_size(self.bin_number(nbytes))
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


class DebugMemoryPool(DeviceMemoryPool):
    """pycuda's debugging pool; here a plain pool (allocations are not traced)."""

    def __init__(self, interactive: bool = True, logfile: Any = None) -> None:
        super().__init__()
        self.interactive = interactive
        self.logfile = logfile


class PageLockedAllocator:
    """Host buffers for PageLockedMemoryPool (plain memory on the client)."""

    def __init__(self, flags: int = 0) -> None:
        self.flags = flags

    def __call__(self, nbytes: int) -> np.ndarray:
        return np.empty(int(nbytes), np.uint8)


class PageLockedMemoryPool:
    """Host buffers (the client has no pinned memory of the GPU's; plain NumPy arrays)."""

    def allocate(self, shape: Any, dtype: Any, order: str = "C") -> np.ndarray:
        return np.empty(shape, dtype, order=order)

    def free_held(self) -> None:
        pass

    def stop_holding(self) -> None:
        pass


def _ceiling(value: float, multiple_of: int = 1) -> int:
    return int(-(-value // multiple_of) * multiple_of)


def _floor(value: float, multiple_of: int = 1) -> int:
    return int(value // multiple_of * multiple_of)


class DeviceData:
    """pycuda's table of occupancy-relevant facts about a device (by compute capability; the
    figures pycuda uses, so that launch shapes derived from them match pycuda's)."""

    def __init__(self, dev: Any = None) -> None:
        dev = dev or cuda.Context.get_device()
        attr = cuda.device_attribute
        capability = dev.compute_capability()
        self.max_threads = dev.get_attribute(attr.MAX_THREADS_PER_BLOCK)
        self.warp_size = dev.get_attribute(attr.WARP_SIZE)
        self.warps_per_mp = (64 if capability >= (3, 0) else 48 if capability >= (2, 0)
                             else 32 if capability >= (1, 2) else 24)
        self.thread_blocks_per_mp = 8
        self.registers = dev.get_attribute(attr.MAX_REGISTERS_PER_BLOCK)
        self.shared_memory = dev.get_attribute(attr.MAX_SHARED_MEMORY_PER_BLOCK)
        fermi_or_later = capability >= (2, 0)
        self.smem_alloc_granularity = 128 if fermi_or_later else 512
        self.smem_granularity = 32 if fermi_or_later else 16
        self.register_allocation_unit = "warp" if fermi_or_later else "block"

    def align_bytes(self, word_size: int = 4) -> int:
        if word_size not in (4, 8, 16):
            raise ValueError(f"no alignment possible for fetches of size {word_size}")
        return self.smem_granularity * word_size

    def align(self, bytes_: int, word_size: int = 4) -> int:
        return _ceiling(bytes_, self.align_bytes(word_size))

    def align_dtype(self, elements: int, dtype_size: int) -> int:
        return _ceiling(elements, self.align_words(dtype_size))

    def align_words(self, word_size: int) -> int:
        return self.align_bytes(word_size) // word_size

    @staticmethod
    def make_valid_tex_channel_count(size: int) -> int:
        for valid in (1, 2, 4):
            if valid >= size:
                return valid
        raise ValueError("could not extend texture channel count to a valid value")


class OccupancyRecord:
    """How many blocks of ``threads`` threads (with ``shared_mem`` bytes and ``registers``
    registers per thread) fit on one multiprocessor, what limits them, and the occupancy."""

    def __init__(self, devdata: DeviceData, threads: int, shared_mem: int = 0,
                 registers: int = 0) -> None:
        if threads > devdata.max_threads:
            raise ValueError("too many threads")
        warps = _ceiling(threads / devdata.warp_size)
        smem = _ceiling(shared_mem, devdata.smem_alloc_granularity)
        if devdata.register_allocation_unit == "warp":
            regs = warps * 32 * registers
        else:
            regs = _ceiling(warps * 2, 4) * 16 * registers
        if regs > devdata.registers:
            raise ValueError("too many registers")
        if smem > devdata.shared_memory:
            raise ValueError("too much smem")
        limits = [(devdata.thread_blocks_per_mp, "device"),
                  (_floor(devdata.warps_per_mp / warps), "warps")]
        if registers > 0:
            limits.append((_floor(devdata.registers / regs), "regs"))
        if shared_mem > 0:
            limits.append((_floor(devdata.shared_memory / smem), "smem"))
        self.tb_per_mp_limits = limits
        self.tb_per_mp, self.limited_by = min(limits)
        self.warps_per_mp = self.tb_per_mp * warps
        self.occupancy = self.warps_per_mp / devdata.warps_per_mp


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
