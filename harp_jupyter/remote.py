"""Data that stays on the GPU side: files on the agent's machine, loaded straight into its device
memory, never through this notebook's network link.

::

    from harp_jupyter import remote
    remote.ls()                                   # what the agent serves (harp-agent --data-root)
    images = remote.load("train/images.npy")      # a GPUArray, filled on the agent
    both = remote.load("train/set.npz")           # {name: GPUArray}; or key="images"
    raw = remote.load_raw("train/x.f32", np.float32, (1024, 1024), offset=0)
    remote.save(result, "out/result.npy")         # needs harp-agent --data-writable

Each is a GPU call like any other: without a lease it leases first, and what was queued before it
is sent first (the call stream stays ordered). A loaded array is ordinary device memory of the
session, allocated here at a client-chosen address like any ``mem_alloc``: it parks and restores
with the session and is freed when garbage-collected. Errors of the agent's data tree are raised
as ``RemoteDataError`` subclasses that are also the matching builtin (``FileNotFoundError``,
``PermissionError``, ``FileExistsError``, ``ValueError``); see docs/remote-data.md.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np

from gpu_agent.sizes import format_bytes
from harp_jupyter.shim.callsite import CallSite
from harp_jupyter.shim.errors import DataError, Error, MemoryError, describe_site
from harp_jupyter.shim.pycuda import driver as drv
from harp_jupyter.shim.pycuda.gpuarray import GPUArray
from harp_jupyter.shim.session import RemoteSession, get_session

#: a load is sent as reads of at most this many bytes, each its own batch, so that the agent
#: answers lease renewals and status between them during a long load
READ_SEGMENT_BYTES = 1 << 30

_THIS_FILE = os.path.abspath(__file__)
_SHIM_DIR = os.path.join(os.path.dirname(_THIS_FILE), "shim") + os.sep


class RemoteDataError(DataError):
    """The agent's data tree refused a request, or a file is missing or malformed.
    ``code`` says which (docs/remote-data.md)."""


class RemoteFileNotFoundError(RemoteDataError, FileNotFoundError):
    pass


class RemoteFileExistsError(RemoteDataError, FileExistsError):
    pass


class RemotePathRefusedError(RemoteDataError, PermissionError):
    """A path outside the data root, a special file, or saving to a read-only root."""


class RemoteFormatError(RemoteDataError, ValueError):
    """Not a loadable array file: bad or truncated header, unsupported dtype, too short."""


_CLASS_OF_CODE: dict[str, type[RemoteDataError]] = {
    "NOT_FOUND": RemoteFileNotFoundError,
    "EXISTS": RemoteFileExistsError,
    **{code: RemotePathRefusedError for code in (
        "NO_DATA_ROOT", "BAD_PATH", "OUTSIDE_ROOT", "NOT_A_FILE", "NOT_A_DIRECTORY",
        "PERMISSION", "READ_ONLY")},
    **{code: RemoteFormatError for code in (
        "BAD_FORMAT", "TRUNCATED", "NOT_SUPPORTED", "CHANGED")},
}


def _user_site() -> CallSite | None:
    """The caller's frame outside this module and the shim (the notebook's line)."""
    frame = sys._getframe(1)
    while frame is not None:
        filename = frame.f_code.co_filename
        if filename != _THIS_FILE and not filename.startswith(_SHIM_DIR):
            return filename, frame.f_lineno, frame.f_code.co_name
        frame = frame.f_back
    return None


@contextlib.contextmanager
def _reported_at(site: CallSite | None) -> Iterator[None]:
    """Raise the shim's errors of the calls made here as the user's call's, data errors as
    RemoteDataError subclasses."""
    try:
        yield
    except Error as error:
        raise _rewritten(error, site) from None


def _rewritten(error: Error, site: CallSite | None) -> Error:
    if error.kind != "DataError" and error.site is not None and error.site[0] != _THIS_FILE:
        return error  # an earlier call's deferred error: it names its own call site
    text = str(error.args[0]) if error.args else str(error)
    head, _, _ = text.partition("\n  raised by")
    where = describe_site(error.op, site)
    message = f"{head}\n  {where}" if where else head
    cls = _CLASS_OF_CODE.get(error.code or "", RemoteDataError) \
        if error.kind == "DataError" else type(error)
    rewritten = cls(message)
    rewritten.kind, rewritten.code, rewritten.op, rewritten.site = (
        error.kind, error.code, error.op, site)
    return rewritten


# {{{ the API


def info() -> dict[str, Any]:
    """The agent's data tree: ``{root, writable, reader, detail}`` (``reader``: "gds",
    "pinned-pipeline", "kvikio-compat", "host" for an emulated agent, or "none")."""
    with _reported_at(_user_site()):
        return get_session().call_sync("data_info")


def ls(path: str = "") -> list[dict[str, Any]]:
    """What the agent serves under ``path`` (its data root by default), sorted by name:
    ``{name, path, type: "dir"|"file", size, format?, dtype?, shape?, order?}``."""
    with _reported_at(_user_site()):
        return get_session().call_sync("data_list", str(path))


def load(path: str, *, key: str | None = None) -> GPUArray | dict[str, GPUArray]:
    """The array in the agent's file ``path`` (``.npy``; ``.npz`` gives ``{name: GPUArray}``,
    or with ``key`` that one array), read on the agent straight into device memory."""
    site = _user_site()
    with _reported_at(site):
        session = get_session()
        spec: dict[str, Any] = {"format": "auto"} if key is None else {"format": "npz",
                                                                         "key": key}
        layout = session.call_sync("data_open", str(path), spec)
        if "members" in layout:
            return {name: _fill(session, path, session.call_sync(
                "data_open", str(path), {"format": "npz", "key": name}))
                for name in layout["members"]}
        return _fill(session, path, layout)


def load_raw(path: str, dtype: Any, shape: Any, offset: int = 0,
             order: str = "C") -> GPUArray:
    """Raw binary: ``prod(shape)`` items of ``dtype`` from byte ``offset`` of the agent's file
    ``path`` (as ``np.fromfile(path, dtype, offset=offset).reshape(shape, order=order)``)."""
    shape = (int(shape),) if np.isscalar(shape) else tuple(int(n) for n in shape)
    spec = {"format": "raw", "dtype": np.dtype(dtype).str, "shape": list(shape),
            "offset": int(offset), "order": order}
    with _reported_at(_user_site()):
        session = get_session()
        return _fill(session, path, session.call_sync("data_open", str(path), spec))


def save(array: GPUArray, path: str, *, overwrite: bool = True,
         format: str | None = None) -> int:
    """Write ``array`` to the agent's file ``path`` (``.npy`` when the name ends so, else raw
    bytes; ``format`` "npy" or "raw" decides otherwise) without it leaving the GPU side.
    Needs ``harp-agent --data-writable``. Returns the bytes written."""
    if not isinstance(array, GPUArray):
        raise TypeError(f"remote.save takes a GPUArray, not {type(array).__name__}")
    fmt = format or ("npy" if str(path).endswith(".npy") else "raw")
    with _reported_at(_user_site()):
        source = array if array.flags.forc else array.copy()
        return int(get_session().call_sync(
            "data_write", source.descriptor, str(path), {"format": fmt, "overwrite": overwrite}))


# }}}


def _fill(session: RemoteSession, path: str, layout: dict[str, Any]) -> GPUArray:
    """A new allocation of this session, filled on the agent with the bytes ``layout`` names."""
    dtype, shape = np.dtype(layout["dtype"]), tuple(layout["shape"])
    strides, nbytes = tuple(layout["strides"]), int(layout["nbytes"])
    if nbytes == 0:
        return GPUArray(shape, dtype, strides=strides)
    try:
        allocation = drv.mem_alloc(nbytes)
    except MemoryError as e:
        e.args = (f"remote.load({path!r}): {dtype} {shape} needs {format_bytes(nbytes)} of "
                  f"device memory, more than the GPU has free. {e.args[0] if e.args else ''}",)
        raise
    try:
        segments = range(0, nbytes, READ_SEGMENT_BYTES)
        for start in segments:
            size = min(READ_SEGMENT_BYTES, nbytes - start)
            call = [int(allocation) + start, str(path), int(layout["offset"]) + start, size,
                    layout["file"]]
            if start == segments[-1]:
                session.call_sync("data_read", *call)
            else:
                session.call("data_read", *call)
                session.flush()
    except BaseException:
        allocation.free()
        raise
    return GPUArray(shape, dtype, gpudata=allocation, strides=strides)
