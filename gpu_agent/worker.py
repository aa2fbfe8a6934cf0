"""A worker: one session's CUDA context, in a process of its own (ARCHITECTURE §2).

The supervisor starts workers ahead of need (a warm spare has its context before anyone asks),
hands one a session with ``open``, and gives its endpoint to the client, which attaches and sends
its batches straight here: the hot path has no Python hop. Whatever goes wrong in here (a sticky
CUDA error, out-of-memory, a hung kernel the supervisor's watchdog kills, a crash) ends this
process and this session alone; the supervisor and every other tenant live on.

A worker never outlives its session: ``park`` streams the session's device memory to files, piece
by piece (never a second copy of the whole session in memory), and ends; ``end`` just ends. The
process exit gives the GPU memory and the context back. Run as ``python -m gpu_agent.worker``.
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import zmq
from zmq.utils.monitor import recv_monitor_message

from gpu_agent import protocol as P
from gpu_agent import worker_link as W
from gpu_agent.batches import BatchRunner
from gpu_agent.curve import ServerKeys, connect_encrypted, serve_encrypted
from gpu_agent.datastore import DataStore
from gpu_agent.errors import AgentError
from gpu_agent.executors import make_executor
from gpu_agent.executors.base import Executor, is_object_chunk, object_chunk_address

log = logging.getLogger("harp.agent.worker")

#: bytes moved per step when parking, restoring or fetching (bounds the worker's host memory)
PIECE_BYTES = 64 << 20
#: how long the worker blocks on its client before it looks at the supervisor's socket again
_IDLE_SLICE_MS = 10


class Worker:
    """The worker process's loop; see the module docstring."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.context = zmq.Context()
        self.control = self.context.socket(zmq.DEALER)
        self.control.setsockopt(zmq.IDENTITY, args.worker_id.encode())
        self.control.setsockopt(zmq.LINGER, 2000)
        self.control.connect(args.control)
        self.data = self.context.socket(zmq.ROUTER)
        self.data.setsockopt(zmq.LINGER, 0)
        self.data.setsockopt(zmq.MAXMSGSIZE, args.max_frame + (1 << 20))
        self.data.setsockopt(zmq.SNDHWM, args.unread_replies)
        self.data.setsockopt(zmq.RCVHWM, args.unread_replies)
        self.data.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.curve = ServerKeys.load(args.curve_secret_key_file, args.curve_client_keys_dir) \
            if args.curve_secret_key_file else None
        self.authenticator = serve_encrypted(self.context, [self.data], self.curve) \
            if self.curve is not None else None
        self.endpoint = _bind(self.data, args.bind, args.ports)
        if args.advertise_host:
            self.endpoint = f"tcp://{args.advertise_host}:{self.endpoint.rsplit(':', 1)[1]}"
        self.monitor = self.data.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.status = W.StatusPage(args.status)
        self.kernel_output = KernelOutput()
        self.executor: Executor = make_executor(args.executor, args.device,
                                                emulated_memory=args.memory_cap,
                                                pinned_staging=args.pinned_staging)
        if args.data_root:
            self.executor.data_store = DataStore(args.data_root, writable=args.data_writable)
            self.executor.data_reader_choice = args.data_reader
        self.runner: BatchRunner | None = None
        self.session_id: str | None = None
        self.attach_token: str | None = None
        self.client: bytes | None = None
        self.client_fd: int | None = None
        self.running = True

    # {{{ loop

    def serve(self) -> None:
        free, total = self.executor.mem_info()
        self._tell(W.READY, pid=os.getpid(), endpoint=self.endpoint,
                   device=self.executor.device_info(), memory=[free, total],
                   data=self.executor.data_status())
        self.data.setsockopt(zmq.RCVTIMEO, _IDLE_SLICE_MS)
        while self.running:
            if self.control.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                self._on_control(*P.decode(self.control.recv_multipart(copy=False)))
                continue
            if self.runner is None:
                # a spare: nothing comes on the data socket before ``open``, so wait for the
                # supervisor instead (an acquire does not pay the data socket's time slice)
                if not self.control.poll(_IDLE_SLICE_MS):
                    self._check_supervisor()
                continue
            try:
                parts = self.data.recv_multipart(copy=False)
            except zmq.Again:
                self._read_monitor()
                self._check_supervisor()
                continue
            self._on_data(parts)

    def _check_supervisor(self) -> None:
        """End when the supervisor is gone (the kernel's parent-death signal covers most
        cases; this covers a supervisor that died while this worker was still starting)."""
        if os.getppid() != self.args.supervisor_pid:
            log.warning("the supervisor is gone: this worker ends")
            self.running = False

    def _on_data(self, parts: list[Any]) -> None:
        route = parts[0].bytes
        try:
            header, frames = P.decode(parts[1:])
        except P.ProtocolError as e:
            self._send(route, {"t": P.ERROR, "e": e.to_wire()})
            return
        kind = header.get("t")
        if kind == P.ATTACH:
            self._on_attach(route, header, parts[0])
        elif kind == P.BATCH:
            self._on_batch(route, header, frames)
        else:
            self._send(route, {"t": P.ERROR, "e": P.error(
                "ProtocolError", f"a worker takes attach and batch messages, not {kind!r}")})

    def _on_attach(self, route: bytes, header: dict[str, Any], frame: zmq.Frame) -> None:
        token = header.get("attach")
        if (self.runner is None or self.attach_token is None or not isinstance(token, str)
                or header.get("session") != self.session_id
                or not secrets.compare_digest(token, self.attach_token)):
            self._send(route, {"t": P.ERROR, "e": P.error(
                "AuthError", "this worker serves another session (wrong attach token)")})
            return
        back = self.client is not None and self.client != route
        self.client, self.client_fd = route, frame.get(zmq.SRCFD)
        self._send(route, {"t": P.ATTACHED, "session": self.session_id})
        if back:
            self._tell(W.BACK, session=self.session_id)

    def _on_batch(self, route: bytes, header: dict[str, Any], frames: list[Any]) -> None:
        if route != self.client or self.runner is None:
            self._send(route, {"t": P.REPLY, "q": header.get("q"), "r": [], "e": P.error(
                "SessionError", "this connection has not attached to the session")})
            return
        runner = self.runner
        self.status.batch_started(time.monotonic_ns())
        try:
            reply, out = runner.run(header, frames)
        except AgentError as e:
            reply, out = {"t": P.REPLY, "q": header.get("q"), "r": [], "e": e.to_wire()}, []
        self.status.batch_ended(time.monotonic_ns(), runner.batches, runner.calls,
                                runner.device_bytes)
        printed = self.kernel_output.take()
        if printed:
            reply["out"] = printed
        self._send(route, reply, out)
        if runner.lost is not None:
            self._tell(W.FATAL, session=self.session_id, e=P.error(
                "ContextLost", f"a fatal GPU error in it ({runner.lost_cause})"))
            self.running = False

    def _read_monitor(self) -> None:
        while self.monitor.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            event = recv_monitor_message(self.monitor)
            if event["event"] == zmq.EVENT_DISCONNECTED and event["value"] == self.client_fd:
                self.client_fd = None
                self._tell(W.GONE, session=self.session_id)

    # }}}

    # {{{ control

    def _on_control(self, header: dict[str, Any], frames: list[Any]) -> None:
        kind = header.get("t")
        if kind == W.OPEN:
            self._open(header)
        elif kind == W.PARK:
            self._park(header)
        elif kind == W.END:
            self.running = False

    def _open(self, header: dict[str, Any]) -> None:
        session = str(header["session"])
        try:
            device = self.executor.open_session(int(header["base"]), int(header["size"]))
            self.runner = BatchRunner(self.executor, device, int(header["base"]),
                                      int(header["size"]), memory_cap=int(header["cap"]),
                                      max_frame=self.args.max_frame)
            restored = 0
            if header.get("restore"):
                restored = self._restore_from_files(header["restore"])
            elif header.get("fetch"):
                restored = self._restore_from_agent(header["fetch"], int(header["base"]))
        except AgentError as e:
            self._tell(W.OPEN_FAILED, session=session, e=e.to_wire())
            self.running = False
            return
        except Exception as e:
            log.exception("opening session %s", session)
            self._tell(W.OPEN_FAILED, session=session, e=P.error(
                "StateLost", f"recreating the session failed: {type(e).__name__}: {e}"))
            self.running = False
            return
        self.session_id, self.attach_token = session, str(header["attach"])
        self.status.batch_ended(time.monotonic_ns(), 0, 0, self.runner.device_bytes)
        self._tell(W.OPENED, session=session, restored_bytes=restored)

    def _replay(self, calls: list[Any]) -> None:
        assert self.runner is not None
        for call in calls:
            name, args = P.validate_call(call)
            if P.OPS[name].creates is None and P.OPS[name].configures is None:
                raise AgentError("StateLost", f"the parked state's log holds {name}, which "
                                 "creates nothing")
            self.runner.call(name, args)

    def _restore_from_files(self, restore: dict[str, Any]) -> int:
        assert self.runner is not None
        self._replay(restore.get("log") or [])
        total = 0
        buffer = np.empty(PIECE_BYTES, np.uint8)
        objects: list[memoryview] = []
        for addr, size, path in restore.get("chunks") or []:
            if is_object_chunk(addr):  # session objects outside device memory (torch tensors)
                objects.append(_read_object(path, size))
                total += size
                continue
            self.runner.call("alloc", [addr, size])
            with open(path, "rb", buffering=0) as f:
                for offset in range(0, size, PIECE_BYTES):
                    piece = memoryview(buffer)[:min(PIECE_BYTES, size - offset)]
                    if f.readinto(piece) != piece.nbytes:
                        raise AgentError("StateLost", f"parked file {path} is short")
                    self.runner.device.write_from(addr + offset, piece)
            total += size
        self.runner.device.restore_objects(objects)
        return total

    def _restore_from_agent(self, fetch: dict[str, Any], base: int) -> int:
        """Pull a session parked on another agent, piece by piece, checking that what comes is
        what was asked for (the session, its kernel, its address range)."""
        assert self.runner is not None
        origin = _AgentPeer(self.context, str(fetch["endpoint"]), fetch.get("token"),
                            self.args.fetch_timeout, self.args.max_frame, self.curve)
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
            self._replay(manifest.get("log") or [])
            total = 0
            objects: list[memoryview] = []
            for chunk in manifest["chunks"]:
                if not (type(chunk) is list and len(chunk) == 2
                        and all(type(x) is int for x in chunk)):
                    raise AgentError("StateLost", "malformed chunk list in the manifest")
                addr, size = chunk
                if is_object_chunk(addr):
                    whole = bytearray(size)
                    for offset, piece in origin.pieces(ask, addr, size):
                        whole[offset:offset + piece.nbytes] = piece
                    objects.append(memoryview(whole))
                else:
                    self.runner.call("alloc", [addr, size])
                    for offset, piece in origin.pieces(ask, addr, size):
                        self.runner.device.write_from(addr + offset, piece)
                total += size
            self.runner.device.restore_objects(objects)
            try:
                origin.request({"t": P.PARKED_FORGET, **ask})
            except AgentError as e:
                log.warning("could not tell %s to forget the moved session: %s",
                            fetch["endpoint"], e)
            return total
        finally:
            origin.close()

    def _park(self, header: dict[str, Any]) -> None:
        runner = self.runner
        if runner is None:
            self._tell(W.PARK_FAILED, e=P.error("SessionError", "no session to park"))
            self.running = False
            return
        self.client = None  # nothing more runs: the supervisor told the client
        memory_dir, disk_dir = Path(header["memory_dir"]), Path(header["disk_dir"])
        memory_room = int(header["memory_room"])
        chunks: list[list[Any]] = []
        buffer = np.empty(PIECE_BYTES, np.uint8)
        try:
            for addr, size in runner.device.mapped_chunks():
                where = memory_dir if size <= memory_room else disk_dir
                if where is memory_dir:
                    memory_room -= size
                path = where / f"{self.session_id}-{addr:x}.bin"
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
                path = where / f"{self.session_id}-object{index}-{name}.bin"
                with open(path, "xb", buffering=0) as f:
                    for offset in range(0, view.nbytes, PIECE_BYTES):
                        f.write(view[offset:offset + PIECE_BYTES])
                chunks.append([object_chunk_address(index), view.nbytes, str(path)])
        except (OSError, AgentError) as e:
            for _addr, _size, path in chunks:
                _unlink(path)
            self._tell(W.PARK_FAILED, e=P.error("StateLost", f"writing it failed: {e}"))
            self.running = False
            return
        log_calls = runner.log.replay_calls()
        # the device memory is given back before the supervisor hears: the slot is free then
        runner.device.close()
        # ``batches``: the count the park captured, in the report itself (the status page
        # may be gone by the time the supervisor reads the report)
        self._tell(W.PARKED, session=self.session_id, chunks=chunks, log=log_calls,
                   bytes=sum(c[1] for c in chunks), batches=runner.batches)
        self.running = False

    # }}}

    def _tell(self, kind: str, **fields: Any) -> None:
        self.control.send(P.pack_header({"t": kind, **fields}))

    def _send(self, route: bytes, header: dict[str, Any], frames: list[Any] = ()) -> None:
        message = [route, P.pack_header(header), *frames]
        while True:
            try:
                self.data.send_multipart(message, copy=False, flags=zmq.NOBLOCK)
                return
            except zmq.Again:
                # the client leaves replies unread: wait for it (back-pressure), never pile up
                if not self.data.poll(_IDLE_SLICE_MS, zmq.POLLOUT):
                    if self.control.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                        return  # the supervisor wants us (park, end): the client is too slow
            except zmq.ZMQError as e:  # the client is gone (EHOSTUNREACH)
                log.info("could not answer %s: %s", route.hex(), e)
                return

    def close(self) -> None:
        self.status.close()
        if self.authenticator is not None:
            self.authenticator.stop()
        for socket in (self.monitor, self.data, self.control):
            socket.close()
        self.context.term()


