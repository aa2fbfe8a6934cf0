"""How the shim cuts a host<->device copy into pieces (``host_copies.copy_pieces``)."""

from __future__ import annotations

import itertools

import pytest

from harp_jupyter.shim.host_copies import (
    ASYNC_CHUNK_BYTES,
    PIECE_MAX_BYTES,
    PIECE_MIN_BYTES,
    PIPELINE_MIN_BYTES,
    PIPELINE_PIECES,
    async_chunks,
    copy_pieces,
)


@pytest.mark.parametrize("nbytes", [1, 4096, PIPELINE_MIN_BYTES - 1, PIPELINE_MIN_BYTES,
                                    PIPELINE_MIN_BYTES + 1, (1 << 20) + 3, 3 << 20,
                                    (16 << 20) - 1, 256 << 20])
def test_pieces_cover_the_copy_once_in_order(nbytes: int) -> None:
    pieces = copy_pieces(nbytes)
    assert pieces[0][0] == 0
    for (offset, size), (following, _) in itertools.pairwise(pieces):
        assert following == offset + size
    assert sum(size for _, size in pieces) == nbytes
    assert all(0 < size <= PIECE_MAX_BYTES for _, size in pieces)
    if len(pieces) > 1:
        assert all(size >= PIECE_MIN_BYTES for _, size in pieces[:-1])


def test_small_copies_are_one_piece_and_large_ones_at_least_the_pipeline() -> None:
    assert copy_pieces(0) == []
    assert copy_pieces(PIPELINE_MIN_BYTES - 1) == [(0, PIPELINE_MIN_BYTES - 1)]
    assert len(copy_pieces(PIPELINE_MIN_BYTES)) == PIPELINE_MIN_BYTES // PIECE_MIN_BYTES
    assert len(copy_pieces(PIPELINE_PIECES * PIECE_MAX_BYTES)) == PIPELINE_PIECES
    assert len(copy_pieces(64 << 20)) == (64 << 20) // PIECE_MAX_BYTES


def test_every_piece_but_the_last_starts_and_ends_on_a_page() -> None:
    for nbytes in (PIPELINE_MIN_BYTES + 12345, (3 << 20) + 7):
        pieces = copy_pieces(nbytes)
        assert all(offset % 4096 == 0 for offset, _ in pieces)
        assert all(size % 4096 == 0 for _, size in pieces[:-1])


@pytest.mark.parametrize("max_frame", [4096, 100_000, PIECE_MIN_BYTES, 3 << 20])
@pytest.mark.parametrize("nbytes", [1, 5000, PIPELINE_MIN_BYTES - 1, 3 << 20, (40 << 20) + 9])
def test_no_piece_or_chunk_is_larger_than_the_agents_frame_bound(nbytes: int,
                                                                 max_frame: int) -> None:
    for cut in (copy_pieces(nbytes, max_frame), async_chunks(nbytes, max_frame)):
        assert sum(size for _, size in cut) == nbytes
        assert all(0 < size <= max_frame for _, size in cut)
        for (offset, size), (following, _) in itertools.pairwise(cut):
            assert following == offset + size


def test_async_copies_go_in_chunks_not_pieces() -> None:
    assert async_chunks(3 << 20, 1 << 40) == [(0, 3 << 20)]
    assert len(async_chunks(ASYNC_CHUNK_BYTES + 1, 1 << 40)) == 2
    assert async_chunks(0, 1 << 40) == []


def test_the_pieces_of_a_copy_up_to_two_mib_go_as_copied_frames() -> None:
    """Each such piece is sent as ZeroMQ's own copy, not zero-copy: a zero-copy frame is freed
    by pyzmq's collector thread, a wake-up per piece (bench/op_costs.py)."""
    from gpu_agent import multipart

    for nbytes in (PIPELINE_MIN_BYTES, 2 << 20):
        assert all(size < multipart.COPY_BELOW_BYTES for _, size in copy_pieces(nbytes))
