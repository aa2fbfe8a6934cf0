"""The forwarding protocol between the shim (client) and a GPU agent.

This module is the contract. It does no I/O and knows no CUDA: it names the messages, encodes and
decodes them, and validates every call against the table of operations below.

Two connections (ARCHITECTURE §2): the client's DEALER to the agent's *supervisor* carries
leases, the session's lifecycle and status; once welcomed, a second DEALER to the session's own
*worker* (its endpoint and a one-time ``attach`` token are in ``welcome``) carries the batches, so
the hot path has no Python hop in between. One ZeroMQ multipart message on either::

    frame 0      msgpack header (a map, key "t" says the message type)
    frame 1..n   raw buffers, referenced from the header by ``FrameRef(i)`` (i >= 1)

Large host buffers never go through msgpack: they travel as their own frames, sent and received
zero-copy. Pickle is never used. Small buffers may be inlined as msgpack ``bin``.

Message types
-------------
client -> supervisor
    ``hello``   {t, v, token, lease: [lease_id, lease_token], client: {pid, host, user, ...},
                 resume?: {session, resume_token, from?}}     needs a held lease (below)
    ``status``  {t, token?, rid?, kernel_id?, kernel_secret?}  only ``{t}`` without the token
                                                when the agent has one: liveness, no details
    ``park``    {t, rid}                        parks this connection's session (after its batches)
    ``bye``     {t}                             ends the session, frees everything it holds
client -> worker
    ``attach``  {t, session, attach}            first message on the worker connection
    ``batch``   {t, q: seq, c: [call, ...]}    each call is ``[op, *args]`` (see ``OPS``)
supervisor -> client
    ``welcome`` {t, v, session, resume_token, resumed, range: [base, size], device: {...},
                 executor, agent: {...}, worker: endpoint, attach: token, slot: {...},
                 max_frame: bytes}              the largest frame the worker takes
    ``parked``  {t, rid, session, bytes}
    ``lost``    {t, session, e: error}          pushed when the session's worker is gone
    ``status``  {t, ...}
    ``error``   {t, e: error}                   for a message that is not valid
worker -> client
    ``attached`` {t, session}
    ``reply``   {t, q: seq, r: [[call_index, value], ...], e: error | None, out?: str}

Leases (docs/leases-design.md): ``lease_request`` {rid, kernel_id, kernel_secret, user,
ttl?, info?}, ``lease_renew`` {rid, lease_id, token} and ``lease_release`` {rid, lease_id, token}
are answered by ``lease`` {rid, lease: LeaseInfo}; a ``lease`` without ``rid`` is pushed to the
holder's connection when its lease changes. ``drop_parked`` {rid, kernel_id, kernel_secret} and
``parked_forget`` {rid, session, resume_token} are answered by ``dropped`` {rid, sessions, bytes};
``parked_fetch`` {rid, session, resume_token, kernel_id} (agent to agent) by ``parked_state``
{rid, manifest}; ``parked_chunk`` {rid, session, resume_token, addr, offset, size} by
``parked_state`` {rid} plus one frame with those bytes (pieces of at most ``MAX_PIECE_BYTES``).
A draining agent offers its parked sessions to the others with ``parked_adopt`` {rid, token, from,
session, resume_token, kernel_id, kernel_secret, range, client}: the taker fetches the session
from ``from`` as above and answers ``parked`` {rid, session, bytes} once it keeps it.
Errors of requests with a ``rid`` echo it.

Every batch gets exactly one ``reply``, in order, after the agent has executed it: that is both the
result channel and the flow-control acknowledgement (the client keeps at most a bounded number of
batches unacknowledged). ``r`` carries the values of the calls that produce one (the ``OPS`` entries
with ``result=True``); byte results are ``FrameRef``s into the reply's frames, or under 4 KiB
(``batches.INLINE_RESULT_BYTES``) the bytes themselves.

Errors
------
``{"i": call_index | None, "op": op | None, "kind": KIND, "msg": str, "code": str | None}``.
An error in a call does not stop the batch: like CUDA's non-sticky errors, later calls still run,
and the client raises the first error at its next sync point, naming the original call and call site
(which the client remembers; sites never travel). ``kind`` is one of ``ERROR_KINDS``.

Addresses
---------
A session owns an address range ``[base, base + size)`` given in ``welcome``. The client places
every allocation inside it and uses the address as the allocation's handle. The agent maps memory
only in ``GRANULARITY``-aligned, ``GRANULARITY``-sized pieces (``alloc``), so the client
sub-allocates small buffers itself. Every other handle (module, function, stream, event, kernel)
is a small client-chosen integer, unique within the session.

Array descriptor
----------------
``[addr, dtype, shape, strides]``: ``dtype`` is NumPy's ``dtype.str`` (``"<f4"``), ``shape`` and
``strides`` (bytes) are lists of ints. A 0-d array has ``[]`` for both. An operand of an array
operation is either a descriptor or a scalar (int, float, bool, complex).
"""

from __future__ import annotations

import ast
import functools
import math
import re
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from gpu_agent import nvcc_options
from gpu_agent.errors import AgentError

PROTOCOL_VERSION = 1

#: Allocation granularity the agent maps in (CUDA VMM's minimum granularity on current GPUs).
GRANULARITY = 2 << 20

#: Where session address ranges start and how large each is (256 GiB: more than any one GPU holds).
#: Far below where Linux maps host memory and where CUDA places its own allocations (0x7f...):
#: seen on an H100 (driver 580), 0x7f0000000000 was taken in some fresh processes.
ADDRESS_SPACE_BASE = 0x2000_0000_0000
SESSION_RANGE_SIZE = 256 << 30