class KernelOutput:
    """This worker's fd 1 goes into a pipe, so what kernels ``printf`` (CUDA writes it to
    stdout at a synchronize) can travel with the next reply. A thread drains the pipe as it
    fills (a full pipe would block CUDA inside the synchronize) and ``take`` drains what is left
    after flushing C's stdio, so a reply carries everything printed before it; at most ``limit``
    bytes wait between two replies, and what is past that is counted and said, not kept."""

    def __init__(self, limit: int = 1 << 20) -> None:
        import ctypes
        import threading

        read_fd, write_fd = os.pipe()
        os.dup2(write_fd, 1)
        os.close(write_fd)
        os.set_blocking(read_fd, False)
        self._fd = read_fd
        self._libc = ctypes.CDLL(None)
        self._limit = limit
        self._lock = threading.Lock()
        self._chunks: list[bytes] = []
        self._size = self._dropped = 0
        threading.Thread(target=self._drain_forever, daemon=True).start()

    def _drain_forever(self) -> None:
        import select

        while True:
            select.select([self._fd], [], [])
            with self._lock:
                if not self._read_available():
                    return  # the write end is gone: the process is ending

    def _read_available(self) -> bool:
        """Read what the pipe holds now (lock held); False at end of file."""
        while True:
            try:
                data = os.read(self._fd, 65536)
            except BlockingIOError:
                return True
            if not data:
                return False
            room = self._limit - self._size
            self._chunks.append(data[:room])
            self._size += min(len(data), room)
            self._dropped += max(len(data) - room, 0)

    def take(self) -> str:
        """What kernels printed since the last call (C's stdio buffer flushed first)."""
        self._libc.fflush(None)
        with self._lock:
            self._read_available()
            if not self._size and not self._dropped:
                return ""
            text = b"".join(self._chunks).decode(errors="replace")
            if self._dropped:
                text += f"\n[harp: {self._dropped} more bytes of kernel output were dropped]\n"
            self._chunks, self._size, self._dropped = [], 0, 0
        return text


