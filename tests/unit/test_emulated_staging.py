"""The emulated executor's device-to-host copies reuse host buffers as the pycuda executor's
page-locked staging does: a buffer is taken again only once nothing refers to the result it
carried (the reply that held it was sent), so a result never changes under its reader."""

from __future__ import annotations

import gc

import numpy as np

from gpu_agent import protocol as P
from gpu_agent.executors.emulated import EmulatedExecutor

SIZE = 256 << 10


def session() -> tuple[EmulatedExecutor, object]:
    executor = EmulatedExecutor(64 << 20, staging=8 << 20)
    device = executor.open_session(P.ADDRESS_SPACE_BASE, P.SESSION_RANGE_SIZE)
    device.op_alloc(P.ADDRESS_SPACE_BASE, P.GRANULARITY)
    return executor, device


def fill(device: object, value: int) -> None:
    device.op_htod(P.ADDRESS_SPACE_BASE, np.full(SIZE, value, np.uint8).tobytes(), None)


def test_a_held_result_keeps_its_bytes_and_a_released_buffer_is_reused() -> None:
    executor, device = session()
    fill(device, 1)
    first = device.op_dtoh(P.ADDRESS_SPACE_BASE, SIZE, None)
    fill(device, 2)
    second = device.op_dtoh(P.ADDRESS_SPACE_BASE, SIZE, None)
    assert (np.asarray(first) == 1).all() and (np.asarray(second) == 2).all()
    assert not np.shares_memory(first, second)
    buffer_of_first = id(first.base)  # not a reference: that would keep the buffer taken
    del first
    gc.collect()
    third = device.op_dtoh(P.ADDRESS_SPACE_BASE, SIZE, None)
    assert id(third.base) == buffer_of_first and (np.asarray(third) == 2).all()
    assert executor.staging.held_bytes == 2 * SIZE


def test_without_staging_room_each_result_is_a_fresh_buffer() -> None:
    executor = EmulatedExecutor(64 << 20)
    device = executor.open_session(P.ADDRESS_SPACE_BASE, P.SESSION_RANGE_SIZE)
    device.op_alloc(P.ADDRESS_SPACE_BASE, P.GRANULARITY)
    device.op_dtoh(P.ADDRESS_SPACE_BASE, SIZE, None)
    assert executor.staging.held_bytes == 0
