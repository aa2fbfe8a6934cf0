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
from pathlib import Path
from typing import Any

import zmq

from gpu_agent import compile_cache, multipart
from gpu_agent import protocol as P
from gpu_agent import worker_link as W
from gpu_agent.batches import BatchRunner
from gpu_agent.curve import ServerKeys, serve_encrypted
from gpu_agent.datastore import DataStore
from gpu_agent.errors import AgentError
from gpu_agent.executors import make_executor
from gpu_agent.executors.base import Executor
from gpu_agent.parked_io import ParkedStateIO
from gpu_agent.sizes import format_bytes
from gpu_agent.worker_bridge import CONTROL, DROPPED, ORPHANED, ControlBridge

log = logging.getLogger("harp.agent.worker")

#: how long a reply the client leaves unread waits before the worker looks whether the
#: supervisor wants it (back-pressure in ``_send``)
_SEND_SLICE_MS = 10


class Worker:
    """The worker process's loop; see the module docstring."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.context = zmq.Context()
        control = self.context.socket(zmq.DEALER)
        control.setsockopt(zmq.IDENTITY, args.worker_id.encode())
        control.setsockopt(zmq.LINGER, 2000)
        control.connect(args.control)
        self.data = self.context.socket(zmq.ROUTER)
        self.data.setsockopt(zmq.LINGER, 0)
        self.data.setsockopt(zmq.MAXMSGSIZE, args.max_frame + (1 << 20))
        self.data.setsockopt(zmq.SNDHWM, args.unread_replies)
        self.data.setsockopt(zmq.RCVHWM, args.unread_replies)
        self.data.setsockopt(zmq.ROUTER_MANDATORY, 1)
        curve = ServerKeys.load(args.curve_secret_key_file, args.curve_client_keys_dir) \
            if args.curve_secret_key_file else None
        self.authenticator = serve_encrypted(self.context, [self.data], curve) \
            if curve is not None else None
        self.parked_io = ParkedStateIO(self.context, curve, fetch_timeout=args.fetch_timeout,
                                       max_frame=args.max_frame)
        self.endpoint = _bind(self.data, args.bind, args.ports)
        if args.advertise_host:
            self.endpoint = f"tcp://{args.advertise_host}:{self.endpoint.rsplit(':', 1)[1]}"
        self.attachment = ClientAttachment()
        # the supervisor, the client's connection and the supervisor's life reach the loop on
        # the data socket (worker_bridge): the loop has one blocking receive
        self.bridge = ControlBridge(self.context, self.data, control,
                                    self.data.get_monitor_socket(zmq.EVENT_DISCONNECTED),
                                    args.supervisor_pid)
        self.status = W.StatusPage(args.status)
        self.kernel_output = KernelOutput()
        self.executor: Executor = make_executor(args.executor, args.device,
                                                emulated_memory=args.memory_cap,
                                                pinned_staging=args.pinned_staging,
                                                nvcc=args.nvcc)
        if args.data_root:
            self.executor.data_store = DataStore(args.data_root, writable=args.data_writable)
            self.executor.data_reader_choice = args.data_reader
        self.runner: BatchRunner | None = None
        self.session_id: str | None = None
        self.client: bytes | None = None
        self.running = True

    # {{{ loop

    def serve(self) -> None:
        self.bridge.start()
        free, total = self.executor.mem_info()
        self._tell(W.READY, pid=os.getpid(), endpoint=self.endpoint,
                   device=self.executor.device_info(), memory=[free, total],
                   data=self.executor.data_status())
        data, bridge, receive = self.data, self.bridge, multipart.receive
        busy_poll_ns = self.args.busy_poll_us * 1000
        while self.running:
            parts = receive(data, busy_poll_ns)
            route = parts[0].bytes
            if bridge.is_bridge(route):
                self._on_bridge(parts[1:])
            else:
                self._on_data(route, parts)

    def _on_bridge(self, parts: list[Any]) -> None:
        tag = parts[0].bytes
        if tag == CONTROL:
            self.bridge.handled()
            self._on_control(*P.decode(parts[1:]))
        elif tag == DROPPED:
            if self.attachment.dropped(int(parts[1].bytes)):
                self._tell(W.GONE, session=self.session_id)
        elif tag == ORPHANED:
            self.bridge.handled()
            log.warning("the supervisor is gone: this worker ends")
            self.running = False

    def _on_data(self, route: bytes, parts: list[Any]) -> None:
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
        elif kind == P.STATUS:
            # the shim's liveness probe after a quiet spell (a long compile or kernel): it was
            # read only once the batch before it ended, which is the answer it needs
            self._send(route, {"t": P.STATUS})
        else:
            self._send(route, {"t": P.ERROR, "e": P.error(
                "ProtocolError",
                f"a worker takes attach, batch and status messages, not {kind!r}")})

    def _on_attach(self, route: bytes, header: dict[str, Any], frame: zmq.Frame) -> None:
        if (self.runner is None or header.get("session") != self.session_id
                or not self.attachment.admits(header.get("attach"))):
            self._send(route, {"t": P.ERROR, "e": P.error(
                "AuthError", "this worker serves another session (wrong attach token)")})
            return
        back = self.client is not None and self.client != route
        self.client = route
        self.attachment.attached(frame.get(zmq.SRCFD))
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
        device_bytes, object_bytes = runner.usage()
        self.status.batch_ended(time.monotonic_ns(), runner.batches, runner.calls,
                                device_bytes, object_bytes, compile_cache.SESSION.parked_bytes)
        printed = self.kernel_output.take()
        if printed:
            reply["out"] = printed
        self._send(route, reply, out)
        if runner.lost is not None:
            self._tell(W.FATAL, session=self.session_id, e=P.error(
                "ContextLost", f"a fatal GPU error in it ({runner.lost_cause})"))
            self.running = False

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
                                      max_frame=self.args.max_frame,
                                      max_objects=self.args.session_objects,
                                      pending_gpu_timings=self.args.pending_gpu_timings)
            restored = 0
            if header.get("restore"):
                restored = self.parked_io.restore_from_files(self.runner, header["restore"])
            elif header.get("fetch"):
                restored = self.parked_io.restore_from_agent(self.runner, header["fetch"],
                                                             int(header["base"]))
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
        self.session_id = session
        self.attachment.expect(str(header["attach"]))
        self.status.batch_ended(time.monotonic_ns(), 0, 0, self.runner.device_bytes,
                                self.runner.device.object_bytes(),
                                compile_cache.SESSION.parked_bytes)
        self._tell(W.OPENED, session=session, restored_bytes=restored)

    def _park(self, header: dict[str, Any]) -> None:
        runner = self.runner
        if runner is None:
            self._tell(W.PARK_FAILED, e=P.error("SessionError", "no session to park"))
            self.running = False
            return
        self.client = None  # nothing more runs: the supervisor told the client
        try:
            chunks = self.parked_io.write(runner, str(self.session_id),
                                          Path(header["memory_dir"]),
                                          int(header["memory_room"]), Path(header["disk_dir"]))
        except (OSError, AgentError) as e:
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
        self.bridge.tell(P.pack_header({"t": kind, **fields}))

    def _send(self, route: bytes, header: dict[str, Any], frames: list[Any] = ()) -> None:
        message = [route, P.pack_header(header), *frames]
        while True:
            try:
                multipart.send(self.data, message, multipart.NOBLOCK)
                return
            except zmq.Again:
                # the client leaves replies unread: wait for it (back-pressure), never pile up
                if not self.data.poll(_SEND_SLICE_MS, zmq.POLLOUT):
                    if self.bridge.supervisor_waiting():
                        return  # the supervisor wants us (park, end): the client is too slow
            except zmq.ZMQError as e:  # the client is gone (EHOSTUNREACH)
                log.info("could not answer %s: %s", route.hex(), e)
                return

    def close(self) -> None:
        self.status.close()
        self.bridge.stop()  # after the last tell; it closes the control socket, lingering
        if self.authenticator is not None:
            self.authenticator.stop()
        self.data.close()
        self.context.term()


class ClientAttachment:
    """Who may attach to this worker's session (the attach token the supervisor gave its
    client) and whether that client's connection is still there (the data socket's monitor,
    read by the bridge)."""

    def __init__(self) -> None:
        self.token: str | None = None
        self.fd: int | None = None

    def expect(self, token: str) -> None:
        self.token = token

    def admits(self, token: Any) -> bool:
        return (self.token is not None and isinstance(token, str)
                and secrets.compare_digest(token, self.token))

    def attached(self, fd: int | None) -> None:
        self.fd = fd

    def dropped(self, fd: int) -> bool:
        """Whether the connection on ``fd`` that dropped was the attached client's."""
        if fd != self.fd:
            return False
        self.fd = None
        return True


