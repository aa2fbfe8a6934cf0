"""How a real agent's replies carry the bytes a call produced: inline when small, a frame else."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from gpu_agent import protocol as P
from gpu_agent.batches import INLINE_RESULT_BYTES
from tests.agent_client import RawClient

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("alone", [True, False])
def test_small_reads_come_inline_and_larger_ones_as_frames(module_emulated_agent: Any,
                                                           alone: bool) -> None:
    """A read under ``INLINE_RESULT_BYTES`` (a scalar's) is the reply's own bytes, with no
    frame to send or receive; from that size on it is a frame the reply names. The same for a
    batch of one call (a sync point's short path) and of several."""
    client = RawClient(module_emulated_agent.endpoint)
    try:
        base = client.hello()["range"][0]
        data = np.random.default_rng(5).integers(0, 256, INLINE_RESULT_BYTES, np.uint8)
        reply, _ = client.batch(["alloc", base, P.GRANULARITY],
                                ["htod", base, P.FrameRef(1), None], frames=(data.tobytes(),))
        assert reply["e"] is None, reply
        extra = [] if alone else [["synchronize"]]
        for nbytes in (4, INLINE_RESULT_BYTES - 1, INLINE_RESULT_BYTES):
            reply, frames = client.batch(["dtoh", base, nbytes, None], *extra)
            assert reply["e"] is None, reply
            value = dict(reply["r"])[0]
            if nbytes < INLINE_RESULT_BYTES:
                assert type(value) is bytes and frames == []
                assert value == data[:nbytes].tobytes()
            else:
                assert value == P.FrameRef(1) and len(frames) == 1
                assert bytes(frames[0]) == data.tobytes()
    finally:
        client.close()
