"""A worker's side of parked state: a session written to files, read back, or fetched from the
agent that holds it.

``ParkedStateIO`` moves a session's device memory and objects ``PIECE_BYTES`` at a time, so a
worker never holds a second copy of a whole session in host memory, and replays the calls that
recreate its objects. The session's compiled code (gpu_agent/compile_cache.py) goes along as one
more chunk and is read back before the replay, so its modules load without nvcc. What comes from
another agent is checked against what was asked for (the session, its kernel, its address range)
before any of it is used.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from gpu_agent import compile_cache
from gpu_agent import protocol as P
from gpu_agent.batches import BatchRunner
from gpu_agent.curve import ServerKeys, connect_encrypted
from gpu_agent.errors import AgentError
from gpu_agent.executors.base import is_object_chunk, object_chunk_address
from gpu_agent.executors.torch_ops import MAX_TENSORS
from gpu_agent.sizes import format_bytes

log = logging.getLogger("harp.agent.worker")

#: bytes moved per step when parking, restoring or fetching (bounds the worker's host memory)
PIECE_BYTES = 64 << 20
#: room for the index of a session's tensors among its parked objects, past their storages
#: (which fit the slot): MAX_TENSORS entries of a few hundred bytes each
OBJECT_INDEX_BYTES = 128 << 20


class ParkedStateIO:
    """See the module docstring; one worker's, for the sessions it opens."""

    def __init__(self, context: zmq.Context, curve: ServerKeys | None, *, fetch_timeout: float,
                 max_frame: int) -> None:
        self.context = context
        self.curve = curve
        self.fetch_timeout = fetch_timeout
        self.max_frame = max_frame

    def write(self, runner: BatchRunner, session_id: str, memory_dir: Path, memory_room: int,
              disk_dir: Path) -> list[list[Any]]:
        """Write the session's memory and objects to files, in ``memory_dir`` while
        ``memory_room`` lasts, then in ``disk_dir``: [[addr, size, path], ...]. On a failure
        the files written so far are removed and the error raised."""
        chunks: list[list[Any]] = []
        buffer = np.empty(PIECE_BYTES, np.uint8)
        try:
            for addr, size in runner.device.mapped_chunks():
                where = memory_dir if size <= memory_room else disk_dir
                if where is memory_dir:
                    memory_room -= size
                path = where / f"{session_id}-{addr:x}.bin"
                with open(path, "xb", buffering=0) as f:
                    for offset in range(0, size, PIECE_BYTES):
                        piece = memoryview(buffer)[:min(PIECE_BYTES, size - offset)]
                        runner.device.read_into(addr + offset, piece)
                        f.write(piece)
                chunks.append([addr, size, str(path)])
            for index, (name, payload) in enumerate(runner.device.park_objects()):
                view = memoryview(payload).cast("B")
                where = memory_dir if view.nbytes <= memory_room else disk_dir
                if where is memory_dir:
                    memory_room -= view.nbytes
                path = where / f"{session_id}-object{index}-{name}.bin"
                with open(path, "xb", buffering=0) as f:
                    for offset in range(0, view.nbytes, PIECE_BYTES):
                        f.write(view[offset:offset + PIECE_BYTES])
                chunks.append([object_chunk_address(index), view.nbytes, str(path)])
            code = compile_cache.SESSION
            if len(code):
                where = memory_dir if code.parked_bytes <= memory_room else disk_dir
                path = where / f"{session_id}-compiled.bin"
                with open(path, "xb") as f:
                    f.writelines(code.records())
                chunks.append([compile_cache.PARKED_CHUNK, code.parked_bytes, str(path)])
        except (OSError, AgentError):
            for _addr, _size, path in chunks:
                _unlink(path)
            raise
        return chunks

    def restore_from_files(self, runner: BatchRunner, restore: dict[str, Any]) -> int:
        """Recreate a session parked here; the bytes restored."""
        chunks = restore.get("chunks") or []
        total = 0
        for addr, size, path in chunks:
            if addr == compile_cache.PARKED_CHUNK:
                total += size
                if size <= compile_cache.SESSION.max_parked_bytes:
                    _seed(_read_object(path, size))
        _replay(runner, restore.get("log") or [])
        buffer = np.empty(PIECE_BYTES, np.uint8)
        objects: list[memoryview] = []
        for addr, size, path in chunks:
            if addr == compile_cache.PARKED_CHUNK:
                continue
            if is_object_chunk(addr):  # session objects outside device memory (torch tensors)
                objects.append(_read_object(path, size))
                total += size
                continue
            runner.call("alloc", [addr, size])
            with open(path, "rb", buffering=0) as f:
                for offset in range(0, size, PIECE_BYTES):
                    piece = memoryview(buffer)[:min(PIECE_BYTES, size - offset)]
                    if f.readinto(piece) != piece.nbytes:
                        raise AgentError("StateLost", f"parked file {path} is short")
                    runner.device.write_from(addr + offset, piece)
            total += size
        runner.device.restore_objects(objects)
        return total

    def restore_from_agent(self, runner: BatchRunner, fetch: dict[str, Any], base: int) -> int:
        """Pull a session parked on another agent, piece by piece, checking that what comes is
        what was asked for (the session, its kernel, its address range)."""
        origin = AgentPeer(self.context, str(fetch["endpoint"]), fetch.get("token"),
                           self.fetch_timeout, self.max_frame, self.curve)
        ask = {"session": fetch["session"], "resume_token": fetch["resume_token"]}
        try:
            reply, _ = origin.request({"t": P.PARKED_FETCH, "kernel_id": fetch["kernel_id"],
                                       **ask})
            manifest = reply.get("manifest")
            if (not isinstance(manifest, dict) or manifest.get("session") != fetch["session"]
                    or manifest.get("kernel_id") != fetch["kernel_id"]
                    or not isinstance(manifest.get("range"), list)
                    or manifest["range"][:1] != [base]
                    or not isinstance(manifest.get("chunks"), list)):
                raise AgentError("StateLost", "the agent that held the parked state sent a "
                                 "manifest for something else than was asked")
            for chunk in manifest["chunks"]:
                if not (type(chunk) is list and len(chunk) == 2
                        and all(type(x) is int for x in chunk) and chunk[1] >= 0):
                    raise AgentError("StateLost", "malformed chunk list in the manifest")
            if [c[0] for c in manifest["chunks"]].count(compile_cache.PARKED_CHUNK) > 1:
                raise AgentError("StateLost", "the manifest lists the compiled code twice")
            _check_objects(manifest["chunks"], runner.memory_cap, str(fetch["endpoint"]))
            total = 0
            for addr, size in manifest["chunks"]:
                if addr == compile_cache.PARKED_CHUNK:
                    total += size
                    if size > compile_cache.SESSION.max_parked_bytes:
                        log.warning("the session's compiled code (%d bytes) is more than a "
                                    "session keeps: its modules compile again", size)
                        continue
                    whole = bytearray(size)
                    for offset, piece in origin.pieces(ask, addr, size):
                        whole[offset:offset + piece.nbytes] = piece
                    _seed(whole)
            _replay(runner, manifest.get("log") or [])
            objects: list[memoryview] = []
            for addr, size in manifest["chunks"]:
                if addr == compile_cache.PARKED_CHUNK:
                    continue
                if is_object_chunk(addr):
                    whole = bytearray(size)
                    for offset, piece in origin.pieces(ask, addr, size):
                        whole[offset:offset + piece.nbytes] = piece
                    objects.append(memoryview(whole))
                else:
                    runner.call("alloc", [addr, size])
                    for offset, piece in origin.pieces(ask, addr, size):
                        runner.device.write_from(addr + offset, piece)
                total += size
            runner.device.restore_objects(objects)
            try:
                origin.request({"t": P.PARKED_FORGET, **ask})
            except AgentError as e:
                log.warning("could not tell %s to forget the moved session: %s",
                            fetch["endpoint"], e)
            return total
        finally:
            origin.close()