#: Limits a client and an agent both enforce.
MAX_CALLS_PER_BATCH = 4096
MAX_INLINE_BYTES = 64 << 10  # larger buffers must be frames
MAX_FRAME_BYTES = 1 << 34
MAX_INFLIGHT_BATCHES = 8

# message types
HELLO = "hello"
WELCOME = "welcome"
BATCH = "batch"
REPLY = "reply"
STATUS = "status"
BYE = "bye"
ERROR = "error"
PARK = "park"
PARKED = "parked"
LEASE_REQUEST = "lease_request"
LEASE_RENEW = "lease_renew"
LEASE_RELEASE = "lease_release"
LEASE = "lease"
DROP_PARKED = "drop_parked"
DROPPED = "dropped"
PARKED_FETCH = "parked_fetch"
PARKED_STATE = "parked_state"
PARKED_FORGET = "parked_forget"
PARKED_CHUNK = "parked_chunk"
PARKED_ADOPT = "parked_adopt"
ATTACH = "attach"
ATTACHED = "attached"
LOST = "lost"

#: Error kinds. The first six are pycuda.driver's exception names; the rest are ours.
ERROR_KINDS = (
    "Error",
    "LogicError",
    "LaunchError",
    "RuntimeError",
    "MemoryError",
    "CompileError",
    "ProtocolError",  # malformed message, unknown op, bad argument types
    "VersionMismatch",  # hello with another protocol version
    "AuthError",  # missing or wrong token
    "NotSupported",  # e.g. a raw CUDA kernel on the emulated executor
    "HandleError",  # unknown or freed handle, address outside the session's memory
    "ContextLost",  # the GPU context was reset (illegal address in some session)
    "SessionError",  # no session, or session closed
    "LeaseError",  # no held lease, wrong lease token, or the lease ended (calls did not run)
    "StateLost",  # parked GPU state that was dropped (TTL, capacity) or cannot be found
    "DataError",  # the agent's data tree refused a path, or a file is missing or malformed;
                  # ``code`` says which (docs/remote-data.md)
)


class ProtocolError(AgentError):
    """A message or call that does not follow this protocol."""

    def __init__(self, message: str) -> None:
        super().__init__("ProtocolError", message)


# {{{ ext types: frame references and complex scalars


@dataclass(frozen=True, slots=True)
class FrameRef:
    """Points at frame ``index`` (>= 1) of the same multipart message."""

    index: int


_EXT_FRAME = 1
_EXT_COMPLEX = 2
_COMPLEX = struct.Struct("<dd")
_U32 = struct.Struct("<I")


#: the first frame references and their encodings (a reply's result frames), made once
_FRAME_REFS = tuple(FrameRef(i) for i in range(64))
_FRAME_EXTS = tuple(msgpack.ExtType(_EXT_FRAME, _U32.pack(i)) for i in range(64))


def frame_ref(index: int) -> FrameRef:
    """``FrameRef(index)``, without making one for each reply."""
    return _FRAME_REFS[index] if 0 <= index < len(_FRAME_REFS) else FrameRef(index)


def _default(obj: Any) -> Any:
    if isinstance(obj, FrameRef):
        index = obj.index
        if 0 <= index < len(_FRAME_EXTS):
            return _FRAME_EXTS[index]
        return msgpack.ExtType(_EXT_FRAME, _U32.pack(index))
    if isinstance(obj, complex):
        return msgpack.ExtType(_EXT_COMPLEX, _COMPLEX.pack(obj.real, obj.imag))
    # numpy scalars and tuples reach here from careless callers; be strict
    item = getattr(obj, "item", None)
    if callable(item):
        return item()
    raise TypeError(f"cannot encode {type(obj).__name__} on the wire")


def _ext_hook(code: int, data: bytes) -> Any:
    if code == _EXT_FRAME and len(data) == 4:
        index = _U32.unpack(data)[0]
        return _FRAME_REFS[index] if index < len(_FRAME_REFS) else FrameRef(index)
    if code == _EXT_COMPLEX and len(data) == 16:
        re, im = _COMPLEX.unpack(data)
        return complex(re, im)
    raise ProtocolError(f"unknown msgpack extension type {code}")


_packer = msgpack.Packer(default=_default, use_bin_type=True)


def pack_header(header: dict) -> bytes:
    return _packer.pack(header)


def unpack_header(data: bytes | memoryview) -> dict:
    try:
        header = msgpack.unpackb(
            data,
            ext_hook=_ext_hook,
            raw=False,
            strict_map_key=False,
        )
    except ProtocolError:
        raise
    except Exception as e:  # msgpack raises several exception types for garbage
        raise ProtocolError(f"header is not valid msgpack: {e}") from None
    if not isinstance(header, dict) or not isinstance(header.get("t"), str):
        raise ProtocolError("header must be a map with a string 't' (message type)")
    return header


def encode(header: dict, frames: Sequence[Any] = ()) -> list[Any]:
    """The multipart message for ``header`` and its raw frames (buffers, sent as they are)."""
    return [pack_header(header), *frames]


def decode(parts: Sequence[Any]) -> tuple[dict, list[Any]]:
    """Header and frames of a received multipart message (frames as received)."""
    if not parts:
        raise ProtocolError("empty message")
    first = parts[0]
    buf = first.buffer if hasattr(first, "buffer") else first
    return unpack_header(buf), list(parts[1:])


def error(kind: str, msg: str, *, index: int | None = None, op: str | None = None,
          code: str | None = None) -> dict:
    assert kind in ERROR_KINDS, kind
    return {"i": index, "op": op, "kind": kind, "msg": msg, "code": code}


