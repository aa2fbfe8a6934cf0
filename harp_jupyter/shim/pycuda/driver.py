"""pycuda.driver, forwarded to the GPU agent of this process's session.

The same names, signatures and semantics as pycuda's driver module, for what pycuda users use:
devices and contexts, device memory and copies, streams and events, modules and functions
(kernel arguments packed here exactly as pycuda packs them), and pycuda's exception classes.
Device queries are answered from the agent's welcome; calls whose result nobody reads (allocation,
copies to the device, launches, frees) return at once and are batched; the calls that read a
result are sync points. Nothing connects at import: the first call that needs the GPU does.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from gpu_agent.protocol import MAX_INLINE_BYTES, align_up
from harp_jupyter.shim.errors import (
    CompileError,
    Error,
    GPULostError,
    HandleError,
    LaunchError,
    LogicError,
    MemoryError,
    NotSupportedError,
    RuntimeError,
    user_facing,
    without_shim_frames,
)
from harp_jupyter.shim.pycuda import _kernel_args
from harp_jupyter.shim.pycuda._enums import (
    compute_mode,
    ctx_flags,
    device_attribute,
    event_flags,
    func_cache,
    function_attribute,
    host_alloc_flags,
    ipc_mem_flags,
    jit_input_type,
    jit_option,
    limit,
    mem_attach_flags,
    mem_host_register_flags,
    memory_type,
    pointer_attribute,
    shared_config,
)
from harp_jupyter.shim.session import RemoteSession, get_session

#: the CUDA API level the shim implements (pycuda's get_version() is its build-time CUDA)
SHIM_CUDA_VERSION = (12, 0, 0)

CUDA_DEBUGGING = False


def set_debugging(flag: bool = True) -> None:
    global CUDA_DEBUGGING
    CUDA_DEBUGGING = flag


def init(flags: int = 0) -> None:
    """Nothing to do locally: the agent's GPU is initialised by the agent."""


def get_version() -> tuple[int, int, int]:
    return SHIM_CUDA_VERSION


def get_driver_version() -> int:
    return int(get_session().device.get("driver_version") or 0)


def _unsupported(what: str) -> NotSupportedError:
    return NotSupportedError(f"{what} is not supported by HARP's forwarding shim")


# {{{ devices and contexts


def _limit_name(which: limit | int) -> str:
    try:
        return limit(int(which)).name
    except (TypeError, ValueError):
        raise LogicError(f"cuCtxGetLimit failed: invalid value ({which!r} is not a member of "
                         "pycuda.driver.limit)") from None


class Device:
    """A device of the agent (an agent serves one: ordinal 0). Queries need no round trip
    after the session's welcome; creating ``Device(0)`` needs none at all."""

    def __init__(self, number: int | str = 0) -> None:
        if isinstance(number, str):
            if number.lower() != str(get_session().device.get("pci_bus_id", "")).lower():
                raise LogicError(f"cuDeviceGetByPCIBusId failed: no device {number!r}")
            number = 0
        number = int(number)
        if number < 0 or (number > 0 and number >= Device.count()):
            raise LogicError("cuDeviceGet failed: invalid device ordinal")
        self._ordinal = number

    @staticmethod
    def count() -> int:
        return int(get_session().device.get("count", 1))

    @staticmethod
    def _info() -> dict[str, Any]:
        return get_session().device

    def name(self) -> str:
        return str(self._info().get("name", "unknown"))

    def compute_capability(self) -> tuple[int, int]:
        major, minor = self._info().get("compute_capability", (0, 0))
        return int(major), int(minor)

    def total_memory(self) -> int:
        return int(self._info().get("total_memory", 0))

    def pci_bus_id(self) -> str:
        return str(self._info().get("pci_bus_id", ""))

    def _attribute_values(self) -> dict[int, int]:
        values: dict[int, int] = {}
        for name, value in (self._info().get("attributes") or {}).items():
            member = device_attribute.__members__.get(str(name).upper())
            if member is not None:
                values[int(member)] = int(value)
        return values

    def get_attribute(self, attr: device_attribute | int) -> Any:
        values = self._attribute_values()
        key = int(attr)
        if key not in values:
            raise LogicError(f"cuDeviceGetAttribute failed: invalid value (attribute {attr!r}"
                             " not reported by the agent)")
        value = values[key]
        if key == device_attribute.COMPUTE_MODE:
            try:
                return compute_mode(value)
            except ValueError:
                return value
        return value

    def get_attributes(self) -> dict[device_attribute, Any]:
        values = self._attribute_values()
        return {device_attribute(key): self.get_attribute(key) for key in values
                if key in device_attribute._value2member_map_}

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        member = device_attribute.__members__.get(name.upper())
        if member is None:
            raise AttributeError(f"'Device' object has no attribute {name!r}")
        return self.get_attribute(member)

    def make_context(self, flags: int = 0) -> Context:
        context = Context(self, flags)
        context.push()
        return context

    def retain_primary_context(self) -> Context:
        return Context(self, 0, primary=True)

    def can_access_peer(self, dev: Device) -> bool:
        return dev == self

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Device) and other._ordinal == self._ordinal

    def __hash__(self) -> int:
        return hash(("harp-device", self._ordinal))

    def __repr__(self) -> str:
        return f"<pycuda.driver.Device {self._ordinal} (HARP agent)>"


