"""The emulated executor: host memory and NumPy, for machines without a GPU.

It exists so the whole stack (agent, shim, kernels, lab) runs and is tested in CI. It is never a
GPU and says so everywhere: in its device name, in ``device_info()['emulated']`` and in the agent's
start-up line. Array operations run in NumPy; raw CUDA kernels are refused with a clear error.
"""

from __future__ import annotations

import bisect
import time
from typing import Any

import numpy as np

from gpu_agent import profiling
from gpu_agent import protocol as P
from gpu_agent.datastore import OpenedFile, read_exactly, write_all
from gpu_agent.executors.base import AgentError, Executor, ExecutorSession, resident_threads
from gpu_agent.executors.numpy_arrays import ArrayFunctionError, ArrayFunctionNeedsGPU, apply
from gpu_agent.executors.torch_ops import TorchOps
from gpu_agent.sizes import format_bytes
from gpu_agent.staging_buffers import StagingBuffers

DEVICE_NAME = "HARP emulated device (host memory, no GPU)"

_NEEDS_GPU = (
    "{what} needs a real GPU: this agent runs the emulated executor (host memory and NumPy, no "
    "GPU). It runs gpuarray and cumath operations, memory copies and memset, streams and events; "
    "it refuses CUDA C: SourceModule, DynamicModule, ElementwiseKernel, ReductionKernel, module "
    "images, cuRAND generators and raw kernel launches. Start harp-agent --executor pycuda on a "
    "GPU machine (docs/gpu-machine.md) and point HARP_AGENTS at it.")


def _refuse(what: str) -> AgentError:
    return AgentError("NotSupported", _NEEDS_GPU.format(what=what))