# }}}

# {{{ argument kinds and the table of operations

# Each argument kind is a validator: value -> bool.
def _is_int(v: Any) -> bool:
    return type(v) is int


def _is_uint(v: Any) -> bool:
    return type(v) is int and 0 <= v < 1 << 64


def _is_num(v: Any) -> bool:
    return type(v) in (int, float, bool, complex)


def _is_str(v: Any) -> bool:
    return type(v) is str


def _is_bool(v: Any) -> bool:
    return type(v) is bool


def _is_buf(v: Any) -> bool:
    return type(v) is bytes or type(v) is FrameRef


def _is_dim3(v: Any) -> bool:
    if type(v) is not list or not 1 <= len(v) <= 3:
        return False
    for x in v:  # a loop, not all(): every launch checks two of these
        if type(x) is not int or x < 0:
            return False
    return True


def _is_strlist(v: Any) -> bool:
    return type(v) is list and all(type(x) is str for x in v)


#: NumPy kinds an array may have on the wire: bool, integers, floats, complex. Structured dtypes
#: qualify when every field does. Object arrays would make NumPy read session bytes as pointers;
#: strings, datetimes and void blobs have no GPU meaning.
ARRAY_DTYPE_KINDS = "biufc"
MAX_DTYPE_TEXT = 256


@functools.lru_cache(maxsize=1024)
def wire_dtype(text: str) -> np.dtype | None:
    """The NumPy dtype an array descriptor's dtype text names, or None when it is not allowed
    (see ``ARRAY_DTYPE_KINDS``) or not a dtype at all."""
    if len(text) > MAX_DTYPE_TEXT:
        return None
    try:
        # a structured dtype travels as its ``descr`` (a list of (name, type[, shape]))
        dtype = np.dtype(ast.literal_eval(text) if text.startswith("[") else text)
    except (TypeError, ValueError, SyntaxError, MemoryError, RecursionError):
        return None
    return dtype if _numeric(dtype) else None


def _numeric(dtype: np.dtype) -> bool:
    if dtype.hasobject or dtype.itemsize == 0:
        return False
    if dtype.subdtype is not None:
        return _numeric(dtype.subdtype[0])
    if dtype.names is not None:
        return all(_numeric(dtype.fields[name][0]) for name in dtype.names)
    return dtype.kind in ARRAY_DTYPE_KINDS


#: C names of dtypes a user kernel may bring (``options["dtypes"]`` of elementwise_new and
#: reduction_new: what user code registered with pycuda.tools.register_dtype)
MAX_REGISTERED_DTYPES = 64
_C_TYPE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(::[A-Za-z_][A-Za-z0-9_]*)*")


def registered_dtypes(value: Any) -> list[tuple[str, np.dtype]]:
    """``[(c_name, dtype), ...]`` of a kernel's ``options["dtypes"]`` (``[[c_name, dtype
    text], ...]``), or ProtocolError saying what is wrong with it."""
    if value is None:
        return []
    if type(value) is not list or len(value) > MAX_REGISTERED_DTYPES:
        raise ProtocolError(f"dtypes must be a list of at most {MAX_REGISTERED_DTYPES} "
                            "[C name, dtype] pairs")
    found = []
    for pair in value:
        if not (type(pair) is list and len(pair) == 2 and type(pair[0]) is str
                and type(pair[1]) is str and len(pair[0]) <= 128
                and _C_TYPE_NAME.fullmatch(pair[0])):
            raise ProtocolError(f"dtypes: {_short(pair)} is not a [C type name, dtype] pair")
        dtype = wire_dtype(pair[1])
        if dtype is None:
            raise ProtocolError(f"dtypes: dtype {pair[1][:80]!r} of {pair[0]} is not allowed")
        found.append((pair[0], dtype))
    return found


def dtype_text(dtype: Any) -> str:
    """How a NumPy dtype travels in an array descriptor: ``dtype.str`` (``"<f4"``), or for a
    structured dtype its ``descr`` (``str`` would be a field-less ``"|V8"``)."""
    dtype = np.dtype(dtype)
    return dtype.str if dtype.names is None else str(dtype.descr)


def _descriptor_dtype(text: str) -> np.dtype:
    dtype = wire_dtype(text)
    if dtype is None:
        raise ProtocolError(f"dtype {text!r} is not allowed in an array descriptor")
    return dtype


def is_descriptor(v: Any) -> bool:
    return (
        type(v) is list
        and len(v) == 4
        and _is_uint(v[0])
        and type(v[1]) is str
        and wire_dtype(v[1]) is not None
        and type(v[2]) is list
        and type(v[3]) is list
        and len(v[2]) == len(v[3]) <= 32
        and all(type(x) is int and x >= 0 for x in v[2])
        and all(type(x) is int for x in v[3])
    )


def _is_operand(v: Any) -> bool:
    return _is_num(v) or is_descriptor(v)


def _is_operands(v: Any) -> bool:
    return type(v) is list and all(_is_operand(x) for x in v)


def _is_map(v: Any) -> bool:
    return type(v) is dict and all(type(k) is str for k in v)


#: inputs of one module_link (DynamicModule): sources, binary pieces and CUDA libraries
MAX_LINK_INPUTS = 64
LINK_INPUT_TYPES = ("CUBIN", "PTX", "FATBINARY", "OBJECT", "LIBRARY")
_LIBRARY_NAME = re.compile(r"[A-Za-z0-9_]{1,64}")


