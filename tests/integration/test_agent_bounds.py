"""Each of the agent's bounds (gpu_agent/limits.py) crossed against a real agent.

Every test starts a real ``harp-agent`` (emulated executor: a supervisor and worker processes,
real ZeroMQ) with one flag set small, crosses it with a ``RawClient``, and checks that the error
says what happened, what to do and names the flag, that it reached that client alone, and that
another tenant of the same agent was untouched. tests/integration/test_agent_isolation.py
crosses the others; tests/unit/test_docs.py checks that every flag is named by some test.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import psutil
import pytest
import zmq

from gpu_agent import compile_cache
from gpu_agent import protocol as P
from gpu_agent.compile_cache import SessionCompileCache
from tests.agent_client import RawClient, read_back, stored, wait_for

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(120)
MiB = 1 << 20


def park(client: RawClient, data: bytes) -> dict:
    """A new session of ``client``'s kernel holding ``data``, parked (its lease given back);
    returns what resumes it."""
    base = stored(client, data)
    assert client.welcome is not None
    resume = {"session": client.welcome["session"],
              "resume_token": client.welcome["resume_token"], "base": base}
    client.release()
    assert client.next_push(P.LOST)["parked"] is True
    client.welcome = None
    return resume


def resume(client: RawClient, parked: dict) -> dict:
    client.take_lease()
    return client.hello(resume={"session": parked["session"],
                                "resume_token": parked["resume_token"]})


def lease_request(client: RawClient, **fields: Any) -> dict:
    header = {"t": P.LEASE_REQUEST, "rid": 1, "kernel_id": "k-bounds",
              "kernel_secret": "secret", "user": "someone", **fields}
    return client.request(header)[0]


def test_max_secret_bounds_what_a_client_names_itself(agent_starter: Any) -> None:
    agent = agent_starter("--max-secret", "16")
    neighbour, bad = RawClient(agent.endpoint), RawClient(agent.endpoint)
    try:
        base = stored(neighbour, b"neighbour")
        for field in ("kernel_id", "kernel_secret", "user"):
            reply = lease_request(bad, **{field: "x" * 17})
            assert reply["t"] == P.ERROR and reply["e"]["kind"] == "ProtocolError", reply
            message = reply["e"]["msg"]
            assert "17 characters" in message and "at most 16" in message, message
            assert "--max-secret" in message, message
        reply = lease_request(bad, kernel_id="k" * 16, kernel_secret="s" * 16, user="u" * 16)
        assert reply["t"] == P.LEASE  # at the bound it is taken (and queued behind neighbour)
        assert read_back(neighbour, base, 9) == b"neighbour"
        # the agent's own lease tokens (32 characters) are not held to the clients' bound
        assert neighbour.release()["t"] == P.LEASE
    finally:
        bad.close()
        neighbour.close()


def test_max_lease_info_bounds_the_info_a_lease_carries(agent_starter: Any) -> None:
    agent = agent_starter("--max-lease-info", "1KiB")
    neighbour, bad = RawClient(agent.endpoint), RawClient(agent.endpoint)
    try:
        base = stored(neighbour, b"neighbour")
        reply = lease_request(bad, info={"notebook": "x" * 2048})
        assert reply["t"] == P.ERROR and reply["e"]["kind"] == "ProtocolError", reply
        message = reply["e"]["msg"]
        assert "2.0 KiB" in message and "at most 1.0 KiB" in message, message
        assert "--max-lease-info" in message and "bytes" not in message, message
        assert lease_request(bad, info={"notebook": "x" * 512})["t"] == P.LEASE
        assert read_back(neighbour, base, 9) == b"neighbour"
    finally:
        bad.close()
        neighbour.close()


def test_max_lease_info_bounds_the_client_description_a_session_keeps(agent_starter: Any
                                                                      ) -> None:
    """What hello says of its client is kept with the session and repeated in every status
    reply to everyone: bounded as lease info is, refused to that client alone."""
    agent = agent_starter("--max-lease-info", "1KiB", "--slots", "2")
    neighbour, bad = RawClient(agent.endpoint), RawClient(agent.endpoint)
    try:
        base = stored(neighbour, b"neighbour")
        reply = bad.hello(client={"note": "x" * 4096})
        assert reply["t"] == P.ERROR and reply["e"]["kind"] == "ProtocolError", reply
        message = reply["e"]["msg"]
        assert "client description of 4.0 KiB" in message and "at most 1.0 KiB" in message
        assert "--max-lease-info" in message, message
        assert bad.hello(client={"note": "x" * 100})["t"] == P.WELCOME
        assert read_back(neighbour, base, 9) == b"neighbour"
    finally:
        bad.close()
        neighbour.close()


def test_min_lease_ttl_raises_a_ttl_asked_below_it(agent_starter: Any) -> None:
    """A lease asking to expire sooner than --min-lease-ttl gets that ttl, and its reply says
    so (its keeper renews by what the agent granted)."""
    agent = agent_starter("--min-lease-ttl", "5", "--lease-ttl", "30")
    client, other = RawClient(agent.endpoint), RawClient(agent.endpoint)
    try:
        assert client.take_lease(ttl=0.01)["ttl"] == 5
        assert other.take_lease(wait=False, ttl=10)["ttl"] == 10  # its own ask stands
    finally:
        client.close()
        other.close()


def test_sessions_per_kernel_drops_that_kernels_oldest_parked_state(agent_starter: Any) -> None:
    agent = agent_starter("--sessions-per-kernel", "2")
    other, kernel = RawClient(agent.endpoint), RawClient(agent.endpoint)
    try:
        others = park(other, b"other's")  # the oldest parked state here, of another kernel
        first, second = park(kernel, b"first"), park(kernel, b"second")
        third_base = stored(kernel, b"third")  # one more: the kernel's first goes
        assert read_back(kernel, third_base, 5) == b"third"
        kernel.release()
        kernel.next_push(P.LOST)
        kernel.welcome = None
        reply = resume(kernel, first)
        assert reply["e"]["kind"] == "StateLost", reply
        assert "--sessions-per-kernel" in reply["e"]["msg"] and "(2," in reply["e"]["msg"]
        assert "re-run the code that creates your device arrays" in reply["e"]["msg"]
        assert resume(kernel, second)["t"] == P.WELCOME
        assert read_back(kernel, second["base"], 6) == b"second"
        kernel.release()
        assert resume(other, others)["t"] == P.WELCOME
        assert read_back(other, others["base"], 7) == b"other's"
    finally:
        other.close()
        kernel.close()


def test_max_sessions_drops_the_oldest_parked_and_refuses_past_the_active(
        agent_starter: Any) -> None:
    agent = agent_starter("--max-sessions", "2")
    old, kept, new = (RawClient(agent.endpoint) for _ in range(3))
    try:
        olds, keeps = park(old, b"old"), park(kept, b"kept")
        assert read_back(new, stored(new, b"new"), 3) == b"new"  # the third: the oldest goes
        new.release()
        new.next_push(P.LOST)
        reply = resume(old, olds)
        assert reply["e"]["kind"] == "StateLost", reply
        assert "at most 2 sessions (harp-agent --max-sessions)" in reply["e"]["msg"]
        old.release()
        assert resume(kept, keeps)["t"] == P.WELCOME
        assert read_back(kept, keeps["base"], 4) == b"kept"
    finally:
        for client in (old, kept, new):
            client.close()
    agent = agent_starter("--max-sessions", "1", "--slots", "2")
    active, refused = RawClient(agent.endpoint), RawClient(agent.endpoint)
    try:
        base = stored(active, b"active")
        reply = refused.hello()
        assert reply["e"]["kind"] == "SessionError", reply
        assert "1 sessions, all of them active (harp-agent --max-sessions)" in reply["e"]["msg"]
        assert "try another agent" in reply["e"]["msg"]
        assert read_back(active, base, 6) == b"active"
    finally:
        active.close()
        refused.close()


def test_disconnect_grace_ends_a_session_whose_client_vanished(agent_starter: Any) -> None:
    agent = agent_starter("--disconnect-grace", "0.5", "--slots", "2")
    vanished, neighbour = RawClient(agent.endpoint), RawClient(agent.endpoint)
    try:
        stored(vanished, b"vanished")
        base = stored(neighbour, b"neighbour")
        session = vanished.welcome["session"]
        assert vanished.data is not None
        vanished.data.close(0)  # its connection to the worker drops, without a bye
        vanished.data = None
        notice = vanished.next_push(P.LOST)  # its lease's connection still hears why
        assert notice["session"] == session and notice["e"]["kind"] == "StateLost"
        assert "--disconnect-grace" in notice["e"]["msg"] and "0.5 s" in notice["e"]["msg"]

        def gone() -> bool:
            sessions = neighbour.status()["leases"]["sessions"]
            return all(s["kernel_id"] != vanished.kernel_id for s in sessions)

        wait_for(gone, what="the vanished client's session to end")
        reply = vanished.hello(resume={"session": session,
                                       "resume_token": vanished.welcome["resume_token"]})
        assert reply["e"]["kind"] == "StateLost" and "--disconnect-grace" in reply["e"]["msg"]
        assert read_back(neighbour, base, 9) == b"neighbour"
    finally:
        vanished.close()
        neighbour.close()


class SlowReader:
    """A client that sends batches and then reads nothing: it speaks ZeroMQ's wire protocol
    (ZMTP 3.0, NULL mechanism, as a DEALER) on a plain TCP socket with a small receive buffer,
    so no ZeroMQ I/O thread on this side drains the worker's replies while the test looks."""

    def __init__(self, endpoint: str) -> None:
        host, port = endpoint.removeprefix("tcp://").rsplit(":", 1)
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 10)
        self.sock.settimeout(30)
        self.sock.connect((host, int(port)))
        self.sock.sendall(b"\xff" + b"\0" * 8 + b"\x7f\x03\x00" + b"NULL".ljust(20, b"\0")
                          + b"\0" * 32)
        self._exactly(64)  # the worker's greeting
        name, value = b"Socket-Type", b"DEALER"
        body = (b"\x05READY" + bytes([len(name)]) + name + len(value).to_bytes(4, "big")
                + value)
        self.sock.sendall(b"\x04" + bytes([len(body)]) + body)
        self._frame()  # the worker's READY

    def send(self, frames: list[Any]) -> None:
        out = bytearray()
        for i, frame in enumerate(frames):
            data = bytes(frame)
            more = 1 if i < len(frames) - 1 else 0
            if len(data) < 256:
                out += bytes([more]) + bytes([len(data)]) + data
            else:
                out += bytes([more | 2]) + len(data).to_bytes(8, "big") + data
        self.sock.sendall(out)

    def receive(self) -> list[bytes]:
        frames = []
        while True:
            flags, data = self._frame()
            frames.append(data)
            if not flags & 1:
                return frames

    def _frame(self) -> tuple[int, bytes]:
        flags = self._exactly(1)[0]
        size = int.from_bytes(self._exactly(8 if flags & 2 else 1), "big")
        return flags, self._exactly(size)

    def _exactly(self, n: int) -> bytes:
        data = bytearray()
        while len(data) < n:
            got = self.sock.recv(min(n - len(data), 1 << 20))
            assert got, "the worker closed the connection"
            data += got
        return bytes(data)

    def close(self) -> None:
        self.sock.close()