class EmulatedSession(TorchOps, ExecutorSession):
    #: harp tensors live in CPU torch, their bytes counted in the emulated device's memory
    torch_device = "cpu"

    def __init__(self, executor: EmulatedExecutor) -> None:
        self._executor = executor
        self._starts: list[int] = []
        self._memory: dict[int, np.ndarray] = {}
        self._streams: set[int] = set()
        self._events: dict[int, float | None] = {}
        self._gpu_timings: list[list[Any]] = []

    # {{{ memory

    def _locate(self, addr: int, nbytes: int) -> tuple[np.ndarray, int]:
        i = bisect.bisect_right(self._starts, addr) - 1
        if i < 0:
            raise AgentError("HandleError", f"{addr:#x} is not in emulated device memory")
        start = self._starts[i]
        memory = self._memory[start]
        offset = addr - start
        if offset + nbytes > memory.size:
            raise AgentError("HandleError", f"[{addr:#x}, +{nbytes}) runs past its allocation")
        return memory, offset

    def _bytes(self, addr: int, nbytes: int) -> np.ndarray:
        memory, offset = self._locate(addr, nbytes)
        return memory[offset:offset + nbytes]

    def view(self, desc: list[Any]) -> np.ndarray:
        addr, dtype, shape, strides = desc
        dt = P.wire_dtype(dtype)
        lo = addr + sum((n - 1) * s for n, s in zip(shape, strides, strict=True) if s < 0 and n)
        memory, offset = self._locate(lo, 0)
        return np.ndarray(tuple(shape), dt, memory, offset + (addr - lo), tuple(strides))

    def op_alloc(self, addr: int, size: int) -> None:
        self._executor.reserve(size)
        bisect.insort(self._starts, addr)
        self._memory[addr] = np.zeros(size, np.uint8)  # scrubbed, as a real agent's memory is

    def op_free(self, addr: int) -> None:
        memory = self._memory.pop(addr)
        self._starts.remove(addr)
        self._executor.unreserve(memory.size)

    def op_htod(self, dst: int, data: Any, stream: int | None) -> None:
        src = np.frombuffer(data, np.uint8)
        self._bytes(dst, src.size)[:] = src

    def op_dtoh(self, src: int, nbytes: int, stream: int | None) -> np.ndarray:
        out = self._executor.staging.take(nbytes)
        out[:] = self._bytes(src, nbytes)
        return out

    def op_dtod(self, dst: int, src: int, nbytes: int, stream: int | None) -> None:
        self._bytes(dst, nbytes)[:] = self._bytes(src, nbytes)

    def op_memset(self, dst: int, value: int, width: int, count: int,
                  stream: int | None) -> None:
        dtype = {1: np.uint8, 2: np.uint16, 4: np.uint32}.get(width)
        if dtype is None:
            raise AgentError("LogicError", f"memset width must be 1, 2 or 4, not {width}")
        target = self._bytes(dst, width * count).view(dtype)
        target[:] = value & ((1 << (8 * width)) - 1)

    def op_mem_get_info(self) -> list[int]:
        return list(self._executor.mem_info())

    def op_synchronize(self) -> None:
        return None

    def op_ping(self) -> int:
        return profiling.now_ns()

    # emulated: no context to apply them to, the values are remembered (from CUDA's defaults)
    # and what they would reserve counts against the slot as on a GPU
    def op_limit_get(self, name: str) -> int:
        return self.limits.get(name)

    def op_limit_set(self, name: str, value: int) -> None:
        self.limits.check_set(name, value)
        self.limits.set(name, value)

    def object_bytes(self) -> int:
        return self.torch_bytes() + self.limit_bytes()

    # the emulated device runs each op on the host before the next: its "GPU time" is the
    # NumPy time of the op (the timeline names the track as emulated)
    def gpu_timer_start(self, op: str, stream: int | None) -> Any:
        if len(self._gpu_timings) >= self.pending_gpu_timings:
            return None
        return op, stream, profiling.now_ns()

    def gpu_timer_end(self, token: Any, seq: int, index: int,
                      span: list[int] | None = None) -> None:
        op, stream, start = token
        record = [op, stream, start, profiling.now_ns(), seq, index]
        self._gpu_timings.append(record if span is None else [*record, span])

    def op_profile_gpu(self) -> list[list[Any]]:
        timings, self._gpu_timings = self._gpu_timings, []
        return timings

    # }}}

    # {{{ streams and events (work runs in order at once, so everything is always complete)

    def op_stream_create(self, stream: int, flags: int) -> None:
        self._streams.add(stream)

    def op_stream_destroy(self, stream: int) -> None:
        self._streams.discard(stream)

    def _stream(self, stream: int) -> None:
        if stream not in self._streams:
            raise AgentError("HandleError", f"unknown stream handle {stream}")

    def op_stream_synchronize(self, stream: int) -> None:
        self._stream(stream)

    def op_stream_query(self, stream: int) -> bool:
        self._stream(stream)
        return True

    def op_stream_wait_event(self, stream: int, event: int) -> None:
        self._stream(stream)
        self._event(event)

    def op_event_create(self, event: int, flags: int) -> None:
        self._events[event] = None

    def op_event_destroy(self, event: int) -> None:
        self._events.pop(event, None)

    def _event(self, event: int) -> float | None:
        if event not in self._events:
            raise AgentError("HandleError", f"unknown event handle {event}")
        return self._events[event]

    def op_event_record(self, event: int, stream: int | None) -> None:
        self._event(event)
        self._events[event] = time.perf_counter()

    def op_event_synchronize(self, event: int) -> None:
        self._event(event)

    def op_event_query(self, event: int) -> bool:
        self._event(event)
        return True

    def op_event_elapsed(self, start: int, end: int) -> float:
        t0, t1 = self._event(start), self._event(end)
        if t0 is None or t1 is None:
            raise AgentError("LogicError", "event_elapsed: an event was never recorded "
                                "(cuEventElapsedTime: invalid resource handle)")
        return (t1 - t0) * 1e3

    # }}}

    def op_array(self, function: str, out: list[Any] | None, operands: list[Any],
                 kwargs: dict[str, Any], stream: int | None) -> None:
        views = [self.view(x) if isinstance(x, list) else x for x in operands]
        try:
            apply(function, None if out is None else self.view(out), views, kwargs, self.view)
        except ArrayFunctionNeedsGPU as e:
            raise _refuse(f"{function}: {e};") from None
        except ArrayFunctionError as e:
            raise AgentError("LogicError", f"{function}: {e}") from None

    # {{{ CUDA C: refused

    def op_module_source(self, *args: Any) -> None:
        raise _refuse("SourceModule (CUDA C compiled with nvcc)")

    def op_module_image(self, *args: Any) -> None:
        raise _refuse("a CUDA module image (cubin/PTX)")

    def op_module_link(self, *args: Any) -> None:
        raise _refuse("DynamicModule / DynamicSourceModule (relocatable CUDA C linked with "
                      "cudadevrt: dynamic parallelism)")

    def op_curand_new(self, *args: Any) -> None:
        raise _refuse("a pycuda.curandom cuRAND generator")

    def op_curand_call(self, *args: Any) -> None:
        raise _refuse("a pycuda.curandom cuRAND generator")

    def op_curand_free(self, *args: Any) -> None:
        return None

    def op_module_unload(self, *args: Any) -> None:
        return None

    def op_get_function(self, *args: Any) -> None:
        raise _refuse("a CUDA kernel function")

    def op_get_global(self, *args: Any) -> None:
        raise _refuse("a CUDA module global")

    def op_function_attribute(self, *args: Any) -> None:
        raise _refuse("a CUDA kernel function")

    def op_function_set(self, *args: Any) -> None:
        raise _refuse("a CUDA kernel function")

    def op_launch(self, *args: Any) -> None:
        raise _refuse("launching a raw CUDA kernel")

    def op_elementwise_new(self, *args: Any) -> None:
        raise _refuse("ElementwiseKernel (CUDA C)")

    def op_elementwise_call(self, *args: Any) -> None:
        raise _refuse("ElementwiseKernel (CUDA C)")

    def op_reduction_new(self, *args: Any) -> None:
        raise _refuse("ReductionKernel (CUDA C)")

    def op_reduction_call(self, *args: Any) -> None:
        raise _refuse("ReductionKernel (CUDA C)")

    # }}}

    # {{{ the data tree: files are read straight into the emulated device's host memory

    def fill_from_file(self, dst: int, opened: OpenedFile, offset: int, nbytes: int) -> None:
        read_exactly(opened.fd, memoryview(self._bytes(dst, nbytes)), offset, opened.path)

    def write_to_file(self, src: int, nbytes: int, fd: int, file_offset: int) -> None:
        write_all(fd, memoryview(self._bytes(src, nbytes)), file_offset, "the saved file")

    # }}}

    def device_bytes(self) -> int:
        return sum(m.size for m in self._memory.values())

    def mapped_chunks(self) -> list[tuple[int, int]]:
        return [(addr, self._memory[addr].size) for addr in self._starts]

    def read_into(self, addr: int, out: memoryview) -> None:
        np.frombuffer(out, np.uint8)[:] = self._bytes(addr, out.nbytes)

    def write_from(self, addr: int, data: memoryview) -> None:
        self._bytes(addr, data.nbytes)[:] = np.frombuffer(data, np.uint8)

    def torch_reserve(self, nbytes: int) -> None:
        self._executor.reserve(nbytes)

    def torch_unreserve(self, nbytes: int) -> None:
        self._executor.unreserve(nbytes)

    def close(self) -> None:
        self.torch_close()
        for addr in list(self._starts):
            self.op_free(addr)
        self._streams.clear()
        self._events.clear()