_context_stack: list[Context] = []
_context_lock = threading.Lock()


class Context:
    """A context on the agent's device. The agent has one context per session; Context objects
    keep pycuda's push/pop bookkeeping on the client and cost no round trip."""

    def __init__(self, device: Device, flags: int = 0, primary: bool = False) -> None:
        self._device = device
        self._flags = int(flags)
        self._primary = primary
        self._detached = False
        self._cache_config = func_cache.PREFER_NONE
        self._shared_config = shared_config.DEFAULT_BANK_SIZE

    def push(self) -> None:
        with _context_lock:
            _context_stack.append(self)

    @staticmethod
    def pop() -> None:
        with _context_lock:
            if not _context_stack:
                raise LogicError("cuCtxPopCurrent failed: invalid device context")
            _context_stack.pop()

    def detach(self) -> None:
        with _context_lock:
            while self in _context_stack:
                _context_stack.remove(self)
            self._detached = True

    def attach(self, flags: int = 0) -> Context:
        return self

    @staticmethod
    def get_current() -> Context | None:
        return _context_stack[-1] if _context_stack else None

    @staticmethod
    def get_device() -> Device:
        current = Context.get_current()
        if current is None:
            raise LogicError("cuCtxGetDevice failed: invalid device context"
                             " (no currently active context)")
        return current._device

    @staticmethod
    @user_facing
    def synchronize() -> None:
        get_session().synchronize()

    @staticmethod
    def get_api_version() -> int:
        major, minor, _ = SHIM_CUDA_VERSION
        return major * 1000 + minor * 10

    @staticmethod
    def get_cache_config() -> func_cache:
        current = Context.get_current()
        return current._cache_config if current else func_cache.PREFER_NONE

    @staticmethod
    def set_cache_config(config: func_cache | int) -> None:
        current = Context.get_current()
        if current is not None:
            current._cache_config = func_cache(int(config))

    @staticmethod
    def get_shared_config() -> shared_config:
        current = Context.get_current()
        return current._shared_config if current else shared_config.DEFAULT_BANK_SIZE

    @staticmethod
    def set_shared_config(config: shared_config | int) -> None:
        current = Context.get_current()
        if current is not None:
            current._shared_config = shared_config(int(config))

    @staticmethod
    @user_facing
    def get_limit(which: limit | int) -> int:
        return int(get_session().call_sync("limit_get", _limit_name(which)))

    @staticmethod
    @user_facing
    def set_limit(which: limit | int, value: int) -> None:
        """Set in this session's own context on the agent (other tenants keep theirs); device
        memory the value makes CUDA reserve (stack, heap, printf FIFO) counts against this
        session's GPU memory, and the agent refuses what it cannot count."""
        value = int(value)
        if value < 0:
            raise LogicError(f"cuCtxSetLimit failed: invalid value (limit {value} < 0)")
        get_session().call_sync("limit_set", _limit_name(which), value)

    def __repr__(self) -> str:
        kind = "primary " if self._primary else ""
        return f"<pycuda.driver.Context ({kind}HARP agent)>"


