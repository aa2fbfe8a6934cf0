"""The real-GPU executor: forwarded calls run through pycuda on one device.

Device memory of sessions lives at client-chosen addresses (``vmm``); modules are compiled with
pycuda's SourceModule (nvcc; a client's sources cached per session, gpu_agent/compile_cache.py);
launches use the argument buffer the client packed, so a launch costs the agent no argument
parsing.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pycuda.driver as cuda
import pycuda.gpuarray as gpuarray
from pycuda.compiler import SourceModule
from pycuda.elementwise import ElementwiseKernel
from pycuda.reduction import ReductionKernel
from pycuda.tools import DeviceMemoryPool, get_or_register_dtype

from gpu_agent import compile_cache, nvcc_limits, nvcc_sandbox, nvml, profiling
from gpu_agent import protocol as P
from gpu_agent.datastore import OpenedFile
from gpu_agent.errors import AgentError
from gpu_agent.executors import pycuda_arrays, pycuda_curand
from gpu_agent.executors.base import Executor, ExecutorSession, resident_threads
from gpu_agent.executors.pycuda_files import FileTransfers, choose_reader
from gpu_agent.executors.torch_ops import TorchOps
from gpu_agent.executors.vmm import SessionMemory, VirtualMemory, VmmError
from gpu_agent.sizes import format_bytes
from gpu_agent.staging_buffers import StagingBuffers

log = logging.getLogger("harp.agent.pycuda")

#: CUDA events kept for the next profile's timings (a few hundred KiB of driver state at most)
_SPARE_EVENTS = 8192

# errors after which the CUDA context is unusable ("sticky"): the context must be recreated
_STICKY = ("ILLEGAL_ADDRESS", "illegal memory access", "LAUNCH_FAILED", "unspecified launch",
           "MISALIGNED_ADDRESS", "misaligned address", "ILLEGAL_INSTRUCTION", "illegal instruction",
           "HARDWARE_STACK_ERROR", "hardware stack error", "INVALID_PC", "invalid program counter",
           "ASSERT", "device-side assert", "CONTEXT_IS_DESTROYED")


class DevicePointer(int):
    """A device address pycuda accepts wherever it accepts an allocation."""

    def free(self) -> None:  # views never own memory
        return None


def _code(text: str) -> str | None:
    """The CUDA error name in a pycuda error message, if it names one."""
    for word in text.replace(":", " ").split():
        if word.startswith("CUDA_ERROR_"):
            return word.rstrip(".,)")
    return None


def _kind(error: Exception) -> str:
    for cls, kind in ((cuda.MemoryError, "MemoryError"), (cuda.LaunchError, "LaunchError"),
                      (cuda.LogicError, "LogicError"), (cuda.CompileError, "CompileError")):
        if isinstance(error, cls):
            return kind
    return "RuntimeError"


def _curand_version() -> list[int] | None:
    """The cuRAND version pycuda was built with (what pycuda.curandom.get_curand_version
    answers), or None without cuRAND."""
    try:
        from pycuda._driver import get_curand_version
    except ImportError:
        return None
    version = get_curand_version()
    return None if version is None else [int(x) for x in version]


def _limit(name: str) -> Any:
    """pycuda's ``limit`` member of a name ``ContextLimits`` knows."""
    which = getattr(cuda.limit, name, None)
    if which is None:
        raise AgentError("LogicError", f"this agent's pycuda has no limit {name}")
    return which


def _link_options(options: dict[str, Any]) -> dict[str, Any]:
    """DynamicModule's keyword arguments from module_link's options (checked by
    protocol.validate_call: nvcc_options.check_link_options)."""
    return {"no_extern_c": options.get("no_extern_c", False), "arch": options.get("arch"),
            "code": options.get("code"), "include_dirs": list(options.get("include_dirs", []))}


