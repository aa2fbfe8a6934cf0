"""The supervisor's side of its workers: starting them, a warm spare, talking to them, reaping.

``WorkerPool`` starts ``python -m gpu_agent.worker`` processes ahead of need: ``spares`` of them
are kept ready (context created, socket bound) so that a lease's first GPU call does not wait for
a CUDA context. Each worker talks to the supervisor over one private ``ipc://`` ROUTER socket
(see ``worker_link``) and publishes its live figures on a status page. The pool never blocks: it
sends, drains what arrived, and notices exits with ``poll()`` on each tick.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import zmq

from gpu_agent import protocol as P
from gpu_agent import worker_link as W

log = logging.getLogger("harp.agent.workers")

#: how long an ended worker's late messages are still read (a park's report can arrive after
#: its process exit was seen)
EXITED_KEPT_S = 10.0


@dataclass
class WorkerConfig:
    """What every worker of this agent is started with."""

    executor: str
    device: int
    bind_host: str
    memory_cap: int
    max_frame: int
    unread_replies: int
    fetch_timeout: float
    pinned_staging: int = 0
    #: how long a worker busy-polls for its client's next message before it sleeps (µs)
    busy_poll_us: int = 0
    session_objects: int = 4096
    pending_gpu_timings: int = 100_000
    ports: str | None = None
    data_root: str | None = None
    data_writable: bool = False
    data_reader: str = "auto"
    log_level: str = "WARNING"
    #: the host put into welcome for clients to reach workers at (default: the bind host)
    advertise_host: str | None = None
    curve_secret_file: str | None = None
    curve_clients_dir: str | None = None
    #: how nvcc runs (gpu_agent.nvcc_limits.NvccPolicy.to_arg)
    nvcc: str = ""


@dataclass
class WorkerHandle:
    worker_id: str
    process: subprocess.Popen
    status: W.StatusPage
    started_at: float
    endpoint: str | None = None
    device: dict[str, Any] = field(default_factory=dict)
    #: the data tree it serves and how it reads files (harp_jupyter.remote)
    data: dict[str, Any] = field(default_factory=dict)
    #: the session it serves (None for a spare)
    session_id: str | None = None
    #: why the supervisor ended it, when it did (watchdog, park, end)
    ended_by: str | None = None

    @property
    def ready(self) -> bool:
        return self.endpoint is not None

    def figures(self) -> dict[str, int]:
        try:
            return self.status.read()
        except (ValueError, OSError):
            return {}


class WorkerPool:
    """See the module docstring."""

    def __init__(self, context: zmq.Context, config: WorkerConfig, *, spares: int = 1) -> None:
        self.config = config
        self.spares = spares
        self._dir = tempfile.mkdtemp(prefix="harp-agent-")
        self.socket = context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.socket.bind(f"ipc://{self._dir}/control")
        self.control_endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.workers: dict[str, WorkerHandle] = {}
        #: workers whose process ended, kept ``EXITED_KEPT_S`` so their last messages count
        self._exited: dict[str, tuple[WorkerHandle, float]] = {}
        self.restarts = 0

    # {{{ processes

    def start(self) -> WorkerHandle:
        worker_id = secrets.token_hex(4)
        status_path = os.path.join(self._dir, f"{worker_id}.status")
        status = W.StatusPage(status_path, create=True)
        c = self.config
        argv = [sys.executable, "-m", "gpu_agent.worker", "--worker-id", worker_id,
                "--supervisor-pid", str(os.getpid()),
                "--control", self.control_endpoint, "--status", status_path,
                "--bind", f"tcp://{c.bind_host}", "--executor", c.executor,
                "--device", str(c.device), "--memory-cap", str(c.memory_cap),
                "--max-frame", str(c.max_frame), "--unread-replies", str(c.unread_replies),
                "--fetch-timeout", str(c.fetch_timeout), "--log-level", c.log_level,
                "--pinned-staging", str(c.pinned_staging),
                "--busy-poll-us", str(c.busy_poll_us),
                "--session-objects", str(c.session_objects),
                "--pending-gpu-timings", str(c.pending_gpu_timings),
                "--data-reader", c.data_reader]
        if c.nvcc:
            argv += ["--nvcc", c.nvcc]
        if c.ports:
            argv += ["--ports", c.ports]
        if c.data_root:
            argv += ["--data-root", c.data_root]
        if c.data_writable:
            argv.append("--data-writable")
        if c.advertise_host:
            argv += ["--advertise-host", c.advertise_host]
        if c.curve_secret_file:
            argv += ["--curve-secret-key-file", c.curve_secret_file]
        if c.curve_clients_dir:
            argv += ["--curve-client-keys-dir", c.curve_clients_dir]
        # a worker is a process of its own session: the supervisor's signals are not its
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True)
        handle = WorkerHandle(worker_id, process, status, time.monotonic())
        self.workers[worker_id] = handle
        return handle

    def ensure_spares(self) -> None:
        idle = [w for w in self.workers.values() if w.session_id is None and w.ended_by is None]
        for _ in range(self.spares - len(idle)):
            self.start()

    def take_spare(self) -> WorkerHandle:
        """A spare worker for a session, ready if one is; a new one is started behind it."""
        idle = [w for w in self.workers.values() if w.session_id is None and w.ended_by is None]
        idle.sort(key=lambda w: (not w.ready, w.started_at))
        handle = idle[0] if idle else self.start()
        return handle

    def end(self, handle: WorkerHandle, why: str, *, kill: bool = False) -> None:
        """Make a worker end: ask it (it frees the GPU as its process exits), or kill it."""
        if handle.ended_by is None:
            handle.ended_by = why
        if kill or not handle.ready:
            _kill(handle.process)
        else:
            self.send(handle, W.END)

    def reap(self, now: float, start_timeout: float) -> list[tuple[WorkerHandle, int]]:
        """Workers whose process has exited (with the exit code), forgotten; a worker that
        did not become ready in time is killed first."""
        dead = []
        for handle in list(self.workers.values()):
            if not handle.ready and now - handle.started_at > start_timeout:
                handle.ended_by = handle.ended_by or (
                    f"its GPU worker did not get ready within {start_timeout:g} s (harp-agent "
                    "--worker-start-timeout)")
                _kill(handle.process)
            code = handle.process.poll()
            if code is not None:
                del self.workers[handle.worker_id]
                # its last messages may still be on the way: they are read for a while more
                self._exited[handle.worker_id] = (handle, now)
                if handle.ended_by is None and code != 0:
                    self.restarts += 1
                dead.append((handle, code))
        for worker_id, (handle, at) in list(self._exited.items()):
            if now - at > EXITED_KEPT_S:
                del self._exited[worker_id]
                handle.status.close(remove=True)
        return dead

    # }}}

    # {{{ messages

    def send(self, handle: WorkerHandle, kind: str, **fields: Any) -> None:
        try:
            self.socket.send_multipart([handle.worker_id.encode(),
                                        P.pack_header({"t": kind, **fields})], zmq.NOBLOCK)
        except zmq.ZMQError as e:
            log.warning("worker %s unreachable (%s): ending it", handle.worker_id, e)
            _kill(handle.process)

    def receive(self) -> list[tuple[WorkerHandle, dict[str, Any]]]:
        """Every control message that has arrived, with its worker."""
        got = []
        while self.socket.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            parts = self.socket.recv_multipart()
            worker_id = parts[0].decode(errors="replace")
            handle = self.workers.get(worker_id) or self._exited.get(worker_id, (None, 0))[0]
            if handle is None or len(parts) < 2:
                continue
            try:
                header = P.unpack_header(parts[1])
            except P.ProtocolError:
                continue
            if header.get("t") == W.READY:
                handle.endpoint = str(header.get("endpoint"))
                handle.device = header.get("device") or {}
                handle.data = header.get("data") or {}
            got.append((handle, header))
        return got

    # }}}

    def close(self) -> None:
        for handle in list(self.workers.values()):
            _kill(handle.process)
        for handle in list(self.workers.values()):
            try:
                handle.process.wait(5)
            except subprocess.TimeoutExpired:
                pass
            handle.status.close(remove=True)
        self.workers.clear()
        self.socket.close(0)
        shutil.rmtree(self._dir, ignore_errors=True)


def _kill(process: subprocess.Popen) -> None:
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            process.kill()