# }}}

# {{{ device memory


class PointerHolderBase:
    """Base for user classes that stand for a device pointer (``get_pointer()``); their objects
    are passed to kernels and copies as that pointer, as in pycuda."""

    def get_pointer(self) -> int:
        raise NotImplementedError

    def __int__(self) -> int:
        return int(self.get_pointer())

    __index__ = __int__

    def as_buffer(self, size: int, offset: int = 0) -> Any:
        raise _unsupported("as_buffer (device memory is not mapped into this process)")


class DeviceAllocation:
    """Device memory of this session; ``int()`` is its address. Freed by ``free()`` or when
    garbage-collected."""

    __slots__ = ("__weakref__", "_address", "_finalizer", "_session", "_size")

    def __init__(self, session: RemoteSession, address: int, size: int) -> None:
        self._session = session
        self._address = address
        self._size = size
        self._finalizer = weakref.finalize(self, session.release_later, "free", address)
        self._finalizer.atexit = False

    def __int__(self) -> int:
        return self._address

    __index__ = __int__

    def free(self) -> None:
        if self._finalizer.detach() is None:
            raise HandleError("device_allocation::free failed: invalid resource handle"
                              " (already freed)")
        self._session.free(self._address)

    def as_buffer(self, size: int, offset: int = 0) -> Any:
        raise _unsupported("DeviceAllocation.as_buffer (device memory is not mapped into this"
                           " process)")

    def __repr__(self) -> str:
        return f"<pycuda.driver.DeviceAllocation {self._address:#x} ({self._size} bytes)>"


_POINTER_TYPES: tuple[type, ...] = (DeviceAllocation, PointerHolderBase)


def _session_of(pointer: Any) -> RemoteSession:
    """The session a pointer belongs to: its allocation's, or the process's."""
    session = getattr(pointer, "_session", None)
    if isinstance(session, RemoteSession):
        if session.lost or session.closed:
            raise GPULostError(f"device memory at {int(pointer):#x} belonged to a GPU session"
                               " that is gone; allocate it again")
        return session
    return get_session()


def _stream_handle(stream: Any) -> int | None:
    if stream is None:
        return None
    if isinstance(stream, Stream):
        return stream.handle
    return int(stream)


@user_facing
def mem_alloc(nbytes: int) -> DeviceAllocation:
    session = get_session()
    return DeviceAllocation(session, session.alloc(int(nbytes)), int(nbytes))


def mem_alloc_like(ary: Any) -> DeviceAllocation:
    return mem_alloc(ary.nbytes)


def mem_alloc_pitch(width: int, height: int, access_size: int) -> tuple[DeviceAllocation, int]:
    pitch = align_up(int(width), 512)
    return mem_alloc(pitch * int(height)), pitch


@user_facing
def mem_get_info() -> tuple[int, int]:
    return get_session().mem_get_info()


@user_facing
def memcpy_htod(dest: Any, src: Any) -> None:
    _session_of(dest).htod(int(dest), src)


def memcpy_htod_async(dest: Any, src: Any, stream: Any = None) -> None:
    _session_of(dest).htod(int(dest), src, _stream_handle(stream), keep=True)


@user_facing
def memcpy_dtoh(dest: Any, src: Any) -> None:
    _session_of(src).dtoh_into(dest, int(src))


def memcpy_dtoh_async(dest: Any, src: Any, stream: Any = None) -> None:
    _session_of(src).dtoh_into(dest, int(src), _stream_handle(stream), wait=False)


def memcpy_dtod(dest: Any, src: Any, size: int) -> None:
    _session_of(dest).call("dtod", int(dest), int(src), int(size), None)


def memcpy_dtod_async(dest: Any, src: Any, size: int, stream: Any = None) -> None:
    _session_of(dest).call("dtod", int(dest), int(src), int(size), _stream_handle(stream))