def link_module(inputs: list[Any], data: memoryview, options: dict[str, Any]) -> Any:
    """A module linked from ``inputs`` (protocol.link_input_problem) with pycuda's
    DynamicModule: sources compiled by this agent's nvcc, libraries from its CUDA toolkit."""
    from pycuda.compiler import DynamicModule

    kwargs = _link_options(options)
    for item in inputs:  # every range is checked before anything is compiled
        if item[0] == "data" and item[3] + item[4] > data.nbytes:
            raise AgentError("ProtocolError", f"module_link: data input {item[2]!r} reaches "
                             f"byte {item[3] + item[4]} of a {data.nbytes}-byte buffer")
    try:
        module = DynamicModule(**kwargs)
        for item in inputs:
            if item[0] == "source":
                module.add_source(item[1], nvcc_options=item[2] or None, name=item[3])
            elif item[0] == "data":
                module.add_data(bytes(data[item[3]:item[3] + item[4]]),
                                getattr(cuda.jit_input_type, item[1]), item[2])
            else:
                module.add_stdlib(item[1])
        return module.link()
    except (OSError, RuntimeError) as e:  # a library the toolkit lacks, an old GPU
        if isinstance(e, cuda.Error):
            raise
        raise AgentError("LogicError", f"DynamicModule: {e}") from None


def _register_dtypes(options: dict[str, Any]) -> None:
    """Register the dtypes the client's user code registered (struct types of its kernels)
    with this worker's pycuda, as pycuda.tools.get_or_register_dtype does in the user's
    process; a name pycuda already knows for another dtype is the user's error."""
    for name, dtype in P.registered_dtypes(options.get("dtypes")):
        try:
            get_or_register_dtype(name, dtype)
        except (RuntimeError, TypeError, ValueError) as e:
            raise AgentError("LogicError", f"register_dtype({name!r}): {e}") from None


