"""BatchWriter over a real DEALER connection to a scripted ROUTER peer on 127.0.0.1.

The peer speaks the protocol from gpu_agent.protocol (decode batches, one reply per batch) and
records what it received, so these tests see exactly what went on the wire.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import zmq

from gpu_agent import protocol
from harp_jupyter.shim.batch import BatchWriter, byte_view
from harp_jupyter.shim.errors import GPULostError
from harp_jupyter.shim.transport import AgentConnection
from tests.agent_client import wait_for

pytestmark = pytest.mark.timeout(30)


class ScriptedPeer:
    """A ROUTER that records batches and replies in order (``ping`` -> 42), unless held."""

    def __init__(self) -> None:
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        port = self._socket.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.batches: list[tuple[dict[str, Any], list[bytes]]] = []
        self.replying = threading.Event()
        self.replying.set()
        self._stop = threading.Event()
        self._held: list[tuple[bytes, dict[str, Any]]] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            if self._socket.poll(20):
                routing_id, *parts = self._socket.recv_multipart()
                header, frames = protocol.decode(parts)
                if header["t"] == protocol.BATCH:
                    self.batches.append((header, [bytes(f) for f in frames]))
                    self._held.append((routing_id, header))
            if self.replying.is_set():
                for routing_id, header in self._held:
                    results = [[i, 42] for i, call in enumerate(header["c"]) if call[0] == "ping"]
                    reply = {"t": protocol.REPLY, "q": header["q"], "r": results, "e": None}
                    self._socket.send_multipart([routing_id, protocol.pack_header(reply)])
                self._held.clear()
        self._socket.close(linger=0)
        self._context.term()

    def wait_for_batches(self, count: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.batches) < count:
            assert time.monotonic() < deadline, f"got {len(self.batches)} batches, not {count}"
            time.sleep(0.005)

    def calls(self) -> list[list[Any]]:
        return [call for header, _ in self.batches for call in header["c"]]

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


@pytest.fixture
def peer() -> Iterator[ScriptedPeer]:
    p = ScriptedPeer()
    yield p
    p.stop()


errors: list[tuple[Any, dict[str, Any]]] = []


def make_writer(peer: ScriptedPeer, **options: Any) -> BatchWriter:
    connection = AgentConnection(peer.endpoint, timeout=5)
    return BatchWriter(connection, lambda meta, error: errors.append((meta, error)), **options)


def close(writer: BatchWriter) -> None:
    writer.close()
    writer.connection.close()


def test_small_buffers_are_snapshots_large_ones_frames(peer: ScriptedPeer) -> None:
    writer = make_writer(peer, linger=60)
    small = bytearray(b"abcd")
    large = np.arange(protocol.MAX_INLINE_BYTES, dtype=np.uint8)
    writer.add("htod", [1 << 40, small, None])
    small[:] = b"zzzz"  # a snapshot was taken: the change must not travel
    tracker = writer.add("htod", [2 << 40, large, None], track=True)
    assert tracker is not None
    writer.wait_sent([tracker])
    writer.drain()
    (header, frames), = peer.batches
    first, second = header["c"]
    assert first == ["htod", 1 << 40, b"abcd", None]
    assert second[:2] == ["htod", 2 << 40] and second[2] == protocol.FrameRef(1)
    assert frames == [large.tobytes()]
    close(writer)


def test_batch_goes_out_at_max_calls_without_a_flush(peer: ScriptedPeer) -> None:
    writer = make_writer(peer, linger=60, max_calls=10)
    for i in range(25):
        writer.add("free", [i], None)
    peer.wait_for_batches(2)
    assert [len(h["c"]) for h, _ in peer.batches] == [10, 10]
    writer.drain()
    assert [len(h["c"]) for h, _ in peer.batches] == [10, 10, 5]
    assert [c[1] for c in peer.calls()] == list(range(25))  # in order
    close(writer)


def test_batch_goes_out_past_the_byte_threshold(peer: ScriptedPeer) -> None:
    writer = make_writer(peer, linger=60, flush_bytes=200_000)
    block = np.zeros(100_000, np.uint8)
    writer.add("htod", [0, block, None])
    writer.add("htod", [0, block, None])
    writer.add("htod", [0, block, None])
    peer.wait_for_batches(1)
    assert len(peer.batches[0][0]["c"]) == 2
    close(writer)


def test_linger_sends_a_lone_call(peer: ScriptedPeer) -> None:
    writer = make_writer(peer, linger=0.001)
    writer.add("free", [7], None)
    peer.wait_for_batches(1)  # nobody flushed: the linger thread did
    assert peer.calls() == [["free", 7]]
    close(writer)


def test_a_sync_loop_wakes_the_linger_thread_once_not_per_batch(peer: ScriptedPeer) -> None:
    """A call queued then sent by a sync point, again and again: the linger thread, once
    awake, keeps its period instead of being woken (a thread wake-up and a turn at the GIL)
    for each batch's first call."""
    writer = make_writer(peer, linger=0.005)
    for i in range(200):
        writer.add("free", [i], None)
        assert writer.call_alone(["ping"], ("ping", None, None, None))
    assert writer._linger.wakeups == 1
    close(writer)