def test_unread_replies_bound_a_slow_readers_replies_in_the_worker(
        agent_starter: Any) -> None:
    """Past --unread-replies the worker stops reading a client's batches: the replies it leaves
    unread wait in its own socket buffers, not in the agent's memory; the other slot's tenant
    is served meanwhile, and the slow reader gets everything, in order, once it reads."""
    agent = agent_starter("--unread-replies", "2", "--slots", "2")
    client, neighbour = RawClient(agent.endpoint), RawClient(agent.endpoint)
    slow: SlowReader | None = None
    try:
        base = stored(client, b"\x07" * 16)
        neighbour_base = stored(neighbour, b"neighbour")
        welcome = client.welcome
        assert welcome is not None
        worker = _worker_listening_on(agent, int(welcome["worker"].rsplit(":", 1)[1]))
        rss = worker.memory_info().rss
        slow = SlowReader(welcome["worker"])
        slow.send([P.pack_header({"t": P.ATTACH, "session": welcome["session"],
                                  "attach": welcome["attach"]})])
        assert P.decode(slow.receive())[0]["t"] == P.ATTACHED
        for seq in range(1, 201):  # 200 MiB of replies, which it does not read
            slow.send(P.encode({"t": P.BATCH, "q": seq, "c": [["dtoh", base, MiB, None]]}))
        samples = []
        for _ in range(300):  # sampled while the worker runs into the bound (unbounded, it
            # holds past 48 MiB of replies well before the neighbour's 300th round trip)
            samples.append(worker.memory_info().rss - rss)
            assert read_back(neighbour, neighbour_base, 9) == b"neighbour"
        assert max(samples) < 48 * MiB, samples
        for seq in range(1, 201):  # everything still arrives, in order
            reply, frames = P.decode(slow.receive())
            assert reply["q"] == seq and len(frames[0]) == MiB, reply
    finally:
        if slow is not None:
            slow.close()
        client.close()
        neighbour.close()


