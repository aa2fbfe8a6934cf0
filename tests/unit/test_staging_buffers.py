"""Reusable staging buffers (gpu_agent.staging_buffers) as the worker's page-locked staging
for device-to-host copies uses them, with host arrays standing in for page-locked ones: a
buffer is reused only once nothing refers to it, the pool never holds more than its limit
(harp-agent --pinned-staging), small copies are not staged."""

from __future__ import annotations

import gc
import time

import numpy as np
import zmq

from gpu_agent.staging_buffers import MIN_STAGED_BYTES, StagingBuffers

MiB = 1 << 20


def pool(limit: int) -> tuple[StagingBuffers, list[int]]:
    allocated: list[int] = []

    def allocate(nbytes: int) -> np.ndarray:
        allocated.append(nbytes)
        return np.zeros(nbytes, np.uint8)

    return StagingBuffers(limit, allocate), allocated


def test_a_buffer_is_reused_once_its_reply_is_gone_and_not_before() -> None:
    staging, allocated = pool(8 * MiB)
    first = staging.take(MiB)
    first[:] = 1
    second = staging.take(MiB)  # the first is still held: a second buffer
    assert allocated == [MiB, MiB]
    assert not np.shares_memory(first, second)
    first_buffer = id(first.base)
    del first
    gc.collect()
    third = staging.take(MiB - 100)  # the first's buffer is free again: no new allocation
    assert allocated == [MiB, MiB] and id(third.base) == first_buffer
    assert third.nbytes == MiB - 100


def test_the_pool_stays_within_its_limit_and_falls_back_to_pageable_arrays() -> None:
    staging, allocated = pool(2 * MiB)
    held = [staging.take(MiB) for _ in range(4)]
    assert allocated == [MiB, MiB] and staging.held_bytes == 2 * MiB
    assert all(a.nbytes == MiB and a.flags.writeable for a in held)
    assert held[2].base is None and held[3].base is None  # plain arrays past the limit
    off, none = pool(0)
    assert off.take(4 * MiB).nbytes == 4 * MiB and none == []


def test_small_copies_are_not_staged_unless_asked() -> None:
    staging, allocated = pool(8 * MiB)
    assert staging.take(MIN_STAGED_BYTES - 1).nbytes == MIN_STAGED_BYTES - 1
    assert allocated == []
    every = StagingBuffers(8 * MiB, lambda nbytes: np.zeros(nbytes, np.uint8), min_bytes=1)
    word = every.take(4)
    assert word.nbytes == 4 and word.base is not None and every.held_bytes == 4
    base = id(word.base)
    del word
    assert id(every.take(3).base) == base and every.held_bytes == 4  # reused, not a new one


def test_a_buffer_zeromq_still_holds_is_not_reused() -> None:
    """A zero-copy frame keeps its buffer alive until ZeroMQ is done with it (here: waiting,
    unread, in an inproc pipe), and the pool sees that reference."""
    staging, allocated = pool(8 * MiB)
    context = zmq.Context()
    pull, push = context.socket(zmq.PULL), context.socket(zmq.PUSH)
    try:
        pull.bind("inproc://staging")
        push.connect("inproc://staging")
        out = staging.take(MiB)
        out[:] = 7
        queued = id(out.base)
        push.send(out, copy=False)
        del out
        gc.collect()
        assert id(staging.take(MiB).base) != queued and len(allocated) == 2
        frame = pull.recv(copy=False)  # read: ZeroMQ lets go once the frame is dropped
        assert bytes(frame.buffer[:4]) == b"\x07" * 4
        del frame
        deadline = time.monotonic() + 10
        while True:
            gc.collect()
            again = staging.take(MiB)
            if id(again.base) == queued or time.monotonic() > deadline:
                break
            del again
            time.sleep(0.01)
        assert id(again.base) == queued and len(allocated) == 2
    finally:
        pull.close(0)
        push.close(0)
        context.term()