class _AgentPeer:
    """A short-lived DEALER to another agent's supervisor, for moving parked state."""

    def __init__(self, context: zmq.Context, endpoint: str, token: str | None, timeout: float,
                 max_frame: int, curve: ServerKeys | None) -> None:
        self.endpoint, self.token, self.timeout = endpoint, token, timeout
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
                                 f"parked state did not answer within {self.timeout:g} s")
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
        """(offset, bytes) of one parked chunk, fetched ``PIECE_BYTES`` at a time."""
        for offset in range(0, size, PIECE_BYTES):
            nbytes = min(PIECE_BYTES, size - offset)
            _, frames = self.request({"t": P.PARKED_CHUNK, "addr": addr, "offset": offset,
                                      "size": nbytes, **ask})
            piece = frames[0].buffer if frames else memoryview(b"")
            if piece.nbytes != nbytes:
                raise AgentError("StateLost", "a piece of the parked state came short")
            yield offset, piece

    def close(self) -> None:
        self.socket.close(0)


def _bind(socket: zmq.Socket, bind: str, ports: str | None) -> str:
    """Bind ``tcp://HOST`` on a free port (of ``ports`` "A-B" when given); the endpoint."""
    if ports:
        low, high = (int(x) for x in ports.split("-"))
        port = socket.bind_to_random_port(bind, min_port=low, max_port=high + 1, max_tries=200)
    else:
        port = socket.bind_to_random_port(bind)
    return f"{bind}:{port}"


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpu_agent.worker", description=(
        "One session's worker process; started by harp-agent, never by hand."))
    parser.add_argument("--worker-id", required=True)
    parser.add_argument("--supervisor-pid", type=int, required=True)
    parser.add_argument("--control", required=True, help="the supervisor's ipc endpoint")
    parser.add_argument("--status", required=True, help="the status page file")
    parser.add_argument("--bind", required=True, help="tcp://HOST to bind the data socket on")
    parser.add_argument("--ports", default=None, help="port range A-B for the data socket")
    parser.add_argument("--executor", required=True)
    parser.add_argument("--device", type=int, default=0)
    parser.add_argument("--memory-cap", type=int, required=True)
    parser.add_argument("--max-frame", type=int, required=True)
    parser.add_argument("--unread-replies", type=int, default=8)
    parser.add_argument("--pinned-staging", type=int, default=0)
    parser.add_argument("--fetch-timeout", type=float, default=30.0)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--data-writable", action="store_true")
    parser.add_argument("--data-reader", default="auto")
    parser.add_argument("--advertise-host", default=None)
    parser.add_argument("--curve-secret-key-file", default=None)
    parser.add_argument("--curve-client-keys-dir", default=None)
    parser.add_argument("--log-level", default="WARNING")
    return parser


def _die_with_supervisor(supervisor_pid: int) -> None:
    """A worker must not outlive its supervisor (it would hold a GPU nobody can manage): on
    Linux the kernel kills it when its parent goes; a parent already gone is seen here."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != supervisor_pid:
        os._exit(1)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    _die_with_supervisor(args.supervisor_pid)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format=f"%(asctime)s harp-worker {args.worker_id} %(levelname)s "
                               "%(message)s")
    worker = Worker(args)
    try:
        worker.serve()
    finally:
        worker.close()
    # a context made unusable by a sticky error must not be torn down politely: it can hang
    os._exit(0)


if __name__ == "__main__":
    main()