def test_the_linger_thread_sleeps_when_quiet_and_the_next_call_wakes_it(
        peer: ScriptedPeer) -> None:
    from harp_jupyter.shim.linger import QUIET_PERIODS

    writer = make_writer(peer, linger=0.001)
    writer.add("free", [1], None)
    peer.wait_for_batches(1)  # sent by the linger thread
    wait_for(lambda: not writer._linger._awake, 10 + QUIET_PERIODS * 0.001,
             "the linger thread to sleep after its quiet periods")
    writer.add("free", [2], None)
    peer.wait_for_batches(2)  # woken, not lost: nobody else sends it
    assert writer._linger.wakeups == 2
    close(writer)


def test_a_call_queued_past_the_linger_sends_the_batch_from_the_callers_thread(
        peer: ScriptedPeer) -> None:
    # the linger thread needs the GIL, which a busy notebook thread gives up only every 5 ms:
    # the caller itself sends a batch whose first call waited longer than the linger. The
    # thread's own wait here is 1000 s, so only the caller can have sent it.
    now = [100.0]
    writer = make_writer(peer, linger=1000.0, clock=lambda: now[0])
    writer.add("free", [1], None)
    writer.add_inline(["free", 2], None)
    assert writer.batches_sent == 0 and writer.queued_calls == 2  # within the linger
    now[0] += 1000.0
    writer.add_inline(["free", 3], None)
    assert writer.batches_sent == 1 and writer.queued_calls == 0
    writer.add("free", [4], None)  # a new batch: its own first call starts its linger
    now[0] += 999.0
    writer.add("free", [5], None)
    assert writer.batches_sent == 1
    now[0] += 1.0
    writer.add("free", [6], None)
    assert writer.batches_sent == 2
    peer.wait_for_batches(2)
    assert peer.calls() == [["free", i] for i in range(1, 7)]
    close(writer)


def test_results_are_delivered_in_order(peer: ScriptedPeer) -> None:
    writer = make_writer(peer, linger=60, max_calls=3)
    values: list[tuple[int, Any]] = []
    for i in range(7):
        writer.add("ping", [], None, on_result=lambda v, i=i: values.append((i, v)))
    writer.drain()
    assert values == [(i, 42) for i in range(7)]
    close(writer)


def test_back_pressure_bounds_unacknowledged_batches(peer: ScriptedPeer) -> None:
    peer.replying.clear()
    writer = make_writer(peer, linger=60, max_calls=1, max_inflight=3)
    sender = threading.Thread(target=lambda: [writer.add("free", [i]) for i in range(10)],
                              daemon=True)
    sender.start()
    peer.wait_for_batches(3)
    sender.join(0.5)
    assert sender.is_alive(), "the sender should block while 3 batches are unacknowledged"
    assert len(peer.batches) == 3
    peer.replying.set()
    sender.join(10)
    assert not sender.is_alive()
    writer.drain()
    assert [c[1] for c in peer.calls()] == list(range(10))
    assert writer.peak_inflight <= 3
    close(writer)


