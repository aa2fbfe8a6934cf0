"""The kernel's side of harp tensors: handles, their session, frees, seeds and copies.

``TorchClient`` is the process's one binding of harp tensors to the shim's ``RemoteSession``
(the same session, lease and batches as pycuda code). Tensors carry the session they were made
in; one used after that session was lost raises a clear error instead of naming a handle a new
session never had. Frees come from finalizers on any thread, so they are only noted here and
sent as one ``torch_free`` before a later call: once ``FREE_BATCH`` handles or
``FREE_BATCH_BYTES`` of storage wait, and before every sync point (a loop of small operators
then sends one free per ``FREE_BATCH`` operators, not one each). A seed waits the same way, so
``torch.manual_seed`` alone never leases a GPU.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from gpu_agent import protocol
from harp_jupyter.shim.errors import Error as ShimError
from harp_jupyter.shim.host_copies import copy_pieces
from harp_jupyter.shim.session import RemoteSession, get_session


class HarpTorchError(RuntimeError):
    """An error of a harp tensor operation, raised where torch raises RuntimeError. ``kind``
    is the agent's error kind (gpu_agent.protocol.ERROR_KINDS) when the agent reported it."""

    kind: str | None = None


class SessionGoneError(HarpTorchError):
    """The tensor belonged to a GPU session this kernel lost (its memory is gone)."""


def raise_as_torch_error(error: ShimError) -> HarpTorchError:
    wrapped = SessionGoneError(str(error)) if error.kind in ("ContextLost", "StateLost") or (
        error.kind is None and "lost" in str(error).lower()) else HarpTorchError(str(error))
    wrapped.kind = error.kind
    return wrapped


#: dead tensors whose frees may wait for the next sync point: this many handles, or storages of
#: this many bytes (counted per handle: views of one storage count it each time), whichever
#: first; small, so memory the user freed is soon the agent's again (a slot's cap counts it)
FREE_BATCH = 64
FREE_BATCH_BYTES = 4 << 20


class TorchClient:
    """See the module docstring."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._frees: deque[tuple[RemoteSession, int]] = deque()
        self._free_bytes = 0
        self._seed: int | None = None
        self._next_handle = 1
        self._checked_session: RemoteSession | None = None
        self._checked_endpoint = ""
        self.agent_info: dict[str, Any] = {}

    def session(self) -> RemoteSession:
        return get_session()

    def new_handle(self) -> int:
        with self._lock:
            handle = self._next_handle
            self._next_handle += 1
            return handle

    def free_later(self, session: RemoteSession, handle: int, nbytes: int = 0) -> None:
        """From a finalizer: forget ``handle`` with a later call (never blocks)."""
        self._frees.append((session, handle))
        self._free_bytes += nbytes

    def seed_later(self, seed: int) -> None:
        self._seed = int(seed) & ((1 << 63) - 1)

    # {{{ calls

    def prepare(self, session: RemoteSession, sync: bool = False) -> None:
        """What must reach the agent before the next call: frees (all of them before a sync
        point), a seed, the version note."""
        if self._frees and (sync or len(self._frees) >= FREE_BATCH
                            or self._free_bytes >= FREE_BATCH_BYTES):
            self._send_frees(session)
        if self._seed is not None:
            seed, self._seed = self._seed, None
            session.call("torch_seed", seed)
        if session is not self._checked_session or session.endpoint != self._checked_endpoint:
            self._checked_session, self._checked_endpoint = session, session.endpoint
            session.call_later("torch_info", on_result=self.agent_info.update)

    def _send_frees(self, session: RemoteSession) -> None:
        self._free_bytes = 0
        frees: list[int] = []
        while self._frees:
            owner, handle = self._frees.popleft()
            if owner is session and not session.closed and not session.lost:
                frees.append(handle)
        for start in range(0, len(frees), protocol.MAX_TORCH_OUTPUTS):
            session.call("torch_free", frees[start:start + protocol.MAX_TORCH_OUTPUTS])

    def call(self, op: str, *args: Any) -> None:
        session = self.session()
        try:
            self.prepare(session)
            session.call(op, *args)
        except ShimError as e:
            raise raise_as_torch_error(e) from None

    def call_later(self, op: str, *args: Any, on_result: Callable[[Any], None]) -> None:
        session = self.session()
        try:
            self.prepare(session)
            session.call_later(op, *args, on_result=on_result)
        except ShimError as e:
            raise raise_as_torch_error(e) from None

    def flush(self) -> None:
        """Send what is queued now, as a batch of its own."""
        try:
            self.session().flush()
        except ShimError as e:
            raise raise_as_torch_error(e) from None

    def call_sync(self, op: str, *args: Any,
                  on_result: Callable[[Any], None] | None = None) -> Any:
        session = self.session()
        try:
            self.prepare(session, sync=True)
            return session.call_sync(op, *args, on_result=on_result)
        except ShimError as e:
            raise raise_as_torch_error(e) from None

    # }}}

    # {{{ bytes of contiguous tensors

    def write(self, handle: int, host: torch.Tensor) -> None:
        """Copy the contiguous host tensor ``host`` into the contiguous tensor ``handle``."""
        data = _bytes_of(host)
        for offset, size in copy_pieces(data.nbytes, self.session().max_frame):
            self.call("torch_write", handle, offset, data[offset:offset + size])

    def read(self, handle: int, out: torch.Tensor) -> None:
        """Fill the contiguous host tensor ``out`` from the contiguous tensor ``handle`` (a
        sync point)."""
        target = _bytes_of(out)
        nbytes = target.nbytes
        if nbytes == 0:
            self.call_sync("synchronize")
            return
        pieces = copy_pieces(nbytes, self.session().max_frame)
        for offset, size in pieces[:-1]:
            self.call_later("torch_download", handle, offset, size,
                            on_result=_copy_into(target[offset:offset + size]))
            self.flush()  # a batch each: the agent sends one piece while it reads the next
        last = pieces[-1][0]
        value = self.call_sync("torch_download", handle, last, nbytes - last)
        _copy_into(target[last:])(value)

    # }}}


def _bytes_of(host: torch.Tensor) -> memoryview:
    if not host.numel():
        return memoryview(b"")
    flat = host.reshape(-1).view(torch.uint8)
    return memoryview(flat.numpy()).cast("B")


def _copy_into(target: memoryview) -> Callable[[Any], None]:
    def copy(value: Any) -> None:
        source = np.frombuffer(value, np.uint8)
        if source.nbytes != target.nbytes:
            raise HarpTorchError(f"the agent sent {source.nbytes} bytes, {target.nbytes} "
                                 "expected")
        np.frombuffer(target, np.uint8)[:] = source

    return copy


client = TorchClient()
