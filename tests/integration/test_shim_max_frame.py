"""The agent's --max-frame as the shim sees it: copies fit it, anything else too large for it is
the user's clear error at the user's line, and the session goes on."""

from __future__ import annotations

import sys
import traceback
from typing import Any

import numpy as np
import pytest

from tests.conftest import shim_driver

pytestmark = pytest.mark.timeout(60)

MiB = 1 << 20


def test_copies_fit_the_agents_frame_bound_and_a_larger_buffer_is_a_clear_error(
        agent_starter: Any) -> None:
    agent = agent_starter("--max-frame", "1MiB")
    with shim_driver(agent.endpoint) as cuda:
        nbytes = 3 * MiB  # larger than a frame: an async copy goes in chunks that fit
        data = cuda.pagelocked_empty(nbytes, np.uint8)
        data[:] = np.random.default_rng(5).integers(0, 256, nbytes, dtype=np.uint8)
        back = cuda.pagelocked_zeros(nbytes, np.uint8)
        dev = cuda.mem_alloc(nbytes)
        stream = cuda.Stream()
        cuda.memcpy_htod_async(dev, data, stream)
        cuda.memcpy_dtoh_async(back, dev, stream)
        stream.synchronize()
        assert np.array_equal(back, data)

        image = b"\0" * (2 * MiB)  # a module image cannot be cut
        line = sys._getframe().f_lineno + 2
        with pytest.raises(cuda.LogicError) as caught:
            cuda.module_from_buffer(image)
        message = str(caught.value)
        assert "2.0 MiB" in message and "1.0 MiB" in message and "--max-frame" in message, message
        frames = traceback.extract_tb(caught.value.__traceback__)
        assert frames[-1].lineno == line and frames[-1].filename == __file__, frames
        assert not any("harp_jupyter" in f.filename for f in frames), frames

        cuda.memcpy_dtoh(back, dev)  # the session goes on
        assert np.array_equal(back, data)


@pytest.mark.parametrize("nbytes", [600 << 10, 3 * MiB])
def test_synchronous_copies_go_in_pieces_that_fit_a_small_frame_bound(
        agent_starter: Any, nbytes: int) -> None:
    """An agent that takes frames of at most 256 KiB: a copy below the pipelining size and one
    above it both go in pieces within the bound, both ways, every byte in its place."""
    agent = agent_starter("--max-frame", "256KiB")
    with shim_driver(agent.endpoint) as cuda:
        data = np.random.default_rng(nbytes).integers(0, 256, nbytes, dtype=np.uint8)
        dev = cuda.mem_alloc(nbytes)
        cuda.memcpy_htod(dev, data)
        back = np.zeros_like(data)
        cuda.memcpy_dtoh(back, dev)
        assert np.array_equal(back, data)