def link_input_problem(item: Any) -> str | None:
    """What is wrong with one input of module_link, or None. An input is one of
    ``["source", cuda_source, nvcc_options, name]``, ``["data", input_type, name, offset,
    size]`` (bytes ``[offset, offset + size)`` of the call's data buffer) and ``["stdlib",
    library]`` (a library of the agent's CUDA toolkit by its short name: ``cudadevrt``)."""
    if type(item) is not list or not item or type(item[0]) is not str:
        return "an input must be a list whose first item says its kind"
    kind = item[0]
    if kind == "source":
        if len(item) == 4 and _is_str(item[1]) and _is_strlist(item[2]) and _is_str(item[3]):
            return None
        return "a source input is [\"source\", source, [nvcc options], name]"
    if kind == "data":
        if (len(item) == 5 and item[1] in LINK_INPUT_TYPES and _is_str(item[2])
                and _is_uint(item[3]) and _is_uint(item[4])):
            return None
        return (f"a data input is [\"data\", type ({', '.join(LINK_INPUT_TYPES)}), name, "
                "offset, size]")
    if kind == "stdlib":
        if len(item) == 2 and _is_str(item[1]) and _LIBRARY_NAME.fullmatch(item[1]):
            return None
        return "a library input is [\"stdlib\", name] (letters, digits and _, e.g. cudadevrt)"
    return f"unknown input kind {kind!r} (source, data or stdlib)"


def _is_link_inputs(v: Any) -> bool:
    return (type(v) is list and 0 < len(v) <= MAX_LINK_INPUTS
            and all(link_input_problem(x) is None for x in v))


def _is_range(v: Any) -> bool:
    return type(v) is list and len(v) == 3 and all(type(x) is int for x in v)


# {{{ torch argument trees (docs/torch-design.md)

#: torch dtypes a tensor may have on the wire, by torch's name (``torch.float32`` -> "float32")
TORCH_DTYPES = frozenset((
    "float32", "float64", "float16", "bfloat16", "complex64", "complex128", "bool",
    "uint8", "int8", "int16", "int32", "int64"))
TORCH_MEMORY_FORMATS = frozenset((
    "contiguous_format", "preserve_format", "channels_last", "channels_last_3d"))
TORCH_LAYOUTS = frozenset(("strided",))
#: bounds of one torch call's argument tree (a deeper or larger one is refused whole)
MAX_TORCH_TREE_DEPTH = 16
MAX_TORCH_TREE_NODES = 1 << 16
MAX_TORCH_STRING = 4096
#: tensors one torch call may produce (a foreach op over every parameter of a model)
MAX_TORCH_OUTPUTS = 1 << 14
#: the tags of an argument tree: each is a map with exactly one of these keys
TORCH_TENSOR = "t"  # {"t": handle}: a tensor of this session
TORCH_DTYPE = "d"  # {"d": "float32"}
TORCH_DEVICE = "v"  # {"v": index}: the agent's device (its GPU, or the CPU when emulated)
TORCH_LAYOUT = "l"  # {"l": "strided"}
TORCH_MEMORY_FORMAT = "m"  # {"m": "channels_last"}
TORCH_HOST_TENSOR = "c"  # {"c": [dtype, shape, bytes]}: a small host tensor, inline
_SCALARS = (type(None), bool, int, float, complex)


def _torch_tag_ok(key: str, value: Any) -> bool:
    if key == TORCH_TENSOR:
        return _is_uint(value)
    if key == TORCH_DTYPE:
        return value in TORCH_DTYPES
    if key == TORCH_DEVICE:
        return type(value) is int and 0 <= value < 64
    if key == TORCH_LAYOUT:
        return value in TORCH_LAYOUTS
    if key == TORCH_MEMORY_FORMAT:
        return value in TORCH_MEMORY_FORMATS
    if key == TORCH_HOST_TENSOR:
        return (type(value) is list and len(value) == 3 and value[0] in TORCH_DTYPES
                and type(value[1]) is list and len(value[1]) <= 32
                and all(type(n) is int and n >= 0 for n in value[1])
                and type(value[2]) is bytes and len(value[2]) <= MAX_INLINE_BYTES)
    return False


def torch_tree_problem(tree: Any) -> str | None:
    """Why ``tree`` is not a valid torch argument tree ``[args, kwargs]``, or None.

    Values are None, bool, int, float, complex, str (at most ``MAX_TORCH_STRING``), lists, and
    one-key tagged maps (``TORCH_*`` above); the root is ``[list, {str: value}]``."""
    if not (type(tree) is list and len(tree) == 2 and type(tree[0]) is list
            and type(tree[1]) is dict):
        return "a torch argument tree is [args (list), kwargs (map)]"
    nodes = 0
    stack: list[tuple[Any, int]] = [(tree[0], 1), *((v, 1) for v in tree[1].values())]
    if not all(type(k) is str for k in tree[1]):
        return "keyword argument names must be strings"
    while stack:
        value, depth = stack.pop()
        nodes += 1
        if nodes > MAX_TORCH_TREE_NODES:
            return f"more than {MAX_TORCH_TREE_NODES} values in one torch call's arguments"
        if depth > MAX_TORCH_TREE_DEPTH:
            return f"torch call arguments nested deeper than {MAX_TORCH_TREE_DEPTH}"
        kind = type(value)
        if kind in _SCALARS:
            continue
        if kind is str:
            if len(value) > MAX_TORCH_STRING:
                return f"a string argument longer than {MAX_TORCH_STRING} characters"
            continue
        if kind is list:
            stack.extend((item, depth + 1) for item in value)
            continue
        if kind is dict and len(value) == 1:
            ((key, payload),) = value.items()
            if type(key) is str and _torch_tag_ok(key, payload):
                continue
            return f"a malformed tagged value {_short(value)}"
        return f"a value of type {kind.__name__} ({_short(value)})"
    return None


