"""Files to and from device memory on the real GPU: GPUDirect Storage through kvikio where the
machine supports it, otherwise a pipelined read into pinned host buffers overlapped with
asynchronous host-to-device copies.

The pipeline: the requested bytes are cut into ``CHUNK_BYTES`` chunks; ``READ_THREADS`` threads
``preadv`` chunks into a ring of ``BUFFERS`` page-locked buffers (the GIL is released while they
read), and the executor's thread queues each filled buffer's copy to the device on one stream as
soon as the chunk is in, in order. A buffer is read into again only after the event recorded
behind its copy has completed. So the disk (or page cache) and PCIe work at once, and the copy
engine never waits for more than one chunk.

``choose_reader`` decides once per agent: ``auto`` uses kvikio only when GDS really works
(``nvidia-fs`` loaded and cuFile reports GDS available); kvikio in its POSIX compatibility mode is
another bounce-buffer pipeline, so ``auto`` prefers ours there. ``--data-reader kvikio`` forces
kvikio anyway (to compare), ``pipeline`` forces ours.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pycuda.driver as cuda

from gpu_agent.datastore import DataError, OpenedFile, read_exactly, write_all

log = logging.getLogger("harp.agent.data")

CHUNK_BYTES = 16 << 20
BUFFERS = 8
READ_THREADS = 4
KVIKIO_THREADS = 8

READERS = ("auto", "kvikio", "pipeline")


class _DeviceBytes:
    """Device memory as kvikio takes it: a byte array behind ``__cuda_array_interface__``."""

    def __init__(self, address: int, nbytes: int) -> None:
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1",
                                         "data": (address, False), "strides": None,
                                         "version": 3}


def _gds_state(kvikio: Any) -> tuple[bool, str]:
    """Whether kvikio would use GPUDirect Storage here, and why (not)."""
    if not os.path.exists("/proc/driver/nvidia-fs"):
        return False, "no nvidia-fs kernel module (/proc/driver/nvidia-fs is missing)"
    try:
        defaults = kvikio.defaults
        mode = defaults.get("compat_mode") if hasattr(defaults, "get") else defaults.compat_mode()
        if str(mode).rsplit(".", 1)[-1] in ("ON", "True"):
            return False, "kvikio runs in compatibility mode (KVIKIO_COMPAT_MODE or no cuFile)"
        driver = kvikio.cufile_driver
        available = (driver.get("is_gds_available") if hasattr(driver, "get")
                     else driver.properties.is_gds_available)
    except Exception as e:  # cuFile missing or its driver refusing: no GDS
        return False, f"cuFile is not usable ({type(e).__name__}: {e})"
    if not available:
        return False, "cuFile reports GDS unavailable"
    return True, "cuFile reports GDS available"


@dataclass
class ReaderChoice:
    reader: str  # "gds", "kvikio-compat" or "pinned-pipeline"
    detail: str
    kvikio: Any = None

    def to_status(self) -> dict[str, Any]:
        return {"reader": self.reader, "detail": self.detail}


def choose_reader(choice: str = "auto") -> ReaderChoice:
    pipeline = (f"pipelined reads: {READ_THREADS} threads into {BUFFERS} pinned buffers of "
                f"{CHUNK_BYTES >> 20} MiB, overlapped with async H2D copies")
    if choice == "pipeline":
        return ReaderChoice("pinned-pipeline", pipeline + " (--data-reader pipeline)")
    try:
        import kvikio
    except Exception as e:  # not installed, or its CUDA libraries missing
        if choice == "kvikio":
            raise RuntimeError(f"--data-reader kvikio: kvikio cannot be imported: {e}") from None
        return ReaderChoice("pinned-pipeline", f"{pipeline}; no GPUDirect Storage: kvikio is not "
                            f"importable ({type(e).__name__}: {e})")
    gds, why = _gds_state(kvikio)
    _set_kvikio_threads(kvikio, KVIKIO_THREADS)
    version = getattr(kvikio, "__version__", "?")
    if gds:
        return ReaderChoice("gds", f"GPUDirect Storage through kvikio {version}: {why}", kvikio)
    if choice == "kvikio":
        return ReaderChoice("kvikio-compat", f"kvikio {version} without GDS ({why}): its POSIX "
                            "bounce buffers (--data-reader kvikio)", kvikio)
    return ReaderChoice("pinned-pipeline", f"{pipeline}; no GPUDirect Storage: {why}")


def _set_kvikio_threads(kvikio: Any, threads: int) -> None:
    try:
        if hasattr(kvikio.defaults, "set"):
            kvikio.defaults.set({"num_threads": threads})
        else:
            kvikio.defaults.num_threads_reset(threads)
    except Exception as e:
        log.warning("could not set kvikio's thread count: %s", e)


@dataclass
class FileTransfers:
    """One agent's file transfers: the reader in use, pinned buffers, threads, a stream."""

    choice: ReaderChoice
    _buffers: list[np.ndarray] = field(default_factory=list)
    _events: list[Any] = field(default_factory=list)
    _stream: Any = None
    _pool: concurrent.futures.ThreadPoolExecutor | None = None

    def _ready(self) -> None:
        if not self._buffers:
            self._buffers = [cuda.pagelocked_empty(CHUNK_BYTES, np.uint8)
                             for _ in range(BUFFERS)]
            self._events = [cuda.Event(cuda.event_flags.DISABLE_TIMING) for _ in range(BUFFERS)]
            # a blocking stream: ordered after work on the legacy default stream, such as the
            # scrubbing memset of a fresh allocation
            self._stream = cuda.Stream()
            self._pool = concurrent.futures.ThreadPoolExecutor(
                READ_THREADS, thread_name_prefix="harp-data")

    # {{{ reading

    def read(self, dst: int, opened: OpenedFile, offset: int, nbytes: int) -> None:
        """Fill device memory ``[dst, dst + nbytes)`` from ``opened`` at ``offset``."""
        if self.choice.kvikio is not None:
            try:
                self._read_kvikio(dst, opened, offset, nbytes)
                return
            except DataError:
                raise
            except Exception as e:
                # e.g. cuFile refusing memory mapped with cuMemMap: keep serving, say so
                log.warning("kvikio read failed, using pinned pipelined reads from now on: %s", e)
                self.choice = ReaderChoice(
                    "pinned-pipeline", f"kvikio failed ({type(e).__name__}: {e}); pipelined "
                    "pinned reads instead")
        self._read_pipelined(dst, opened, offset, nbytes)

    def _read_kvikio(self, dst: int, opened: OpenedFile, offset: int, nbytes: int) -> None:
        # the descriptor's /proc path reopens exactly the file the data tree checked
        with self.choice.kvikio.CuFile(f"/proc/self/fd/{opened.fd}", "r") as handle:
            count = handle.pread(_DeviceBytes(dst, nbytes), nbytes, offset).get()
        if count != nbytes:
            raise DataError("TRUNCATED", f"{opened.path}: read {count} of {nbytes} bytes")

    def _read_pipelined(self, dst: int, opened: OpenedFile, offset: int, nbytes: int) -> None:
        self._ready()
        assert self._pool is not None
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(opened.fd, offset, nbytes, os.POSIX_FADV_SEQUENTIAL)
        count = (nbytes + CHUNK_BYTES - 1) // CHUNK_BYTES
        ring = len(self._buffers)
        copied = [False] * ring  # a copy out of this buffer was queued (its event recorded)
        reads: dict[int, concurrent.futures.Future[None]] = {}

        def start_read(chunk: int) -> None:
            slot = chunk % ring
            if copied[slot]:
                self._events[slot].synchronize()
            size = min(CHUNK_BYTES, nbytes - chunk * CHUNK_BYTES)
            view = memoryview(self._buffers[slot])[:size]
            reads[chunk] = self._pool.submit(read_exactly, opened.fd, view,
                                             offset + chunk * CHUNK_BYTES, opened.path)

        try:
            # ring - 1 reads ahead: the slot of the next read is the one whose copy was queued
            # one chunk earlier, so waiting for it never stalls the copy engine
            for chunk in range(min(ring - 1, count)):
                start_read(chunk)
            for chunk in range(count):
                reads.pop(chunk).result()
                slot = chunk % ring
                size = min(CHUNK_BYTES, nbytes - chunk * CHUNK_BYTES)
                cuda.memcpy_htod_async(dst + chunk * CHUNK_BYTES, self._buffers[slot][:size],
                                       self._stream)
                self._events[slot].record(self._stream)
                copied[slot] = True
                if chunk + ring - 1 < count:
                    start_read(chunk + ring - 1)
        finally:
            # the buffers are reused: no read may still be writing into one, no copy reading
            for future in reads.values():
                future.cancel()
            concurrent.futures.wait(reads.values())
            self._stream.synchronize()

    # }}}

    def write(self, src: int, nbytes: int, fd: int, file_offset: int) -> None:
        """Write device memory ``[src, src + nbytes)`` to ``fd`` at ``file_offset``: each
        chunk is copied to a pinned buffer while the previous one is being written."""
        self._ready()
        assert self._pool is not None
        cuda.Context.synchronize()  # work in flight on any stream may still write the array
        ring = len(self._buffers)
        writes: dict[int, concurrent.futures.Future[None]] = {}
        try:
            for chunk, start in enumerate(range(0, nbytes, CHUNK_BYTES)):
                slot = chunk % ring
                if chunk - ring in writes:
                    writes.pop(chunk - ring).result()
                size = min(CHUNK_BYTES, nbytes - start)
                cuda.memcpy_dtoh(self._buffers[slot][:size], src + start)
                writes[chunk] = self._pool.submit(
                    write_all, fd, memoryview(self._buffers[slot])[:size], file_offset + start,
                    "the saved file")
            for future in writes.values():
                future.result()
        finally:
            concurrent.futures.wait(writes.values())

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._buffers.clear()
        self._events.clear()
        self._stream = None
