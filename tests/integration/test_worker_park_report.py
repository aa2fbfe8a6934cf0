"""A real worker process (emulated executor), with this test as its supervisor: its park report
says by itself how many batches it ran, so the count is known even when the supervisor reads the
report after it reaped the worker and its status page is gone.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq

from gpu_agent import compile_cache
from gpu_agent import protocol as P
from gpu_agent import worker_link as W
from gpu_agent.compile_cache import SessionCompileCache

pytestmark = pytest.mark.timeout(60)
REPO = Path(__file__).resolve().parents[2]


class Supervisor:
    """The supervisor's end of one worker's control link, spoken by hand."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.socket = zmq.Context.instance().socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.RCVTIMEO, 20_000)
        self.socket.bind(f"ipc://{directory}/control")
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.status_path = os.path.join(directory, "w1.status")
        self.status = W.StatusPage(self.status_path, create=True)

    def next(self) -> dict[str, Any]:
        _identity, frame = self.socket.recv_multipart()
        return P.unpack_header(frame)

    def send(self, kind: str, **fields: Any) -> None:
        self.socket.send_multipart([b"w1", P.pack_header({"t": kind, **fields})])


@contextmanager
def worker_process() -> Iterator[tuple[Supervisor, subprocess.Popen]]:
    with tempfile.TemporaryDirectory(prefix="harp-worker-test-") as directory:
        supervisor = Supervisor(directory)
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep
                   + os.environ.get("PYTHONPATH", ""))
        process = subprocess.Popen(
            [sys.executable, "-m", "gpu_agent.worker", "--worker-id", "w1",
             "--supervisor-pid", str(os.getpid()), "--control", supervisor.endpoint,
             "--status", supervisor.status_path, "--bind", "tcp://127.0.0.1",
             "--executor", "emulated", "--memory-cap", str(64 << 20),
             "--max-frame", str(16 << 20)], env=env, stdin=subprocess.DEVNULL)
        try:
            yield supervisor, process
        finally:
            if process.poll() is None:
                process.kill()
            process.wait(10)
            supervisor.socket.close(0)


def test_the_park_report_carries_the_batches_the_worker_ran() -> None:
    with worker_process() as (supervisor, process):
        ready = supervisor.next()
        assert ready["t"] == W.READY, ready
        base, size = P.session_range(0)
        supervisor.send(W.OPEN, session="s1", base=base, size=size, cap=64 << 20,
                        attach="secret-attach")
        assert supervisor.next()["t"] == W.OPENED
        data = zmq.Context.instance().socket(zmq.DEALER)
        data.setsockopt(zmq.LINGER, 0)
        data.setsockopt(zmq.RCVTIMEO, 20_000)
        data.connect(ready["endpoint"])
        try:
            data.send(P.pack_header({"t": P.ATTACH, "session": "s1",
                                     "attach": "secret-attach"}))
            assert P.decode(data.recv_multipart())[0]["t"] == P.ATTACHED
            values = np.arange(16, dtype=np.float64)
            for q, call in enumerate([["alloc", base, P.GRANULARITY],
                                      ["htod", base, values.tobytes(), None],
                                      ["memset", base, 0, 1, 8, None]], start=1):
                data.send(P.pack_header({"t": P.BATCH, "q": q, "c": [call]}))
                reply, _ = P.decode(data.recv_multipart())
                assert reply["t"] == P.REPLY and not reply.get("e"), reply
        finally:
            data.close(0)
        supervisor.send(W.PARK, memory_dir=supervisor.directory, memory_room=1 << 30,
                        disk_dir=supervisor.directory)
        report = supervisor.next()
        while report["t"] == W.GONE:  # the data socket this test closed
            report = supervisor.next()
        assert process.wait(20) == 0
        # what a supervisor reading its report late has left: the status page is gone
        supervisor.status.close(remove=True)
        assert report["t"] == W.PARKED, report
        assert report["batches"] == 3
        assert report["bytes"] == sum(chunk[1] for chunk in report["chunks"]) > 0


def test_a_sessions_compiled_code_goes_back_into_parked_state_and_counts_on_its_page() -> None:
    """gpu_agent/compile_cache.py: a worker restoring a session takes its parked code (the
    emulated executor compiles nothing, so the test gives it some), says how much on its status
    page (the supervisor's park plan counts it), and parks it again with the session."""
    parked = SessionCompileCache()
    parked.get_or_compile(SessionCompileCache.key("kernel A", ["-arch", "sm_90"], "nvcc", "cubin"),
                          lambda: b"\x7fELF cubin of kernel A")
    records = b"".join(parked.records())
    with worker_process() as (supervisor, process):
        assert supervisor.next()["t"] == W.READY
        code = Path(supervisor.directory) / "s1-compiled.bin"
        code.write_bytes(records)
        base, size = P.session_range(0)
        supervisor.send(W.OPEN, session="s1", base=base, size=size, cap=64 << 20,
                        attach="secret-attach", restore={
                            "chunks": [[compile_cache.PARKED_CHUNK, len(records), str(code)]],
                            "log": []})
        assert supervisor.next()["t"] == W.OPENED
        assert supervisor.status.read()["code_bytes"] == len(records)
        code.unlink()  # the supervisor discards a restored state's files
        supervisor.send(W.PARK, memory_dir=supervisor.directory, memory_room=1 << 30,
                        disk_dir=supervisor.directory)
        report = supervisor.next()
        assert report["t"] == W.PARKED, report
        assert process.wait(20) == 0
        [chunk] = report["chunks"]
        assert chunk[:2] == [compile_cache.PARKED_CHUNK, len(records)]
        assert Path(chunk[2]).read_bytes() == records