class KernelOutput:
    """This worker's fd 1 goes into a pipe, so what kernels ``printf`` (CUDA writes it to
    stdout at a synchronize) can travel with the next reply. A thread drains the pipe as it
    fills (a full pipe would block CUDA inside the synchronize) and ``take`` drains what is left
    after flushing C's stdio, so a reply carries everything printed before it; at most ``limit``
    bytes wait between two replies, and what is past that is counted and said, not kept."""

    def __init__(self, limit: int = 1 << 20) -> None:
        import ctypes
        import select
        import threading

        read_fd, write_fd = os.pipe()
        os.dup2(write_fd, 1)
        os.close(write_fd)
        os.set_blocking(read_fd, False)
        self._fd = read_fd
        # every reply asks whether the pipe holds anything: a poll answers without the
        # exception an empty non-blocking read raises (a third of a small batch's cost)
        self._readable = select.poll()
        self._readable.register(read_fd, select.POLLIN)
        self._libc = ctypes.CDLL(None)
        # C's stdout (where CUDA writes kernels' printf) made unbuffered, so a reply need not
        # flush it: a call into C less per batch; where that fails, take() flushes
        try:
            stdout = ctypes.c_void_p.in_dll(self._libc, "stdout")
            self._flush = self._libc.setvbuf(stdout, None, _IONBF, 0) != 0
        except (ValueError, AttributeError):
            self._flush = True
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
        """What kernels printed since the last call (C's stdio buffer flushed first, where it
        is buffered)."""
        if self._flush:
            self._libc.fflush(None)
        with self._lock:
            if self._readable.poll(0):
                self._read_available()
            if not self._size and not self._dropped:
                return ""
            text = b"".join(self._chunks).decode(errors="replace")
            if self._dropped:
                text += (f"\n[harp: {format_bytes(self._dropped)} more of kernel output were "
                         "dropped]\n")
            self._chunks, self._size, self._dropped = [], 0, 0
        return text


#: setvbuf's mode for an unbuffered stream (glibc, musl)
_IONBF = 2


def _bind(socket: zmq.Socket, bind: str, ports: str | None) -> str:
    """Bind ``tcp://HOST`` on a free port (of ``ports`` "A-B" when given); the endpoint."""
    if ports:
        low, high = (int(x) for x in ports.split("-"))
        port = socket.bind_to_random_port(bind, min_port=low, max_port=high + 1, max_tries=200)
    else:
        port = socket.bind_to_random_port(bind)
    return f"{bind}:{port}"


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
    parser.add_argument("--busy-poll-us", type=int, default=0)
    parser.add_argument("--session-objects", type=int, default=4096)
    parser.add_argument("--pending-gpu-timings", type=int, default=100_000)
    parser.add_argument("--nvcc", default="", help="NvccPolicy.to_arg() (gpu_agent.nvcc_limits)")
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