def _memset(dest: Any, value: int, width: int, count: int, stream: Any) -> None:
    mask = (1 << (8 * width)) - 1
    _session_of(dest).call("memset", int(dest), int(value) & mask, width, int(count),
                           _stream_handle(stream))


def memset_d8(dest: Any, data: int, count: int) -> None:
    _memset(dest, data, 1, count, None)


def memset_d16(dest: Any, data: int, count: int) -> None:
    _memset(dest, data, 2, count, None)


def memset_d32(dest: Any, data: int, count: int) -> None:
    _memset(dest, data, 4, count, None)


def memset_d8_async(dest: Any, data: int, count: int, stream: Any = None) -> None:
    _memset(dest, data, 1, count, stream)


def memset_d16_async(dest: Any, data: int, count: int, stream: Any = None) -> None:
    _memset(dest, data, 2, count, stream)


def memset_d32_async(dest: Any, data: int, count: int, stream: Any = None) -> None:
    _memset(dest, data, 4, count, stream)


@user_facing
def to_device(bf_obj: Any) -> DeviceAllocation:
    data = memoryview(bf_obj).tobytes()
    result = mem_alloc(len(data))
    memcpy_htod(result, data)
    return result


@user_facing
def from_device(devptr: Any, shape: Any, dtype: Any, order: str = "C") -> np.ndarray:
    result = np.empty(shape, dtype, order)
    memcpy_dtoh(result, devptr)
    return result


@user_facing
def from_device_like(devptr: Any, other_ary: np.ndarray) -> np.ndarray:
    result = np.empty_like(other_ary)
    memcpy_dtoh(result, devptr)
    return result


# }}}

# {{{ host memory: plain NumPy arrays here (the client's memory is never the GPU's)


def pagelocked_empty(shape: Any, dtype: Any, order: str = "C", mem_flags: int = 0) -> np.ndarray:
    return np.empty(shape, dtype, order)


def pagelocked_zeros(shape: Any, dtype: Any, order: str = "C", mem_flags: int = 0) -> np.ndarray:
    return np.zeros(shape, dtype, order)


def _order_of(array: np.ndarray) -> str:
    if array.flags.c_contiguous:
        return "C"
    if array.flags.f_contiguous:
        return "F"
    raise ValueError("could not detect array order")


def pagelocked_empty_like(array: np.ndarray, mem_flags: int = 0) -> np.ndarray:
    return np.empty(array.shape, array.dtype, _order_of(array))


def pagelocked_zeros_like(array: np.ndarray, mem_flags: int = 0) -> np.ndarray:
    return np.zeros(array.shape, array.dtype, _order_of(array))


def aligned_empty(shape: Any, dtype: Any, order: str = "C", alignment: int = 4096
                  ) -> np.ndarray:
    dtype = np.dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64))
    nbytes = count * dtype.itemsize
    raw = np.empty(nbytes + alignment, np.uint8)
    offset = -raw.ctypes.data % alignment
    return raw[offset:offset + nbytes].view(dtype).reshape(shape, order=order)


def aligned_zeros(shape: Any, dtype: Any, order: str = "C", alignment: int = 4096
                  ) -> np.ndarray:
    result = aligned_empty(shape, dtype, order, alignment)
    result.fill(0)
    return result


def aligned_empty_like(array: np.ndarray, alignment: int = 4096) -> np.ndarray:
    return aligned_empty(array.shape, array.dtype, _order_of(array), alignment)


def aligned_zeros_like(array: np.ndarray, alignment: int = 4096) -> np.ndarray:
    return aligned_zeros(array.shape, array.dtype, _order_of(array), alignment)


def register_host_memory(ary: np.ndarray, flags: int = 0) -> np.ndarray:
    return ary


# }}}

# {{{ kernel argument handlers


class ArgumentHandler:
    """A host array passed to a kernel through a temporary device copy."""

    def __init__(self, ary: Any) -> None:
        self.array = ary
        self.dev_alloc: DeviceAllocation | None = None

    def get_device_alloc(self) -> DeviceAllocation:
        if self.dev_alloc is None:
            try:
                self.dev_alloc = mem_alloc_like(self.array)
            except AttributeError:
                raise TypeError(f"could not determine array length of '{type(self.array)}':"
                                " unsupported array type or not an array") from None
        return self.dev_alloc

    def pre_call(self, stream: Any) -> None:
        pass