class EmulatedExecutor(Executor):
    name = "emulated"
    emulated = True

    def __init__(self, memory: int = 16 << 30, *, staging: int = 0) -> None:
        self.total = memory
        self.used = 0
        # host buffers for device-to-host copies, reused once their reply is sent (what the
        # pycuda executor does with page-locked ones): a copy does not pay for fresh pages
        self.staging = StagingBuffers(staging, lambda nbytes: np.empty(nbytes, np.uint8))

    def reserve(self, size: int) -> None:
        if self.used + size > self.total:
            raise AgentError(
                "MemoryError",
                f"out of memory: {format_bytes(size)} requested, "
                f"{format_bytes(self.total - self.used)} of {format_bytes(self.total)} free on "
                "the emulated device (cuMemCreate: out of memory)",
                "CUDA_ERROR_OUT_OF_MEMORY")
        self.used += size

    def unreserve(self, size: int) -> None:
        self.used -= size

    def device_info(self) -> dict[str, Any]:
        return {
            "name": DEVICE_NAME,
            "compute_capability": [0, 0],
            "total_memory": self.total,
            "pci_bus_id": "emulated",
            "driver_version": 0,
            "emulated": True,
            "count": 1,
            "attributes": {
                "MAX_THREADS_PER_BLOCK": 1024, "MAX_BLOCK_DIM_X": 1024, "MAX_BLOCK_DIM_Y": 1024,
                "MAX_BLOCK_DIM_Z": 64, "MAX_GRID_DIM_X": 2**31 - 1, "MAX_GRID_DIM_Y": 65535,
                "MAX_GRID_DIM_Z": 65535, "WARP_SIZE": 32, "MULTIPROCESSOR_COUNT": 1,
                "MAX_SHARED_MEMORY_PER_BLOCK": 49152, "TOTAL_CONSTANT_MEMORY": 65536,
                "MAX_REGISTERS_PER_BLOCK": 65536, "CLOCK_RATE": 1000000,
                "COMPUTE_CAPABILITY_MAJOR": 0, "COMPUTE_CAPABILITY_MINOR": 0,
                "UNIFIED_ADDRESSING": 1, "CONCURRENT_KERNELS": 0, "ASYNC_ENGINE_COUNT": 0,
                "MAX_THREADS_PER_MULTIPROCESSOR": 2048, "L2_CACHE_SIZE": 0,
                "GLOBAL_MEMORY_BUS_WIDTH": 0, "MEMORY_CLOCK_RATE": 0,
            },
        }

    def mem_info(self) -> tuple[int, int]:
        return self.total - self.used, self.total

    def data_reader(self) -> dict[str, Any]:
        return {"reader": "host", "detail": "emulated device: files are read with pread "
                "straight into its host memory"}

    def open_session(self, base: int, size: int) -> EmulatedSession:
        session = EmulatedSession(self)
        session.resident_threads = resident_threads(self.device_info())
        self.attach_data(session)
        return session