def _is_torch_args(v: Any) -> bool:
    return torch_tree_problem(v) is None


def _is_handles(v: Any) -> bool:
    return (type(v) is list and len(v) <= MAX_TORCH_OUTPUTS
            and all(v_ is None or _is_uint(v_) for v_ in v))


def _is_torch_dtype(v: Any) -> bool:
    return v in TORCH_DTYPES


# }}}


def _optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    def opt(v: Any) -> bool:
        return v is None or check(v)

    opt.__name__ = f"optional {check.__name__}"
    return opt


INT, UINT, NUM, STR, BOOL, BUF = _is_int, _is_uint, _is_num, _is_str, _is_bool, _is_buf
DIM3, STRS, DESC, OPERANDS, MAP, RANGE = (
    _is_dim3, _is_strlist, is_descriptor, _is_operands, _is_map, _is_range)
HANDLE = UINT
STREAM = _optional(UINT)  # None = the default (legacy NULL) stream
TORCH_ARGS, HANDLES = _is_torch_args, _is_handles
LINK_INPUTS = _is_link_inputs


#: the byte ranges ``[(address, nbytes), ...]`` a call's arguments name (checked against the
#: memory the session mapped before the executor sees the call)
Touches = Callable[[list[Any]], list[tuple[int, int]]]


@dataclass(frozen=True, slots=True)
class Op:
    """One operation: its argument validators, whether it produces a value, and what the agent
    must know about it (every per-operation table of the agent derives from these fields)."""

    args: tuple[Callable[[Any], bool], ...]
    result: bool = False
    doc: str = ""
    #: memory it reads or writes, from explicit (address, size) arguments; descriptors found in
    #: its arguments (DESC, OPERANDS, kwargs ``out2``) are checked as well (gpu_agent.batches)
    touches: Touches | None = None
    #: the kind of session object whose handle (argument 0) it creates, or destroys
    creates: str | None = None
    destroys: str | None = None
    #: it configures the object of kind ``configures`` at argument 0 (kept for replay)
    configures: str | None = None
    #: it puts work on the device (timed on the GPU while profiling, counted for idle time)
    gpu: bool = False