def test_unread_replies_bound_what_the_supervisor_keeps_for_a_slow_reader(
        agent_starter: Any) -> None:
    """The supervisor's socket keeps --unread-replies (plus room for one push per queued
    lease) of a client's replies; past that, a client that does not read loses its own
    replies, and the supervisor neither holds the rest nor stops answering everyone else."""
    agent = agent_starter("--unread-replies", "2", "--max-queue", "1", "--slots", "2",
                          "--max-lease-info", "200KiB")
    supervisor = psutil.Process(agent.process.pid)
    owner, neighbour = RawClient(agent.endpoint), RawClient(agent.endpoint)
    # a session whose client description makes every full status reply about 100 KiB
    assert owner.hello(client={"note": "x" * 100_000})["t"] == P.WELCOME
    # a raw socket that takes almost nothing off the wire unread, so that what it does not
    # read backs up into the supervisor's socket rather than into this process's buffers
    slow = zmq.Context.instance().socket(zmq.DEALER)
    slow.setsockopt(zmq.LINGER, 0)
    slow.setsockopt(zmq.RCVHWM, 1)
    slow.setsockopt(zmq.RCVBUF, 4096)
    slow.connect(agent.endpoint)
    try:
        rss = supervisor.memory_info().rss
        sent = 2000  # 200 MiB of replies, which it does not read
        for _ in range(sent):
            slow.send_multipart(P.encode({"t": P.STATUS, "rid": 0}))
        slow.send_multipart(P.encode({"t": P.BATCH, "q": 1, "c": []}))  # refused, after them
        wait_for(lambda: neighbour.status()["leases"]["refusals"].get("SessionError") == 1,
                 what="the supervisor handled every request of the slow reader")
        # unbounded (ZeroMQ's default of 1000), it holds about 100 MiB of them
        growth = supervisor.memory_info().rss - rss
        assert growth < 48 * MiB, f"the supervisor grew by {growth >> 20} MiB"
        assert neighbour.take_lease()["state"] == "held"  # the neighbour is served
        kept = 0
        slow.send_multipart(P.encode({"t": P.STATUS, "rid": "last"}))
        while True:  # what the supervisor kept arrives in order, ahead of a later status
            if not slow.poll(500):  # that status was dropped too: ask again
                slow.send_multipart(P.encode({"t": P.STATUS, "rid": "last"}))
                continue
            header, _ = P.decode(slow.recv_multipart())
            if header.get("rid") == "last":  # and the slow reader is still served
                break
            if header["t"] == P.ERROR:  # the refused batch's answer, when it was kept
                assert header["e"]["kind"] == "SessionError", header
                continue
            assert header["t"] == P.STATUS and header["rid"] == 0, header
            kept += 1
        # a few in the supervisor's socket, some more in the kernel's socket buffers (at most
        # a few MiB); the rest of its replies were the slow reader's own loss
        assert kept < sent // 8, kept
        assert read_back(owner, stored(owner, b"owner"), 5) == b"owner"  # and the session
        assert agent.process.poll() is None
    finally:
        slow.close()
        owner.close()
        neighbour.close()