class PycudaSession(TorchOps, ExecutorSession):
    def __init__(self, executor: PycudaExecutor, memory: SessionMemory) -> None:
        self._x = executor
        self.memory = memory
        # CUDA torch in this process runs in the primary context this executor retained
        self.torch_device = f"cuda:{executor.device_index}"
        self.modules: dict[int, Any] = {}
        self.functions: dict[int, Any] = {}
        self.streams: dict[int, cuda.Stream] = {}
        self.events: dict[int, cuda.Event] = {}
        self.kernels: dict[int, Any] = {}
        self.curands: dict[int, pycuda_curand.Generator] = {}
        #: profiling: a reference event and its host time, and the timed ops not yet collected
        self._reference: tuple[cuda.Event, int] | None = None
        #: (op, stream, start event, end event, batch seq, call index, span's call indices)
        self._timed: list[tuple[str, int | None, cuda.Event, cuda.Event, int, int,
                                list[int] | None]] = []
        #: events whose timings were collected, recorded again by the next profile: a profiled
        #: launch-bound loop pays two event records per op, not two creations as well
        self._spare_events: list[cuda.Event] = []

    # {{{ helpers

    def _stream(self, handle: int | None) -> cuda.Stream | None:
        if handle is None:
            return None
        try:
            return self.streams[handle]
        except KeyError:
            raise AgentError("HandleError", f"unknown stream handle {handle}") from None

    def _get(self, table: dict[int, Any], handle: int, what: str) -> Any:
        try:
            return table[handle]
        except KeyError:
            raise AgentError("HandleError", f"unknown {what} handle {handle}") from None

    def view(self, desc: list[Any]) -> gpuarray.GPUArray:
        addr, dtype, shape, strides = desc
        return gpuarray.GPUArray(tuple(shape), P.wire_dtype(dtype), allocator=self._x.pool.allocate,
                                 gpudata=DevicePointer(addr), strides=tuple(strides))

    def _operand(self, value: Any) -> Any:
        return self.view(value) if isinstance(value, list) else value

    # }}}

    # {{{ memory

    def op_alloc(self, addr: int, size: int) -> None:
        try:
            self._x.vmm.map(self.memory, addr, size)
        except VmmError as e:
            if e.out_of_memory:
                free, total = cuda.mem_get_info()
                raise AgentError(
                    "MemoryError", f"out of memory: {format_bytes(size)} requested, "
                    f"{format_bytes(free)} of {format_bytes(total)} free on the GPU ({e})",
                    "CUDA_ERROR_OUT_OF_MEMORY") from None
            raise AgentError("RuntimeError", str(e), e.name) from None
        cuda.memset_d8(addr, 0, size)  # a new tenant never sees an old tenant's data

    def op_free(self, addr: int) -> None:
        cuda.Context.synchronize()  # work in flight may still use it
        self._x.vmm.unmap(self.memory, addr)

    def op_htod(self, dst: int, data: Any, stream: int | None) -> None:
        s = self._stream(stream)
        if s is None:
            cuda.memcpy_htod(dst, data)
        else:
            cuda.memcpy_htod_async(dst, data, s)

    def op_dtoh(self, src: int, nbytes: int, stream: int | None) -> np.ndarray:
        out = self._x.staging.take(nbytes)
        s = self._stream(stream)
        if s is None:
            cuda.memcpy_dtoh(out, src)
        else:
            cuda.memcpy_dtoh_async(out, src, s)
            s.synchronize()
        return out

    def op_dtod(self, dst: int, src: int, nbytes: int, stream: int | None) -> None:
        s = self._stream(stream)
        if s is None:
            cuda.memcpy_dtod(dst, src, nbytes)
        else:
            cuda.memcpy_dtod_async(dst, src, nbytes, s)

    def op_memset(self, dst: int, value: int, width: int, count: int,
                  stream: int | None) -> None:
        name = {1: "memset_d8", 2: "memset_d16", 4: "memset_d32"}.get(width)
        if name is None:
            raise AgentError("LogicError", f"memset width must be 1, 2 or 4, not {width}")
        value &= (1 << (8 * width)) - 1
        s = self._stream(stream)
        if s is None:
            getattr(cuda, name)(dst, value, count)
        else:
            getattr(cuda, name + "_async")(dst, value, count, s)

    def op_mem_get_info(self) -> list[int]:
        return list(cuda.mem_get_info())

    def op_synchronize(self) -> None:
        cuda.Context.synchronize()

    def op_ping(self) -> int:
        return profiling.now_ns()

    def op_limit_get(self, name: str) -> int:
        self.limits.get(name)  # a name the agent knows
        return int(cuda.Context.get_limit(_limit(name)))

    def op_limit_set(self, name: str, value: int) -> None:
        self.limits.check_set(name, value)  # what this tenant may set, and its slot's room
        which = _limit(name)
        cuda.Context.set_limit(which, value)
        self.limits.set(name, int(cuda.Context.get_limit(which)))  # as CUDA rounded it

    def object_bytes(self) -> int:
        return self.torch_bytes() + self.limit_bytes()

    def gpu_timer_start(self, op: str, stream: int | None) -> Any:
        if len(self._timed) >= self.pending_gpu_timings:
            return None
        if self._reference is None:
            # GPU times are placed on the agent's clock relative to an event whose host time
            # is known: recorded on an idle device and waited for
            self._x.context.synchronize()
            reference = cuda.Event()
            reference.record()
            reference.synchronize()
            self._reference = (reference, profiling.now_ns())
        start = self._spare_events.pop() if self._spare_events else cuda.Event()
        start.record(self._stream(stream))
        return op, stream, start

    def gpu_timer_end(self, token: Any, seq: int, index: int,
                      span: list[int] | None = None) -> None:
        op, stream, start = token
        end = self._spare_events.pop() if self._spare_events else cuda.Event()
        end.record(self._stream(stream))
        self._timed.append((op, stream, start, end, seq, index, span))

    def op_profile_gpu(self) -> list[list[Any]]:
        timed, self._timed = self._timed, []
        if self._reference is None:
            return []
        reference, at = self._reference
        self._reference = None
        last_on_stream = {t[1]: t[3] for t in timed}
        for end in last_on_stream.values():
            end.synchronize()  # the events of one stream complete in order: the last is enough
        timings = []
        for op, stream, start, end, seq, index, span in timed:
            record = [op, stream, at + int(reference.time_till(start) * 1e6),
                      at + int(reference.time_till(end) * 1e6), seq, index]
            timings.append(record if span is None else [*record, span])
        spare = self._spare_events
        for t in timed[:max(0, (_SPARE_EVENTS - len(spare)) // 2)]:
            spare += (t[2], t[3])
        return timings

    # }}}

    # {{{ modules and launches

    def op_module_source(self, module: int, source: str, options: list[str], no_extern_c: bool,
                         arch: str | None, code: str | None, include_dirs: list[str]) -> None:
        with nvcc_sandbox.user_source():
            self.modules[module] = SourceModule(
                source, options=options or None, no_extern_c=no_extern_c, arch=arch, code=code,
                include_dirs=include_dirs)

    def op_module_image(self, module: int, image: Any) -> None:
        self.modules[module] = cuda.module_from_buffer(bytes(image))

    def op_module_link(self, module: int, inputs: list[Any], data: Any,
                       options: dict[str, Any]) -> None:
        with nvcc_sandbox.user_source():
            self.modules[module] = link_module(inputs, memoryview(data), options)

    def op_module_unload(self, module: int) -> None:
        self.modules.pop(module, None)

    def op_get_function(self, function: int, module: int, name: str) -> None:
        self.functions[function] = self._get(self.modules, module, "module").get_function(name)

    def op_get_global(self, module: int, name: str) -> list[int]:
        ptr, size = self._get(self.modules, module, "module").get_global(name)
        return [int(ptr), int(size)]

    def op_function_attribute(self, function: int, name: str) -> int:
        fn = self._get(self.functions, function, "function")
        return int(fn.get_attribute(getattr(cuda.function_attribute, name)))

    def op_function_set(self, function: int, what: str, value: int | None) -> None:
        fn = self._get(self.functions, function, "function")
        if what == "cache_config":
            fn.set_cache_config(cuda.func_cache.values[value])
        elif what == "shared_config":
            fn.set_shared_config(cuda.shared_config.values[value])
        elif what.startswith("attribute:"):
            fn.set_attribute(getattr(cuda.function_attribute, what.split(":", 1)[1]), value)
        else:
            raise AgentError("LogicError", f"function_set: unknown setting {what!r}")

    def op_launch(self, function: int, grid: list[int], block: list[int], shared: int,
                  stream: int | None, args: Any) -> None:
        fn = self._get(self.functions, function, "function")
        fn._launch_kernel(tuple(grid), tuple(block), bytes(args), shared, self._stream(stream))

    # }}}

    # {{{ streams and events

    def op_stream_create(self, stream: int, flags: int) -> None:
        self.streams[stream] = cuda.Stream(flags)

    def op_stream_destroy(self, stream: int) -> None:
        self.streams.pop(stream, None)

    def op_stream_synchronize(self, stream: int) -> None:
        self._get(self.streams, stream, "stream").synchronize()

    def op_stream_query(self, stream: int) -> bool:
        return bool(self._get(self.streams, stream, "stream").is_done())

    def op_stream_wait_event(self, stream: int, event: int) -> None:
        self._get(self.streams, stream, "stream").wait_for_event(
            self._get(self.events, event, "event"))

    def op_event_create(self, event: int, flags: int) -> None:
        self.events[event] = cuda.Event(flags)

    def op_event_destroy(self, event: int) -> None:
        self.events.pop(event, None)

    def op_event_record(self, event: int, stream: int | None) -> None:
        self._get(self.events, event, "event").record(self._stream(stream))

    def op_event_synchronize(self, event: int) -> None:
        self._get(self.events, event, "event").synchronize()

    def op_event_query(self, event: int) -> bool:
        return bool(self._get(self.events, event, "event").query())

    def op_event_elapsed(self, start: int, end: int) -> float:
        return float(self._get(self.events, end, "event").time_since(
            self._get(self.events, start, "event")))

    # }}}

    # {{{ arrays and user kernels

    def op_array(self, function: str, out: list[Any] | None, operands: list[Any],
                 kwargs: dict[str, Any], stream: int | None) -> None:
        try:
            pycuda_arrays.apply(function, None if out is None else self.view(out),
                                [self._operand(x) for x in operands], kwargs,
                                self._stream(stream), self.view)
        except pycuda_arrays.ArrayFunctionError as e:
            raise AgentError("LogicError", f"{function}: {e}") from None

    def op_elementwise_new(self, kernel: int, arguments: str, operation: str, name: str,
                           options: dict[str, Any]) -> None:
        _register_dtypes(options)
        elementwise = ElementwiseKernel(
            arguments, operation, name, options=options.get("options"),
            preamble=options.get("preamble", ""), loop_prep=options.get("loop_prep", ""),
            after_loop=options.get("after_loop", ""))
        # pycuda compiles lazily; compiling now lets the shim raise a CompileError at the call
        # that made the kernel (it waits for this op)
        with nvcc_sandbox.user_source():
            elementwise.generate_stride_kernel_and_types(False)
        self.kernels[kernel] = elementwise

    def op_elementwise_call(self, kernel: int, operands: list[Any], range_: list[int] | None,
                            stream: int | None) -> None:
        k = self._get(self.kernels, kernel, "kernel")
        extra: dict[str, Any] = {"stream": self._stream(stream)}
        if range_ is not None:
            extra["range"] = slice(*range_)
        with nvcc_sandbox.user_source():  # a call with a range compiles pycuda's range variant
            k(*[self._operand(x) for x in operands], **extra)

    def op_reduction_new(self, kernel: int, dtype_out: str, neutral: str, reduce_expr: str,
                         map_expr: str, arguments: str, options: dict[str, Any]) -> None:
        _register_dtypes(options)
        dtype = P.wire_dtype(dtype_out)
        if dtype is None:
            raise AgentError("ProtocolError", f"reduction_new: dtype {dtype_out[:80]!r} is not "
                             "allowed")
        with nvcc_sandbox.user_source():
            self.kernels[kernel] = ReductionKernel(
                dtype, neutral, reduce_expr, map_expr or None, arguments,
                name=options.get("name", "reduce_kernel"), options=options.get("options"),
                preamble=options.get("preamble", ""))

    def op_reduction_call(self, kernel: int, out: list[Any], operands: list[Any],
                          stream: int | None) -> None:
        k = self._get(self.kernels, kernel, "kernel")
        s = self._stream(stream)
        result = k(*[self._operand(x) for x in operands], stream=s)
        pycuda_arrays.store(self.view(out), result, s)

    def op_curand_new(self, generator: int, kind: str, options: dict[str, Any]) -> list[int]:
        if options:
            raise AgentError("ProtocolError", f"curand_new: unknown options {sorted(options)}")
        attributes = self._x.device_info()["attributes"]
        made = pycuda_curand.new_generator(
            kind, self.limits,
            attributes["MULTIPROCESSOR_COUNT"] * attributes["MAX_THREADS_PER_BLOCK"])
        self.curands[generator] = made
        return [made.count, made.state_bytes, int(made.rng.block_count),
                int(made.rng.generators_per_block)]

    def op_curand_call(self, generator: int, method: str, state: int, state_bytes: int,
                       params: list[Any], stream: int | None) -> None:
        pycuda_curand.call(self._get(self.curands, generator, "cuRAND generator"), method,
                           state, state_bytes, params, self._stream(stream), self.view,
                           self.limits)

    def op_curand_free(self, generator: int) -> None:
        self.curands.pop(generator, None)

    # }}}

    # {{{ the data tree (pycuda_files: GDS through kvikio, or pipelined pinned reads)

    def fill_from_file(self, dst: int, opened: OpenedFile, offset: int, nbytes: int) -> None:
        self._x.file_transfers().read(dst, opened, offset, nbytes)

    def write_to_file(self, src: int, nbytes: int, fd: int, file_offset: int) -> None:
        self._x.file_transfers().write(src, nbytes, fd, file_offset)

    # }}}

    def device_bytes(self) -> int:
        return sum(size for size, _ in self.memory.mapped.values())

    def mapped_chunks(self) -> list[tuple[int, int]]:
        return [(addr, self.memory.mapped[addr][0]) for addr in sorted(self.memory.mapped)]

    def read_into(self, addr: int, out: memoryview) -> None:
        cuda.Context.synchronize()  # work in flight finishes first, it is never interrupted
        cuda.memcpy_dtoh(np.frombuffer(out, np.uint8), addr)

    def write_from(self, addr: int, data: memoryview) -> None:
        cuda.memcpy_htod(addr, np.frombuffer(data, np.uint8))

    def torch_context_lost(self) -> None:
        self._x.context_lost = True

    def close(self) -> None:
        if not self._x.context_lost:
            self.torch_close()
        compile_cache.SESSION.forget()  # the next session of this process must not hit them
        self.kernels.clear()
        self.curands.clear()
        self.functions.clear()
        self.modules.clear()
        self.events.clear()
        self.streams.clear()
        try:
            cuda.Context.synchronize()
        except cuda.Error:
            pass
        self._x.vmm.release(self.memory)
        self._x.sessions.discard(self)


class PycudaExecutor(Executor):
    name = "pycuda"
    emulated = False

    def __init__(self, device: int = 0, *, pinned_staging: int = 0, nvcc: str = "") -> None:
        cuda.init()
        self.device_index = device
        self.device = cuda.Device(device)
        self.context = self.device.retain_primary_context()
        self.context.push()
        policy = nvcc_limits.NvccPolicy.parse(nvcc) if nvcc else nvcc_limits.DEFAULT_POLICY
        #: Landlock ABI nvcc runs under (0: none, and CUDA C from clients is refused unless the
        #: operator chose to compile it unsandboxed)
        self.nvcc_sandbox = nvcc_sandbox.install(policy)
        if policy.mode == nvcc_limits.UNSAFE:
            log.warning("%s", nvcc_limits.UNSAFE_WARNING)
        elif not self.nvcc_sandbox and policy.mode == nvcc_limits.SANDBOXED:
            log.warning("nvcc runs unsandboxed here: %s", nvcc_sandbox.UNAVAILABLE)
        self.vmm = VirtualMemory(device)
        self.pool = DeviceMemoryPool()
        # small reads too: into page-locked memory a 4-byte read took 7.3 µs on an H200
        # host, into pageable 9.0 (a read's result is copied out at once, so one buffer of each
        # size serves them all)
        self.staging = StagingBuffers(
            pinned_staging, lambda nbytes: cuda.pagelocked_empty(nbytes, np.uint8), min_bytes=1)
        self.sessions: set[PycudaSession] = set()
        self._info = self._read_info()
        self._file_transfers: FileTransfers | None = None

    def _read_info(self) -> dict[str, Any]:
        attributes = {}
        for name in dir(cuda.device_attribute):
            if name[0].isupper():
                try:
                    attributes[name] = int(self.device.get_attribute(
                        getattr(cuda.device_attribute, name)))
                except cuda.Error:
                    pass
        return {
            "name": self.device.name(),
            "compute_capability": list(self.device.compute_capability()),
            "total_memory": int(self.device.total_memory()),
            "pci_bus_id": self.device.pci_bus_id(),
            "driver_version": cuda.get_driver_version(),
            "emulated": False,
            "count": 1,
            "curand_version": _curand_version(),
            "attributes": attributes,
        }

    def device_info(self) -> dict[str, Any]:
        return self._info

    def mem_info(self) -> tuple[int, int]:
        free, total = cuda.mem_get_info()
        return int(free), int(total)

    def metrics(self) -> dict[str, Any]:
        return nvml.read(self.device.pci_bus_id())

    def file_transfers(self) -> FileTransfers:
        if self._file_transfers is None:
            self._file_transfers = FileTransfers(choose_reader(self.data_reader_choice))
        return self._file_transfers

    def data_reader(self) -> dict[str, Any]:
        if self.data_store.root is None:
            return {"reader": "none", "detail": "no --data-root: this agent serves no files"}
        return self.file_transfers().choice.to_status()

    def open_session(self, base: int, size: int) -> PycudaSession:
        try:
            memory = self.vmm.reserve(base, size)
        except VmmError as e:
            raise AgentError("RuntimeError", f"cannot reserve this session's address range "
                                f"{base:#x}+{size:#x}: {e}") from None
        session = PycudaSession(self, memory)
        session.resident_threads = resident_threads(self._info)
        self.sessions.add(session)
        self.attach_data(session)
        return session

    def run(self, method: Any, *args: Any) -> Any:
        """Call a session op, turning pycuda errors into AgentErrors (sticky ones reset)."""
        try:
            return method(*args)
        except AgentError:
            raise
        except cuda.Error as e:
            text = str(e)
            if any(marker in text for marker in _STICKY):
                # CUDA keeps such errors for the life of the process: only a new process has a
                # usable GPU again. This worker ends; its tenant alone loses its session.
                log.error("sticky CUDA error, this session's worker ends: %s", text)
                self.context_lost = True
                raise AgentError("ContextLost", text, _code(text)) from None
            raise AgentError(_kind(e), text) from None

    def close(self) -> None:
        if self.context_lost:
            return  # the context is unusable; the process is about to be replaced
        for session in list(self.sessions):
            session.close()
        if self._file_transfers is not None:
            self._file_transfers.close()
        try:
            self.context.pop()
        except cuda.Error:
            pass