class In(ArgumentHandler):
    def pre_call(self, stream: Any) -> None:
        memcpy_htod(self.get_device_alloc(), self.array)


class Out(ArgumentHandler):
    def post_call(self, stream: Any) -> None:
        memcpy_dtoh(self.array, self.get_device_alloc())


class InOut(In, Out):
    pass


#: how ``Function.__call__`` packs its arguments
_ARGS = _kernel_args.ArgPacker(_POINTER_TYPES, ArgumentHandler, ArgumentHandler.get_device_alloc)


# }}}

# {{{ streams and events


class Stream:
    """A stream on the agent (``handle`` is its client-chosen id)."""

    def __init__(self, flags: int = 0) -> None:
        session = get_session()
        self._session = session
        self.handle = session.new_handle()
        session.call("stream_create", self.handle, int(flags))
        self._finalizer = weakref.finalize(self, session.release_later, "stream_destroy",
                                           self.handle)
        self._finalizer.atexit = False

    @user_facing
    def synchronize(self) -> None:
        self._session.call_sync("stream_synchronize", self.handle)

    @user_facing
    def is_done(self) -> bool:
        return bool(self._session.call_sync("stream_query", self.handle))

    def wait_for_event(self, event: Event) -> None:
        self._session.call("stream_wait_event", self.handle, event.handle)


class Event:
    """An event on the agent (``handle`` is its client-chosen id)."""

    def __init__(self, flags: int = 0) -> None:
        session = get_session()
        self._session = session
        self.handle = session.new_handle()
        session.call("event_create", self.handle, int(flags))
        self._finalizer = weakref.finalize(self, session.release_later, "event_destroy",
                                           self.handle)
        self._finalizer.atexit = False

    def record(self, stream: Any = None) -> Event:
        self._session.call("event_record", self.handle, _stream_handle(stream))
        return self

    @user_facing
    def synchronize(self) -> Event:
        self._session.call_sync("event_synchronize", self.handle)
        return self

    @user_facing
    def query(self) -> bool:
        return bool(self._session.call_sync("event_query", self.handle))

    @user_facing
    def time_since(self, event: Event) -> float:
        """Milliseconds from ``event`` to this event."""
        return float(self._session.call_sync("event_elapsed", event.handle, self.handle))

    @user_facing
    def time_till(self, event: Event) -> float:
        """Milliseconds from this event to ``event``."""
        return float(self._session.call_sync("event_elapsed", self.handle, event.handle))


# }}}

# {{{ modules and functions


class Module:
    """A module loaded on the agent (from source compiled there, or from an image)."""

    def __init__(self, session: RemoteSession, handle: int) -> None:
        self._session = session
        self.handle = handle
        self._finalizer = weakref.finalize(self, session.release_later, "module_unload", handle)
        self._finalizer.atexit = False

    def get_function(self, name: str) -> Function:
        handle = self._session.new_handle()
        self._session.call("get_function", handle, self.handle, str(name))
        return Function(self, handle, str(name))

    @user_facing
    def get_global(self, name: str) -> tuple[int, int]:
        address, size = self._session.call_sync("get_global", self.handle, str(name))
        return int(address), int(size)

    def get_texref(self, name: str) -> Any:
        raise _unsupported("texture references (Module.get_texref)")

    def get_surfref(self, name: str) -> Any:
        raise _unsupported("surface references (Module.get_surfref)")


@user_facing
def module_from_buffer(buffer: Any, options: Sequence[Any] | None = None,
                       message_handler: Callable[..., Any] | None = None) -> Module:
    """A module from a cubin/PTX/fatbin image (loaded on the agent; ``options`` are ignored)."""
    image = buffer.encode() if isinstance(buffer, str) else memoryview(buffer).tobytes()
    session = get_session()
    handle = session.new_handle()
    session.call("module_image", handle, image)
    return Module(session, handle)