def _worker_listening_on(agent: Any, port: int) -> psutil.Process:
    for child in psutil.Process(agent.process.pid).children():
        for connection in child.net_connections(kind="tcp"):
            if connection.status == psutil.CONN_LISTEN and connection.laddr.port == port:
                return child
    raise AssertionError("no worker listens on the session's port")


def test_max_frame_bounds_one_dtoh(agent_starter: Any) -> None:
    agent = agent_starter("--max-frame", "1MiB", "--slots", "2")
    bad, neighbour = RawClient(agent.endpoint), RawClient(agent.endpoint)
    try:
        base = bad.hello()["range"][0]
        neighbour_base = stored(neighbour, b"neighbour")
        reply, _ = bad.batch(["alloc", base, 4 * MiB], ["dtoh", base, 2 * MiB, None],
                             ["dtoh", base, MiB, None])
        assert reply["e"]["kind"] == "LogicError" and reply["e"]["i"] == 1, reply
        message = reply["e"]["msg"]
        assert "2.0 MiB" in message and "at most 1.0 MiB" in message, message
        assert "--max-frame" in message, message
        reply, frames = bad.batch(["dtoh", base, MiB, None])  # within the bound: served
        assert reply["e"] is None and len(frames[0]) == MiB
        assert read_back(neighbour, neighbour_base, 9) == b"neighbour"
    finally:
        bad.close()
        neighbour.close()