class AgentPeer:
    """A short-lived DEALER to another agent's supervisor, for moving parked state."""

    def __init__(self, context: zmq.Context, endpoint: str, token: str | None, timeout: float,
                 max_frame: int, curve: ServerKeys | None) -> None:
        self.endpoint, self.token, self.timeout = endpoint, token, timeout
        #: bytes asked for at once: a piece comes as one frame, within --max-frame
        self.piece_bytes = min(PIECE_BYTES, max_frame)
        self.socket = context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        if curve is not None:
            connect_encrypted(self.socket, curve)
        self.socket.setsockopt(zmq.MAXMSGSIZE, max_frame + (1 << 20))
        self.socket.connect(endpoint)
        self._rid = 0

    def request(self, header: dict[str, Any]) -> tuple[dict[str, Any], list[Any]]:
        self._rid += 1
        self.socket.send(P.pack_header({**header, "rid": self._rid, "token": self.token}))
        deadline = time.monotonic() + self.timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self.socket.poll(int(left * 1000)):
                raise AgentError("StateLost", f"the agent at {self.endpoint} that holds the "
                                 f"parked state did not answer within {self.timeout:g} s "
                                 "(harp-agent --fetch-timeout)")
            reply, frames = P.decode(self.socket.recv_multipart(copy=False))
            if reply.get("rid") != self._rid:
                continue
            if reply.get("t") == P.ERROR:
                error = reply.get("e") if isinstance(reply.get("e"), dict) else {}
                raise AgentError("StateLost", f"the agent at {self.endpoint} refused to hand "
                                 f"over the parked state: {error.get('msg')}")
            return reply, frames

    def pieces(self, ask: dict[str, Any], addr: int, size: int
               ) -> Iterator[tuple[int, memoryview]]:
        """(offset, bytes) of one parked chunk, fetched ``piece_bytes`` at a time."""
        for offset in range(0, size, self.piece_bytes):
            nbytes = min(self.piece_bytes, size - offset)
            _, frames = self.request({"t": P.PARKED_CHUNK, "addr": addr, "offset": offset,
                                      "size": nbytes, **ask})
            piece = frames[0].buffer if frames else memoryview(b"")
            if piece.nbytes != nbytes:
                raise AgentError("StateLost", "a piece of the parked state came short")
            yield offset, piece

    def close(self) -> None:
        self.socket.close(0)


