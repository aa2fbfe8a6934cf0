"""What the supervisor and its workers share: control messages and a live status page.

Control messages travel over a private ``ipc://`` socket (the supervisor's ROUTER, each worker's
DEALER whose identity is its worker id), msgpack headers as in ``protocol`` plus frames where
noted. They are few and small; the bytes of a session never pass through the supervisor.

supervisor -> worker
    ``open``  {session, base, size, cap, attach, restore?: {log, chunks: [[addr, size, path]]},
               fetch?: {endpoint, session, resume_token, kernel_id, token}}
    ``park``  {memory_dir, memory_room, disk_dir}   stream device memory to files, then end
    ``end``   {}                                    end now (the process exit frees the GPU)
worker -> supervisor
    ``ready``   {pid, endpoint, device, memory: [free, total]}   context created, socket bound
    ``opened``  {session, restored_bytes}    ``open_failed`` {session, e}
    ``parked``  {session, chunks: [[addr, size, path]], log, bytes, batches}
                                             ``batches``: how many it ran before the park
    ``park_failed`` {e}
    ``gone``    {session}                    the attached client's connection dropped
    ``back``    {session}                    ... and came back (re-attached)
    ``fatal``   {session, e}                 the context is unusable; the worker ends

The status page is a small shared file the worker writes and the supervisor reads without a
message: when the running batch started (0 when idle), when the last one ended, counters and
mapped bytes. It is how the supervisor knows idle time, busy state and the watchdog's clock for
free, on the hot path's side only two stores per batch.
"""

from __future__ import annotations

import mmap
import os
import struct

OPEN, PARK, END = "open", "park", "end"
READY, OPENED, OPEN_FAILED, PARKED, PARK_FAILED, GONE, BACK, FATAL = (
    "ready", "opened", "open_failed", "parked", "park_failed", "gone", "back", "fatal")

#: device_bytes: all the session holds on the device; object_bytes: the part of it in session
#: objects outside mapped chunks (torch tensors), which the kernel's allocator does not know;
#: code_bytes: its compiled code as parked state keeps it (gpu_agent/compile_cache.py)
_FIELDS = ("busy_since_ns", "last_end_ns", "batches", "calls", "device_bytes", "object_bytes",
           "code_bytes")
_LAYOUT = struct.Struct("<" + "q" * len(_FIELDS))


class StatusPage:
    """The worker's live figures in a shared file (``path``), one writer and one reader."""

    def __init__(self, path: str, *, create: bool = False) -> None:
        self.path = path
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, _LAYOUT.size)
            self._map = mmap.mmap(fd, _LAYOUT.size)
        finally:
            os.close(fd)

    def read(self) -> dict[str, int]:
        return dict(zip(_FIELDS, _LAYOUT.unpack_from(self._map, 0), strict=True))

    def write(self, **values: int) -> None:
        current = self.read()
        current.update(values)
        _LAYOUT.pack_into(self._map, 0, *(current[name] for name in _FIELDS))

    def batch_started(self, now_ns: int) -> None:
        struct.pack_into("<q", self._map, 0, now_ns)

    def batch_ended(self, now_ns: int, batches: int, calls: int, device_bytes: int,
                    object_bytes: int = 0, code_bytes: int = 0) -> None:
        _LAYOUT.pack_into(self._map, 0, 0, now_ns, batches, calls, device_bytes, object_bytes,
                          code_bytes)

    def close(self, *, remove: bool = False) -> None:
        try:
            self._map.close()
        except (BufferError, ValueError):
            pass
        if remove:
            try:
                os.unlink(self.path)
            except OSError:
                pass
