"""gpu_agent.multipart over real ZeroMQ sockets: a message arrives whole and in order, whatever
its parts are (small bytes, large buffers, frames), and a send that cannot go now says so."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import zmq

from gpu_agent import multipart


@pytest.fixture
def pair() -> Iterator[tuple[zmq.Socket, zmq.Socket]]:
    context = zmq.Context()
    a, b = context.socket(zmq.PAIR), context.socket(zmq.PAIR)
    a.bind("inproc://multipart-test")
    b.connect("inproc://multipart-test")
    for socket in (a, b):
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.RCVTIMEO, 10_000)
    yield a, b
    a.close()
    b.close()
    context.term()


def test_a_message_of_mixed_parts_arrives_whole(pair: tuple[zmq.Socket, zmq.Socket]) -> None:
    a, b = pair
    large = np.arange(1 << 18, dtype=np.uint32)  # 1 MiB: sent zero-copy
    parts = [b"header", memoryview(b"small view"), large, zmq.Frame(b"frame"), b""]
    multipart.send(a, parts)
    multipart.send(a, [b"next"])
    got = multipart.receive(b)
    assert [bytes(f.buffer) for f in got] == [b"header", b"small view", large.tobytes(),
                                             b"frame", b""]
    assert [f.bytes for f in multipart.receive(b)] == [b"next"]


def test_frames_under_the_copy_bound_are_copied_and_larger_ones_are_not(
        pair: tuple[zmq.Socket, zmq.Socket]) -> None:
    """A buffer under ``COPY_BELOW_BYTES`` goes as ZeroMQ's own copy (no garbage-collector
    thread to release it); a larger one is handed over zero-copy. Over inproc a zero-copy frame
    is the sender's memory itself, so a change after the send shows in what arrives."""
    a, b = pair
    small = np.zeros(multipart.COPY_BELOW_BYTES - 1, np.uint8)
    large = np.zeros(multipart.COPY_BELOW_BYTES, np.uint8)
    multipart.send(a, [b"h", small, large])
    small[:] = 1
    large[:] = 1
    _head, got_small, got_large = multipart.receive(b)
    assert not np.frombuffer(got_small.buffer, np.uint8).any()  # copied at the send
    assert np.frombuffer(got_large.buffer, np.uint8).all()  # the sender's own buffer


def test_a_send_past_the_high_water_mark_raises_again_with_noblock() -> None:
    context = zmq.Context()
    sender = context.socket(zmq.DEALER)
    sender.setsockopt(zmq.LINGER, 0)
    sender.setsockopt(zmq.SNDHWM, 1)
    sender.connect("tcp://127.0.0.1:9")  # never connected: nothing leaves the queue
    try:
        with pytest.raises(zmq.Again):
            for _ in range(10):
                multipart.send(sender, [b"a", b"b"], multipart.NOBLOCK)
    finally:
        sender.close()
        context.term()


def test_a_receive_past_its_time_limit_raises_again(pair: tuple[zmq.Socket, zmq.Socket]
                                                    ) -> None:
    _a, b = pair
    b.setsockopt(zmq.RCVTIMEO, 0)
    with pytest.raises(zmq.Again):
        multipart.receive(b)