def test_an_upload_frame_over_max_frame_drops_that_client_alone(agent_starter: Any) -> None:
    """The welcome says the bound (the shim cuts its copies to it and refuses a larger buffer
    before sending); a raw client that sends a larger frame anyway is cut off by ZeroMQ's
    message size limit, unanswered, and its neighbour is served as before."""
    agent = agent_starter("--max-frame", "1MiB", "--slots", "2")
    bad, neighbour = RawClient(agent.endpoint, timeout_ms=2000), RawClient(agent.endpoint)
    try:
        welcome = bad.hello()
        assert welcome["max_frame"] == MiB
        base = welcome["range"][0]
        neighbour_base = stored(neighbour, b"neighbour")
        assert bad.batch(["alloc", base, 4 * MiB])[0]["e"] is None
        with pytest.raises(zmq.Again):
            bad.batch(["htod", base, P.FrameRef(1), None], frames=(b"x" * (3 * MiB),))
        assert read_back(neighbour, neighbour_base, 9) == b"neighbour"
    finally:
        bad.close()
        neighbour.close()


def test_fetch_timeout_bounds_the_wait_for_an_agent_that_never_answers(
        agent_starter: Any) -> None:
    agent = agent_starter("--fetch-timeout", "1", "--slots", "2")
    frozen = zmq.Context.instance().socket(zmq.ROUTER)  # takes connections, answers nothing
    frozen.setsockopt(zmq.LINGER, 0)
    port = frozen.bind_to_random_port("tcp://127.0.0.1")
    stuck, neighbour = RawClient(agent.endpoint), RawClient(agent.endpoint)
    try:
        neighbour_base = stored(neighbour, b"neighbour")
        stuck.take_lease()
        reply = stuck.request({
            "t": P.HELLO, "v": P.PROTOCOL_VERSION, "client": {}, "rid": 5,
            "lease": [stuck.lease["id"], stuck.lease["token"]],
            "range": [P.ADDRESS_SPACE_BASE + 7 * P.SESSION_RANGE_SIZE, 0],
            "resume": {"session": "s", "resume_token": "t",
                       "from": f"tcp://127.0.0.1:{port}"}})[0]
        assert reply["e"]["kind"] == "StateLost", reply
        message = reply["e"]["msg"]
        assert "did not answer within 1 s" in message and "--fetch-timeout" in message, message
        assert "re-run the code that creates your device arrays" in message
        assert read_back(neighbour, neighbour_base, 9) == b"neighbour"
        assert stuck.hello()["t"] == P.WELCOME  # its kernel's next session starts afresh
    finally:
        stuck.close()
        neighbour.close()
        frozen.close(0)