@user_facing
def module_from_file(filename: str) -> Module:
    with open(filename, "rb") as f:
        return module_from_buffer(f.read())


_dims_cache: dict[tuple[int, ...], list[int]] = {}


def _dims(value: Any, what: str) -> list[int]:
    """``value`` (grid or block) as the wire's list of 1-3 ints."""
    try:
        return _dims_cache[value]
    except (KeyError, TypeError):
        pass
    dims = [int(x) for x in value]
    if not 1 <= len(dims) <= 3 or min(dims) < 0:
        raise ValueError(f"{what} must have 1 to 3 non-negative dimensions, got {value!r}")
    if isinstance(value, tuple) and len(_dims_cache) < 1024:
        _dims_cache[value] = dims
    return dims


class Function:
    """A kernel of a Module. Calls pack their arguments as pycuda does and are launched on the
    agent (op ``launch``); they return at once unless a result must be read."""

    def __init__(self, module: Module, handle: int, name: str) -> None:
        self.module = module
        self.handle = handle
        self.name = name
        self._session = module._session

    def _launch_kernel(self, grid: Any, block: Any, arg_buf: bytes, shared: int,
                       stream: Any) -> None:
        # the hot path: a kernel's packed arguments are almost always a small bytes object,
        # queued as it is
        arg_buf = bytes(arg_buf)
        args = (self.handle, _dims(grid, "grid"), _dims(block, "block"), int(shared or 0),
                None if stream is None else _stream_handle(stream), arg_buf)
        if len(arg_buf) < MAX_INLINE_BYTES:
            self._session.call_inline("launch", *args)
        else:
            self._session.call("launch", *args)

    def __call__(self, *args: Any, grid: Any = (1, 1), stream: Any = None, block: Any = None,
                 shared: int = 0, texrefs: Any = None, time_kernel: bool = False,
                 **extra: Any) -> float | None:
        __tracebackhide__ = True  # IPython hides frames that set it
        # not @user_facing: a launch is the hot path, and try costs nothing until it raises
        try:
            if extra:
                raise ValueError("extra keyword arguments: {}".format(",".join(extra)))
            if block is None:
                raise ValueError("must specify block size")
            if texrefs:
                raise _unsupported("texture references (texrefs=)")
            handlers, arg_buf = _ARGS.pack_call(args)
            if handlers or time_kernel:
                return self._call_with_handlers(handlers, arg_buf, grid, block, shared, stream,
                                                time_kernel)
            self._launch_kernel(grid, block, arg_buf, shared, stream)
            return None
        except Error as e:
            e.__traceback__ = without_shim_frames(e.__traceback__)
            raise

    def _call_with_handlers(self, handlers: list[Any], arg_buf: bytes, grid: Any, block: Any,
                            shared: int, stream: Any, time_kernel: bool) -> float | None:
        for handler in handlers:
            handler.pre_call(stream)
        post_handlers = [h for h in handlers if hasattr(h, "post_call")]
        if stream is not None:
            assert not time_kernel, "Can't time the kernel on an asynchronous invocation"
            self._launch_kernel(grid, block, arg_buf, shared, stream)
            for handler in post_handlers:
                handler.post_call(stream)
            return None
        if time_kernel:
            Context.synchronize()
            start = time.time()
        self._launch_kernel(grid, block, arg_buf, shared, None)
        if post_handlers or time_kernel:
            Context.synchronize()
            run_time = time.time() - start if time_kernel else None
            for handler in post_handlers:
                handler.post_call(stream)
            return run_time
        return None

    def prepare(self, arg_types: Sequence[Any], texrefs: Sequence[Any] | None = None
                ) -> Function:
        if texrefs:
            raise _unsupported("texture references (texrefs=)")
        self.texrefs = list(texrefs or [])
        self.arg_format = _kernel_args.format_for_types(arg_types)
        return self

    @property
    def arg_format(self) -> str:
        return self._arg_format

    @arg_format.setter
    def arg_format(self, fmt: str) -> None:
        # the prepared calls' packer, found once here rather than at every call
        self._pack = _kernel_args.packer_for(fmt)
        self._arg_format = fmt

    def _prepared_pack(self, args: tuple[Any, ...]) -> bytes:
        try:
            pack = self._pack
        except AttributeError:
            raise AttributeError("'Function' object has no attribute 'arg_format': call "
                                 "prepare(arg_types) before the prepared_* calls") from None
        return pack(*args)

    @staticmethod
    def _check_block(block: Any, method: str) -> None:
        if not isinstance(block, tuple | list):
            raise ValueError(f"{method}: pass the block size as a tuple (the form without it,"
                             " deprecated since pycuda 2011.1, is not supported)")

    def prepared_call(self, grid: Any, block: Any, *args: Any, shared_size: int = 0) -> None:
        if type(block) is not tuple:
            self._check_block(block, "prepared_call")
        self._launch_kernel(grid, block, self._prepared_pack(args), shared_size, None)

    def prepared_timed_call(self, grid: Any, block: Any, *args: Any,
                            shared_size: int = 0) -> Callable[[], float]:
        self._check_block(block, "prepared_timed_call")
        arg_buf = self._prepared_pack(args)
        start, end = Event(), Event()
        start.record()
        self._launch_kernel(grid, block, arg_buf, shared_size, None)
        end.record()

        def get_call_time() -> float:
            end.synchronize()
            return end.time_since(start) * 1e-3

        return get_call_time

    def prepared_async_call(self, grid: Any, block: Any, stream: Any, *args: Any,
                            shared_size: int = 0) -> None:
        if type(block) is not tuple:
            self._check_block(block, "prepared_async_call")
        self._launch_kernel(grid, block, self._prepared_pack(args), shared_size, stream)

    @user_facing
    def get_attribute(self, attr: function_attribute | int) -> int:
        name = function_attribute(int(attr)).name
        return int(self._session.call_sync("function_attribute", self.handle, name))

    def set_attribute(self, attr: function_attribute | int, value: int) -> None:
        name = function_attribute(int(attr)).name
        self._session.call("function_set", self.handle, f"attribute:{name}", int(value))

    def set_cache_config(self, config: func_cache | int) -> None:
        self._session.call("function_set", self.handle, "cache_config", int(config))

    def set_shared_config(self, config: shared_config | int) -> None:
        self._session.call("function_set", self.handle, "shared_config", int(config))

    def param_set_texref(self, texref: Any) -> None:
        raise _unsupported("texture references (param_set_texref)")

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        member = function_attribute.__members__.get(name.upper())
        if member is None:
            raise AttributeError(f"'Function' object has no attribute {name!r}")
        return self.get_attribute(member)