def test_peer_gone_raises_gpu_lost_instead_of_hanging(peer: ScriptedPeer) -> None:
    peer.replying.clear()
    writer = make_writer(peer, linger=60)
    writer.add("ping", [], None)
    writer.flush()
    peer.wait_for_batches(1)
    peer.stop()  # the agent's socket closes with a batch unanswered
    with pytest.raises(GPULostError, match=peer.endpoint):
        writer.drain()
    with pytest.raises(GPULostError):  # and every later use says so too
        writer.add("free", [1], None)
    close(writer)


def test_byte_view_of_fortran_and_noncontiguous_arrays() -> None:
    fortran = np.asfortranarray(np.arange(12, dtype=np.int32).reshape(3, 4))
    view = byte_view(fortran)
    assert view.nbytes == fortran.nbytes
    assert bytes(view) == fortran.tobytes(order="F")
    with pytest.raises(TypeError):
        byte_view(np.arange(10)[::2])


def test_an_inline_call_goes_out_as_add_sends_it_and_the_profiler_sees_it(
        peer: ScriptedPeer) -> None:
    from harp_jupyter.profiler import recorder

    writer = make_writer(peer, linger=60, max_calls=3)
    launch = [7, [2, 1, 1], [32, 1, 1], 0, None, b"\x01\x02\x03\x04"]
    site = ("notebook.py", 12, "<module>")
    rec = recorder.Recorder()
    recorder.active = rec
    try:
        writer.add("launch", launch, site)
        writer.add_inline(["launch", *launch], site)
        writer.add_inline(["launch", *launch], site)  # the third call fills the batch
    finally:
        recorder.active = None
    peer.wait_for_batches(1)
    assert peer.calls() == [["launch", *launch]] * 3
    # the recorder keeps the three calls from one line as one run of three
    assert [(c.op, c.site, c.count, c.bytes_up) for c in rec.calls] == [("launch", site, 3, 12)]
    writer.drain()
    close(writer)


def test_a_lone_sync_call_goes_as_a_batch_of_its_own(peer: ScriptedPeer) -> None:
    writer = make_writer(peer, linger=60)
    values: list[Any] = []
    assert writer.call_alone(["ping"], ("ping", None, values.append, None))
    assert values == [42] and writer.inflight == 0
    assert [h["c"] for h, _ in peer.batches] == [[["ping"]]]
    writer.add("free", [1], None)  # something queued: it goes with the sync call
    assert writer.call_alone(["ping"], ("ping", None, values.append, None))
    assert values == [42, 42] and writer.inflight == 0 and writer.queued_calls == 0
    assert [h["c"] for h, _ in peer.batches] == [[["ping"]], [["free", 1], ["ping"]]]
    writer.add("free", [2], None)
    writer.flush()  # in flight: the general way, nothing sent here
    assert not writer.call_alone(["ping"], ("ping", None, values.append, None))
    peer.wait_for_batches(3)
    writer.drain()
    assert len(peer.batches) == 3 and values == [42, 42]
    close(writer)


def test_a_lone_sync_call_stays_unanswered_until_its_reply_for_a_restore(
        peer: ScriptedPeer) -> None:
    """The link drops between the send and the reply (the agent parked the session): the
    batch is still the writer's to hand over, once, for the restore to send again."""
    peer.replying.clear()
    writer = make_writer(peer, linger=60)
    failures: list[BaseException] = []

    def sync() -> None:
        try:
            writer.call_alone(["ping"], ("ping", None, None, None))
        except BaseException as e:
            failures.append(e)

    caller = threading.Thread(target=sync, daemon=True)
    caller.start()
    peer.wait_for_batches(1)
    peer.stop()
    caller.join(10)
    assert not caller.is_alive() and len(failures) == 1
    assert isinstance(failures[0], GPULostError)
    unanswered = writer.take_unanswered()
    assert [b.calls for b in unanswered.batches] == [[["ping"]]]
    assert unanswered.queued.calls == []
    close(writer)