HANG_AT_START = """\
import os, signal, sys
_switch = os.environ.get("HARP_TEST_HANG_WORKERS_WHEN")
if _switch and os.path.exists(_switch):
    with open("/proc/self/cmdline", "rb") as _f:
        if b"gpu_agent.worker" in _f.read():
            os.kill(os.getpid(), signal.SIGSTOP)  # a worker whose CUDA context never comes
"""


def test_worker_start_timeout_ends_a_worker_that_never_gets_ready(
        agent_starter: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Workers started once the switch file exists stop before they are ready (as one whose
    CUDA context creation hangs): the session waiting for one is told, naming the flag."""
    (tmp_path / "sitecustomize.py").write_text(HANG_AT_START)
    switch = tmp_path / "hang"
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    monkeypatch.setenv("HARP_TEST_HANG_WORKERS_WHEN", str(switch))
    # long enough for a worker to start on a loaded machine (the agent's first must, too)
    agent = agent_starter("--worker-start-timeout", "10", "--slots", "2")
    neighbour, late = RawClient(agent.endpoint), RawClient(agent.endpoint, timeout_ms=60_000)
    try:
        switch.touch()  # every worker started from now on hangs
        base = stored(neighbour, b"neighbour")  # takes the warm spare, ready before
        reply = late.hello()
        assert reply["e"]["kind"] == "StateLost", reply
        message = reply["e"]["msg"]
        assert "did not get ready within 10 s" in message, message
        assert "--worker-start-timeout" in message, message
        assert read_back(neighbour, base, 9) == b"neighbour"
        assert agent.process.poll() is None
        switch.unlink()

        def served() -> bool:  # a worker that gets ready serves it again
            _continue_workers(agent)  # (one started while the switch was there goes on)
            reply = late.hello()
            assert reply["t"] == P.WELCOME or "--worker-start-timeout" in reply["e"]["msg"]
            return reply["t"] == P.WELCOME

        wait_for(served, 90, "a session on a worker that got ready")
    finally:
        neighbour.close()
        late.close()
        _continue_workers(agent)


def _continue_workers(agent: Any) -> None:
    for child in psutil.Process(agent.process.pid).children():
        try:
            child.send_signal(signal.SIGCONT)
        except psutil.NoSuchProcess:
            pass


def test_park_memory_dir_is_where_parked_state_lives_in_memory(agent_starter: Any,
                                                                 tmp_path: Path) -> None:
    memory = tmp_path / "memory"
    memory.mkdir()
    agent = agent_starter("--park-memory-dir", str(memory), "--park-memory", "8MiB")
    client = RawClient(agent.endpoint)
    try:
        parked = park(client, b"parked")
        files = [p for p in memory.rglob("*") if p.is_file()]
        assert files and all(parked["session"] in p.name for p in files), files
        assert resume(client, parked)["t"] == P.WELCOME
        assert read_back(client, parked["base"], 6) == b"parked"
        wait_for(lambda: not any(p.is_file() for p in memory.rglob("*")),
                 what="the restored session's files to go")
    finally:
        client.close()


def test_a_park_counts_the_sessions_compiled_code_against_park_limit(
        agent_starter: Any) -> None:
    """The park plan adds the code nvcc made for a session (its worker's status page
    ``code_bytes``) to its device memory. The emulated executor compiles nothing, so the
    session gets its code as a moved one does: fetched, with its parked state, from an agent
    that drained (here a socket answering as one)."""
    code = SessionCompileCache()
    code.get_or_compile(SessionCompileCache.key("kernel", [], "nvcc", "cubin"),
                        lambda: b"\x7fcubin" * (1 << 20))  # 6 MiB of compiled code
    records = b"".join(code.records())
    agent = agent_starter("--park-memory", "4MiB", "--park-limit", "4MiB", "--slots", "2")
    moved, neighbour = RawClient(agent.endpoint), RawClient(agent.endpoint)
    origin = zmq.Context.instance().socket(zmq.ROUTER)
    origin.setsockopt(zmq.LINGER, 0)
    origin_endpoint = f"tcp://127.0.0.1:{origin.bind_to_random_port('tcp://127.0.0.1')}"
    base = P.ADDRESS_SPACE_BASE + 9 * P.SESSION_RANGE_SIZE
    device = b"\x05" * P.GRANULARITY

    def serve_as_origin() -> None:
        while origin.poll(20_000):
            route, raw = origin.recv_multipart()
            request = P.unpack_header(raw)
            reply: dict[str, Any] = {"t": P.PARKED_STATE, "rid": request["rid"]}
            frames: list[bytes] = []
            if request["t"] == P.PARKED_FETCH:
                reply["manifest"] = {
                    "session": "moved-1", "kernel_id": moved.kernel_id, "log": [],
                    "range": [base, P.SESSION_RANGE_SIZE],
                    "chunks": [[compile_cache.PARKED_CHUNK, len(records)],
                               [base, len(device)]]}
            elif request["t"] == P.PARKED_CHUNK:
                data = records if request["addr"] == compile_cache.PARKED_CHUNK else device
                frames = [data[request["offset"]:request["offset"] + request["size"]]]
            else:
                reply["t"] = P.DROPPED
            origin.send_multipart([route, P.pack_header(reply), *frames])
            if request["t"] == P.PARKED_FORGET:
                return

    thread = threading.Thread(target=serve_as_origin, daemon=True)
    thread.start()
    try:
        neighbour_base = stored(neighbour, b"neighbour")
        moved.take_lease()
        welcome = moved.request({
            "t": P.HELLO, "v": P.PROTOCOL_VERSION, "client": {}, "rid": 3,
            "lease": [moved.lease["id"], moved.lease["token"]], "range": [base, 0],
            "resume": {"session": "moved-1", "resume_token": "t", "from": origin_endpoint}})[0]
        assert welcome["t"] == P.WELCOME and welcome["resumed"], welcome
        moved.attach(welcome)
        assert read_back(moved, base, 4) == b"\x05" * 4
        thread.join(20)
        # 2 MiB of device memory fit --park-limit; with its 6 MiB of code the session does not
        moved.release()
        notice = moved.next_push(P.LOST)
        assert notice["e"]["kind"] == "StateLost", notice
        message = notice["e"]["msg"]
        assert "device memory and compiled code" in message and "--park-limit" in message
        assert "8.0 MiB" in message and "4.0 MiB" in message, message
        assert read_back(neighbour, neighbour_base, 9) == b"neighbour"
    finally:
        moved.close()
        neighbour.close()
        origin.close(0)


PROFILED_PROGRAM = r"""
import sys
from harp_jupyter.shim import activate
activate(agent=sys.argv[1])
import pycuda.autoinit
import pycuda.driver as cuda
from harp_jupyter.profiler.display import ProfileResult
from harp_jupyter.profiler.profile import profiled

x = cuda.mem_alloc(1024)

def cell():
    for i in range(40):
        cuda.memset_d32(x, i, 16)
    cuda.Context.synchronize()

_, profile = profiled(cell, per_op=True)
print("NOTE:", ProfileResult(profile).summary["note"])
"""


def test_pending_gpu_timings_bounds_what_a_profile_keeps_uncollected(
        agent_starter: Any) -> None:
    agent = agent_starter("--pending-gpu-timings", "8")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    child = subprocess.run([sys.executable, "-c", PROFILED_PROGRAM, agent.endpoint], env=env,
                           capture_output=True, text=True, timeout=100)
    assert child.returncode == 0, child.stderr
    # the 40 memsets ran; 8 have GPU times, the rest are said to have none, naming the flag
    note = child.stdout.split("NOTE:", 1)[1]
    assert "32 of the 40 GPU ops sent have no GPU time" in note, note
    assert "--pending-gpu-timings" in note