def _check_objects(chunks: list[list[int]], memory_cap: int, origin: str) -> None:
    """Objects outside device memory (torch tensors: an index, then each storage) are held whole
    in host memory while they are rebuilt: from another agent, at most one per tensor a session
    may have, and no more bytes than the slot's memory (where they go) plus their index, all
    checked before any is fetched. Device chunks need no such check: each is ``alloc``-ed,
    within the slot, before its bytes come."""
    sizes = [size for addr, size in chunks if is_object_chunk(addr)]
    limit = memory_cap + OBJECT_INDEX_BYTES
    if len(sizes) > MAX_TENSORS + 1 or sum(sizes) > limit:
        raise AgentError("StateLost", (
            f"the agent at {origin} offered {len(sizes)} parked objects of "
            f"{format_bytes(sum(sizes))} outside device memory: more than a session of this "
            f"agent's slots can hold (at most {MAX_TENSORS + 1} objects of "
            f"{format_bytes(limit)}: the slot's memory, harp-agent --slot-memory, and their "
            "index); nothing of it was fetched"))


def _replay(runner: BatchRunner, calls: list[Any]) -> None:
    for call in calls:
        name, args = P.validate_call(call)
        if P.OPS[name].creates is None and P.OPS[name].configures is None:
            raise AgentError("StateLost", f"the parked state's log holds {name}, which "
                             "creates nothing")
        runner.call(name, args)


def _seed(packed: bytes | bytearray | memoryview) -> None:
    """Give the restored session its compiled code back; what is not well-formed is left out
    (its modules compile again: the parked code is a cache, never needed)."""
    try:
        compile_cache.SESSION.seed(packed)
    except ValueError as e:
        log.warning("the parked state's compiled code is left out (%s): its modules compile "
                    "again", e)


def _read_object(path: str, size: int) -> memoryview:
    """A parked object's file, whole (its executor rebuilds the object from these bytes)."""
    whole = memoryview(bytearray(size))
    with open(path, "rb", buffering=0) as f:
        for offset in range(0, size, PIECE_BYTES):
            piece = whole[offset:offset + PIECE_BYTES]
            if f.readinto(piece) != piece.nbytes:
                raise AgentError("StateLost", f"parked file {path} is short")
    return whole


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