# }}}


__all__ = [
    "CUDA_DEBUGGING", "ArgumentHandler", "CompileError", "Context", "Device", "DeviceAllocation",
    "Error", "Event", "Function", "GPULostError", "In", "InOut", "LaunchError", "LogicError",
    "MemoryError", "Module", "NotSupportedError", "Out", "PointerHolderBase", "RuntimeError",
    "Stream", "aligned_empty", "aligned_empty_like", "aligned_zeros", "aligned_zeros_like",
    "compute_mode", "ctx_flags", "device_attribute", "event_flags", "from_device",
    "from_device_like", "func_cache", "function_attribute", "get_driver_version", "get_version",
    "host_alloc_flags", "init", "ipc_mem_flags", "jit_input_type", "jit_option", "limit",
    "mem_alloc", "mem_alloc_like", "mem_alloc_pitch", "mem_attach_flags", "mem_get_info",
    "mem_host_register_flags", "memcpy_dtod", "memcpy_dtod_async", "memcpy_dtoh",
    "memcpy_dtoh_async", "memcpy_htod", "memcpy_htod_async", "memory_type", "memset_d8",
    "memset_d8_async", "memset_d16", "memset_d16_async", "memset_d32", "memset_d32_async",
    "module_from_buffer", "module_from_file", "pagelocked_empty", "pagelocked_empty_like",
    "pagelocked_zeros", "pagelocked_zeros_like", "pointer_attribute", "register_host_memory",
    "set_debugging", "shared_config", "to_device",
]