OPS: dict[str, Op] = {
    # context
    "synchronize": Op((), True, "cuCtxSynchronize; result None"),
    "mem_get_info": Op((), True, "-> [free, total]"),
    "ping": Op((), True, "-> agent monotonic time in ns (clock offset, liveness)"),
    "limit_get": Op((STR,), True, "limit_get(NAME) -> the context's limit NAME (a member of"
                                  " pycuda.driver.limit: STACK_SIZE, MALLOC_HEAP_SIZE, ...)"),
    "limit_set": Op((STR, UINT), False,
                    "limit_set(NAME, value): cuCtxSetLimit in this session's own context; device"
                    " memory the value reserves beyond CUDA's default counts against the slot"
                    " (gpu_agent/context_limits.py); kept for replay", creates="limit"),
    # profiling (gpu_agent/profiling.py)
    "profile_gpu": Op((), True, "-> GPU timings since the last call: [[op, stream, start_ns, "
                                "end_ns, batch seq, call index], ...], agent clock; a batch "
                                "span (p: 3) has op 'batch' and a 7th item, its call indices "
                                "(gpu_agent/profiling.py)"),
    "nvtx_push": Op((STR,), False, "open an NVTX range in the agent process (Nsight)"),
    "nvtx_pop": Op((), False, "close the innermost NVTX range the session opened"),
    # memory: addr and size multiples of GRANULARITY, inside the session's range
    "alloc": Op((UINT, UINT), False, "alloc(addr, size): map device memory exactly there"),
    "free": Op((UINT,), False, "free(addr): unmap what alloc(addr, ...) mapped"),
    "htod": Op((UINT, BUF, STREAM), False, "htod(dst, data, stream)",
               touches=lambda a: [(a[0], len(a[1]))], gpu=True),
    "dtoh": Op((UINT, UINT, STREAM), True, "dtoh(src, nbytes, stream) -> bytes (FrameRef)",
               touches=lambda a: [(a[0], a[1])], gpu=True),
    "dtod": Op((UINT, UINT, UINT, STREAM), False, "dtod(dst, src, nbytes, stream)",
               touches=lambda a: [(a[0], a[2]), (a[1], a[2])], gpu=True),
    "memset": Op((UINT, INT, INT, UINT, STREAM), False,
                 "memset(dst, value, width in bytes 1|2|4, count, stream)",
                 touches=lambda a: [(a[0], a[2] * a[3])], gpu=True),
    # modules and functions
    "module_source": Op((HANDLE, STR, STRS, BOOL, _optional(STR), _optional(STR), STRS), False,
                        "module_source(mod, source, options, no_extern_c, arch, code,"
                        " include_dirs): compiled with nvcc on the agent, cached",
                        creates="module"),
    "module_image": Op((HANDLE, BUF), False, "module_image(mod, cubin/ptx/fatbin bytes)",
                       creates="module"),
    "module_link": Op((HANDLE, LINK_INPUTS, BUF, MAP), False,
                      "module_link(mod, inputs, data, options {no_extern_c, arch, code,"
                      " include_dirs}): pycuda's DynamicModule, linked on the agent (sources"
                      " compiled to relocatable PTX by its nvcc, data pieces from data, libraries"
                      " of its CUDA toolkit such as cudadevrt: dynamic parallelism); inputs:"
                      " see link_input_problem", creates="module"),
    "module_unload": Op((HANDLE,), False, "", destroys="module"),
    "get_function": Op((HANDLE, HANDLE, STR), False, "get_function(fn, mod, name)",
                       creates="function"),
    "get_global": Op((HANDLE, STR), True, "get_global(mod, name) -> [addr, size]"),
    "function_attribute": Op((HANDLE, STR), True,
                             "function_attribute(fn, NAME) e.g. NUM_REGS -> int"),
    "function_set": Op((HANDLE, STR, _optional(INT)), False,
                       "function_set(fn, what, value): what = cache_config | shared_config |"
                       " attribute:NAME", configures="function"),
    "launch": Op((HANDLE, DIM3, DIM3, UINT, STREAM, BUF), False,
                 "launch(fn, grid, block, shared_bytes, stream, packed_args)", gpu=True),
    # streams and events
    "stream_create": Op((HANDLE, INT), False, "stream_create(stream, flags)",
                        creates="stream"),
    "stream_destroy": Op((HANDLE,), False, "", destroys="stream"),
    "stream_synchronize": Op((HANDLE,), True, ""),
    "stream_query": Op((HANDLE,), True, "-> bool (all work done)"),
    "stream_wait_event": Op((HANDLE, HANDLE), False, "stream_wait_event(stream, event)"),
    "event_create": Op((HANDLE, INT), False, "event_create(event, flags)", creates="event"),
    "event_destroy": Op((HANDLE,), False, "", destroys="event"),
    "event_record": Op((HANDLE, STREAM), False, "event_record(event, stream)"),
    "event_synchronize": Op((HANDLE,), True, ""),
    "event_query": Op((HANDLE,), True, "-> bool"),
    "event_elapsed": Op((HANDLE, HANDLE), True, "event_elapsed(start, end) -> milliseconds"),
    # array operations (gpuarray / cumath), executed as array operations on the agent
    "array": Op((STR, _optional(DESC), OPERANDS, MAP, STREAM), False,
                "array(function, out, operands, kwargs, stream): see ARRAY_FUNCTIONS",
                gpu=True),
    # the agent's data tree (docs/remote-data.md): files read straight into device memory
    "data_info": Op((), True, "-> {root, writable, reader, detail}: the tree and the read path"),
    "data_list": Op((STR,), True, "data_list(path) -> [{name, path, type: file|dir, size?,"
                                  " format?, dtype?, shape?, order?}, ...]"),
    "data_open": Op((STR, MAP), True,
                    "data_open(path, spec {format: auto|npy|npz|raw, key?, dtype?, shape?,"
                    " offset?, order?}) -> {format, dtype, shape, strides, order, nbytes,"
                    " offset, file} | {format: npz, members: [...]}"),
    "data_read": Op((UINT, STR, UINT, UINT, STR), True,
                    "data_read(dst, path, offset, nbytes, file): fill [dst, dst + nbytes) from"
                    " the file's bytes at offset (file: the identity data_open gave) -> nbytes;"
                    " complete when the reply is sent", touches=lambda a: [(a[0], a[3])],
                    gpu=True),
    "data_write": Op((DESC, STR, MAP), True,
                     "data_write(array, path, options {format: npy|raw, overwrite}) -> bytes"
                     " written (needs --data-writable)"),
    # user ElementwiseKernel / ReductionKernel (CUDA C: pycuda executor only)
    "elementwise_new": Op((HANDLE, STR, STR, STR, MAP), False,
                          "elementwise_new(kernel, arguments, operation, name, options:"
                          " {preamble, loop_prep, after_loop, options})", creates="kernel"),
    "elementwise_call": Op((HANDLE, OPERANDS, _optional(RANGE), STREAM), False,
                           "elementwise_call(kernel, operands, range [start, stop, step], stream)",
                           gpu=True),
    "reduction_new": Op((HANDLE, STR, STR, STR, STR, STR, MAP), False,
                        "reduction_new(kernel, dtype_out, neutral, reduce_expr, map_expr,"
                        " arguments, options: {name, preamble, options})", creates="kernel"),
    "reduction_call": Op((HANDLE, DESC, OPERANDS, STREAM), False,
                         "reduction_call(kernel, out (0-d), operands, stream)", gpu=True),
    # pycuda.curandom's cuRAND generators, run by the agent's pycuda (GPU only); the state
    # lives in session memory the client allocated, so it parks with the session
    "curand_new": Op((HANDLE, STR, MAP), True,
                     "curand_new(gen, kind, {}) -> [generators, state_bytes, block_count,"
                     " generators_per_block]: kind one of CURAND_KINDS", creates="curand"),
    "curand_call": Op((HANDLE, STR, UINT, UINT, OPERANDS, STREAM), False,
                      "curand_call(gen, method, state, state_bytes, params, stream): method one"
                      " of CURAND_METHODS", touches=lambda a: [(a[2], a[3])], gpu=True),
    "curand_free": Op((HANDLE,), False, "", destroys="curand"),
    # torch tensors (docs/torch-design.md): session objects with client-chosen handles, kept by
    # the agent's torch (CUDA on a GPU, CPU when emulated); parked with the session
    "torch_op": Op((HANDLES, STR, STR, TORCH_ARGS), False,
                   "torch_op(out_handles, op, schema, [args, kwargs]): run the aten overload op"
                   " (\"aten::add.Tensor\"; schema: the hash of its schema on the client)"
                   " and keep its tensor outputs, in order, under out_handles (None: an output"
                   " that is one of its arguments)", gpu=True),
    "torch_op_sync": Op((HANDLES, STR, STR, TORCH_ARGS), True,
                        "torch_op_sync(...) as torch_op -> its outputs, tensors as {t: [dtype,"
                        " shape, strides, offset]} (ops whose shapes depend on data, .item())",
                        gpu=True),
    "torch_write": Op((HANDLE, UINT, BUF), False,
                      "torch_write(tensor, byte offset, data): into a contiguous tensor",
                      gpu=True),
    "torch_download": Op((HANDLE, UINT, UINT), True,
                         "torch_download(tensor, byte offset, nbytes) -> bytes (FrameRef) of a"
                         " contiguous tensor", gpu=True),
    "torch_free": Op((HANDLES,), False, "torch_free([tensor, ...]): forget these handles"),
    "torch_seed": Op((INT,), False, "torch_seed(seed): torch.manual_seed on the agent"),
    "torch_info": Op((), True, "-> {version, device, cuda, schema_hash, tensors, bytes}"),
}

