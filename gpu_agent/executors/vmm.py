"""Address-stable device memory with CUDA's virtual memory management (driver API via ctypes).

A session's whole address range is reserved up front at the address the agent chose
(``cuMemAddressReserve`` with a fixed address); each ``alloc(addr, size)`` backs part of it with
physical memory (``cuMemCreate`` + ``cuMemMap`` + ``cuMemSetAccess``). Addresses are therefore
chosen by the client, known before the GPU is touched, and the same on every agent.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field

CUDA_SUCCESS = 0
CUDA_ERROR_OUT_OF_MEMORY = 2
CU_MEM_ALLOCATION_TYPE_PINNED = 1
CU_MEM_LOCATION_TYPE_DEVICE = 1
CU_MEM_ACCESS_FLAGS_PROT_READWRITE = 3
CU_MEM_ALLOC_GRANULARITY_MINIMUM = 0


class _Location(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class _AllocFlags(ctypes.Structure):
    _fields_ = [("compressionType", ctypes.c_ubyte), ("gpuDirectRDMACapable", ctypes.c_ubyte),
                ("usage", ctypes.c_ushort), ("reserved", ctypes.c_ubyte * 4)]


class _AllocationProp(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("requestedHandleTypes", ctypes.c_int),
                ("location", _Location), ("win32HandleMetaData", ctypes.c_void_p),
                ("allocFlags", _AllocFlags)]


class _AccessDesc(ctypes.Structure):
    _fields_ = [("location", _Location), ("flags", ctypes.c_int)]


class VmmError(Exception):
    def __init__(self, function: str, code: int, name: str) -> None:
        super().__init__(f"{function} failed: {name}")
        self.function, self.code, self.name = function, code, name

    @property
    def out_of_memory(self) -> bool:
        return self.code == CUDA_ERROR_OUT_OF_MEMORY


def _libcuda() -> ctypes.CDLL:
    lib = ctypes.CDLL("libcuda.so.1")
    u64, size_t = ctypes.c_uint64, ctypes.c_size_t
    lib.cuMemAddressReserve.argtypes = [ctypes.POINTER(u64), size_t, size_t, u64, u64]
    lib.cuMemAddressFree.argtypes = [u64, size_t]
    lib.cuMemCreate.argtypes = [ctypes.POINTER(u64), size_t, ctypes.POINTER(_AllocationProp), u64]
    lib.cuMemRelease.argtypes = [u64]
    lib.cuMemMap.argtypes = [u64, size_t, size_t, u64, u64]
    lib.cuMemUnmap.argtypes = [u64, size_t]
    lib.cuMemSetAccess.argtypes = [u64, size_t, ctypes.POINTER(_AccessDesc), size_t]
    lib.cuMemGetAllocationGranularity.argtypes = [
        ctypes.POINTER(size_t), ctypes.POINTER(_AllocationProp), ctypes.c_int]
    lib.cuGetErrorName.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
    lib.cuDevicePrimaryCtxReset.argtypes = [ctypes.c_int]
    return lib


@dataclass
class SessionMemory:
    """One session's reserved range and the physical memory mapped into it."""

    base: int
    size: int
    mapped: dict[int, tuple[int, int]] = field(default_factory=dict)  # addr -> (size, handle)


class VirtualMemory:
    """VMM calls for one device (the CUDA context must be current in the calling thread)."""

    def __init__(self, device: int) -> None:
        self.device = device
        self._lib = _libcuda()
        self._prop = _AllocationProp()
        self._prop.type = CU_MEM_ALLOCATION_TYPE_PINNED
        self._prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE
        self._prop.location.id = device
        self._access = _AccessDesc()
        self._access.location.type = CU_MEM_LOCATION_TYPE_DEVICE
        self._access.location.id = device
        self._access.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        granularity = ctypes.c_size_t()
        self._check("cuMemGetAllocationGranularity", self._lib.cuMemGetAllocationGranularity(
            ctypes.byref(granularity), ctypes.byref(self._prop), CU_MEM_ALLOC_GRANULARITY_MINIMUM))
        self.granularity = granularity.value

    def _check(self, function: str, code: int) -> None:
        if code != CUDA_SUCCESS:
            name = ctypes.c_char_p()
            self._lib.cuGetErrorName(code, ctypes.byref(name))
            raise VmmError(function, code, (name.value or b"CUDA error %d" % code).decode())

    def reserve(self, base: int, size: int) -> SessionMemory:
        got = ctypes.c_uint64()
        self._check("cuMemAddressReserve", self._lib.cuMemAddressReserve(
            ctypes.byref(got), size, 0, base, 0))
        if got.value != base:
            self._lib.cuMemAddressFree(got.value, size)
            raise VmmError("cuMemAddressReserve", -1,
                           f"asked for {base:#x}, the driver gave {got.value:#x}")
        return SessionMemory(base, size)

    def map(self, memory: SessionMemory, addr: int, size: int) -> None:
        handle = ctypes.c_uint64()
        self._check("cuMemCreate", self._lib.cuMemCreate(
            ctypes.byref(handle), size, ctypes.byref(self._prop), 0))
        try:
            self._check("cuMemMap", self._lib.cuMemMap(addr, size, 0, handle.value, 0))
            try:
                self._check("cuMemSetAccess", self._lib.cuMemSetAccess(
                    addr, size, ctypes.byref(self._access), 1))
            except VmmError:
                self._lib.cuMemUnmap(addr, size)
                raise
        except VmmError:
            self._lib.cuMemRelease(handle.value)
            raise
        memory.mapped[addr] = (size, handle.value)

    def unmap(self, memory: SessionMemory, addr: int) -> None:
        size, handle = memory.mapped.pop(addr)
        self._check("cuMemUnmap", self._lib.cuMemUnmap(addr, size))
        self._check("cuMemRelease", self._lib.cuMemRelease(handle))

    def release(self, memory: SessionMemory) -> None:
        """Unmap everything and free the reservation; best effort (used in teardown too)."""
        for addr in list(memory.mapped):
            try:
                self.unmap(memory, addr)
            except VmmError:
                memory.mapped.pop(addr, None)
        self._lib.cuMemAddressFree(memory.base, memory.size)

    def reset_primary_context(self) -> None:
        self._check("cuDevicePrimaryCtxReset", self._lib.cuDevicePrimaryCtxReset(self.device))