#: Array functions (the first argument of ``array``). Semantics are NumPy's for the same name,
#: computed into ``out`` (cast to out's dtype); the client infers out's dtype and shape as pycuda
#: does. ``kwargs`` per function is listed where it has any.
ARRAY_FUNCTIONS: dict[str, str] = {
    # elementwise, two operands (either may be a scalar)
    **{name: "binary" for name in (
        "add", "subtract", "multiply", "divide", "power", "equal", "not_equal", "less",
        "less_equal", "greater", "greater_equal", "minimum", "maximum", "fmod",
        "logical_and", "logical_or", "ldexp")},
    # elementwise, one operand
    **{name: "unary" for name in (
        "negative", "absolute", "sin", "cos", "tan", "arcsin", "arccos", "arctan", "sinh", "cosh",
        "tanh", "exp", "log", "log10", "sqrt", "ceil", "floor", "conj", "real", "imag",
        "logical_not")},
    # out = operands[0] converted to out's dtype (also strided -> contiguous copies)
    "copy": "unary",
    # out[...] = operands[0] (a scalar)
    "fill": "scalar",
    # out = start + step * arange(n); kwargs {start, step}
    "arange": "generator",
    # out = where(operands[0] != 0, operands[1], operands[2])
    "where": "ternary",
    # out = operands[0][operands[1]] (1-d take)
    "take": "binary",
    # reductions into a 0-d out: sum(a), dot(a, b), max(a), min(a), any(a), all(a)
    "sum": "reduction", "max": "reduction", "min": "reduction", "any": "reduction",
    "all": "reduction", "dot": "reduction2",
    # a * x + b * y, kwargs {a, b}: pycuda's axpbyz (also used for mul_add)
    "axpbyz": "binary",
    # frexp and modf write two outputs: out is the first; kwargs {out2: descriptor}
    "frexp": "unary2", "modf": "unary2",
    # out = reverse of 1-d operands[0]
    "reverse": "unary",
    # out = concatenate(operands, axis) / stack(operands, axis); kwargs {axis}
    "concatenate": "nary", "stack": "nary",
    # out = transpose(operands[0], axes); kwargs {axes}
    "transpose": "unary",
    # pycuda.curandom.rand's numbers (its MD5 generator) for kwargs {seed, grid, block}: the
    # seed the client drew as pycuda does, the launch pycuda's splay chose for out's size
    "rand_md5": "generator",
    # pycuda.scan: out = inclusive (or exclusive) scan of operands[0]; kwargs {expression (CUDA C
    # in a and b), neutral (C literal or None), exclusive, preamble, options}
    "scan": "unary",
}


#: pycuda.curandom's generator classes (``{kind}RandomNumberGenerator``)
CURAND_KINDS = ("XORWOW", "MRG32k3a", "Sobol32", "Sobol64", "ScrambledSobol32",
                "ScrambledSobol64")
#: curand_call's methods and their params: ``init`` [offset, seeds (pseudo-random kinds: an
#: int32 array of one seed per generator)], ``fill_*`` [out, ...]: uniform, normal,
#: log_normal (mean, stddev), poisson (lambda, or none: in place); ``skip_ahead*`` [i] or
#: [array of i]
CURAND_METHODS = ("init", "fill_uniform", "fill_normal", "fill_log_normal", "fill_poisson",
                  "skip_ahead", "skip_ahead_array", "skip_ahead_sequence",
                  "skip_ahead_sequence_array", "skip_ahead_subsequence",
                  "skip_ahead_subsequence_array")


def validate_call(call: Any) -> tuple[str, list[Any]]:
    """``(op, args)`` of a call, or ProtocolError saying exactly what is wrong."""
    # the per-call hot path of every batch: one generated check per op, the message built only
    # on failure
    if type(call) is not list or not call or type(call[0]) is not str:
        raise ProtocolError("a call must be a list [op, *args] with a string op")
    name = call[0]
    valid = _ARGUMENTS_VALID.get(name)
    if valid is None:
        raise ProtocolError(f"unknown operation {name!r}")
    args = call[1:]
    if not valid(args):
        checks = OPS[name].args
        if len(args) != len(checks):
            raise ProtocolError(f"{name} takes {len(checks)} arguments, got {len(args)}")
        raise _wrong_argument(name, checks, args)
    more = _MORE_CHECKS.get(name)
    if more is not None:
        more(name, args)
    return name, args


def _member_check(position: int, allowed: Any, what: str) -> Callable[[str, list[Any]], None]:
    def check(name: str, args: list[Any]) -> None:
        if args[position] not in allowed:
            raise ProtocolError(f"unknown {what} {args[position]!r}")

    return check


def _both(first: Callable[[str, list[Any]], None], second: Callable[[str, list[Any]], None]
          ) -> Callable[[str, list[Any]], None]:
    def check(name: str, args: list[Any]) -> None:
        first(name, args)
        second(name, args)

    return check


#: what some ops' arguments must be beyond their types
_MORE_CHECKS: dict[str, Callable[[str, list[Any]], None]] = {
    "array": _member_check(0, ARRAY_FUNCTIONS, "array function"),
    "curand_new": _member_check(1, CURAND_KINDS, "cuRAND generator"),
    "curand_call": _member_check(1, CURAND_METHODS, "cuRAND generator method"),
}
for _name in nvcc_options.COMPILING_OPS:
    _MORE_CHECKS[_name] = (_both(_MORE_CHECKS[_name], nvcc_options.check_call)
                           if _name in _MORE_CHECKS else nvcc_options.check_call)

_UINT_LIMIT = 1 << 64
#: the argument kinds a generated check writes inline (``{v}``: the argument), the rest are called
_INLINE_CHECKS: dict[Callable[[Any], bool], str] = {
    INT: "type({v}) is int",
    UINT: "(type({v}) is int and 0 <= {v} < _UINT_LIMIT)",
    STR: "type({v}) is str",
    BOOL: "type({v}) is bool",
    BUF: "(type({v}) is bytes or type({v}) is FrameRef)",
    STREAM: "({v} is None or (type({v}) is int and 0 <= {v} < _UINT_LIMIT))",
}


def _arguments_check(checks: tuple[Callable[[Any], bool], ...]) -> Callable[[list[Any]], bool]:
    """One function that says whether an argument list fits ``checks``: what validate_call's
    loop over the validators would say, in one call (a launch's six checks cost more called
    one by one than the rest of its validation)."""
    scope: dict[str, Any] = {"_UINT_LIMIT": _UINT_LIMIT, "FrameRef": FrameRef}
    if not checks:
        return lambda args: not args
    terms = []
    for i, check in enumerate(checks):
        inline = _INLINE_CHECKS.get(check)
        if inline is None:
            scope[f"_check{i}"] = check
            terms.append(f"_check{i}(a{i})")
        else:
            terms.append(inline.format(v=f"a{i}"))
    names = ", ".join(f"a{i}" for i in range(len(checks)))
    source = (f"def valid(args):\n"
              f"    if len(args) != {len(checks)}:\n"
              f"        return False\n"
              f"    {names}, = args\n"
              f"    return bool({' and '.join(terms)})\n")
    exec(compile(source, "<protocol.OPS argument check>", "exec"), scope)
    return scope["valid"]


#: derived from OPS: each op's generated argument check
_ARGUMENTS_VALID = {name: _arguments_check(op.args) for name, op in OPS.items()}


def _wrong_argument(name: str, checks: tuple[Callable[[Any], bool], ...],
                    args: list[Any]) -> ProtocolError:
    i, value = next((i, v) for i, (c, v) in enumerate(zip(checks, args, strict=False))
                    if not c(v))
    return ProtocolError(
        f"{name}: argument {i} has the wrong type ({type(value).__name__}: "
        f"{_short(value)}); expected {checks[i].__name__.lstrip('_').replace('is_', '')}")


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


#: positions of the BUF arguments (bytes inline, or a FrameRef to a frame) of each op that has any
BUF_POSITIONS: dict[str, tuple[int, ...]] = {
    name: positions
    for name, op in OPS.items()
    if (positions := tuple(i for i, check in enumerate(op.args) if check is BUF))
}
#: ops whose arguments may hold array descriptors (DESC, OPERANDS or a kwargs MAP)
DESCRIPTOR_OPS = frozenset(name for name, op in OPS.items()
                           if any(check in (DESC, OPERANDS, MAP) for check in op.args))
#: ops that create, configure or destroy a session object (kept for replay)
OBJECT_OPS = frozenset(name for name, op in OPS.items()
                       if op.creates or op.configures or op.destroys)


def descriptors_of(args: list[Any]) -> list[list[Any]]:
    """The array descriptors among a call's arguments (direct, in operand lists, and the
    ``out2`` of a map)."""
    found: list[list[Any]] = []
    for value in args:
        if is_descriptor(value):
            found.append(value)
        elif type(value) is list:
            found += [x for x in value if is_descriptor(x)]
        elif type(value) is dict and is_descriptor(value.get("out2")):
            found.append(value["out2"])
    return found


def descriptor_elements(desc: Sequence[Any]) -> int:
    """How many elements an operation on the descriptor works on: its shape's product, whatever
    its strides (a stride-0 or overlapping view covers few bytes but costs every element)."""
    return math.prod(desc[2])


def descriptor_extent(desc: Sequence[Any]) -> tuple[int, int]:
    """Byte range ``[lo, hi)`` an array descriptor touches (``hi == lo`` for an empty array)."""
    addr, dtype, shape, strides = desc
    itemsize = _descriptor_dtype(dtype).itemsize
    if any(n == 0 for n in shape):
        return addr, addr
    lo = hi = 0
    for n, s in zip(shape, strides, strict=True):
        if s >= 0:
            hi += (n - 1) * s
        else:
            lo += (n - 1) * s
    return addr + lo, addr + hi + itemsize


def align_up(n: int, to: int = GRANULARITY) -> int:
    return (n + to - 1) // to * to


def session_range(index: int) -> tuple[int, int]:
    """The address range of the agent's ``index``-th session slot."""
    return ADDRESS_SPACE_BASE + index * SESSION_RANGE_SIZE, SESSION_RANGE_SIZE


__all__ = [name for name in dir() if not name.startswith("_")
           and name not in ("ast", "math", "functools", "np", "msgpack", "re", "struct",
                            "nvcc_options")]
