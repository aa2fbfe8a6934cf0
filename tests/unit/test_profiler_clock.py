"""The clock offset from round-trip bounds, and the interval arithmetic of the summary."""

from __future__ import annotations

from harp_jupyter.profiler.advisor import _overlap, _union
from harp_jupyter.profiler.clock import estimate


def trip(sent: int, offset: int, out: int, work: int, back: int) -> tuple[int, int, int, int]:
    """A round trip: ``out`` ns to the agent, ``work`` there, ``back`` ns home."""
    received_there = sent + out + offset
    return sent, received_there, received_there + work, sent + out + work + back


def test_the_offset_is_bounded_by_every_round_trip() -> None:
    offset = 5_000_000_000
    found = estimate([trip(0, offset, 400, 50, 300), trip(10_000, offset, 90, 10, 120),
                      trip(20_000, offset, 1000, 5, 80)])
    assert found is not None and found.samples == 3
    # the tightest bounds: [offset - 80, offset + 90]
    assert abs(found.offset_ns - offset) <= found.error_ns <= 85


def test_asymmetric_links_stay_inside_the_error_bound() -> None:
    found = estimate([trip(0, -7, 900, 0, 100)])
    assert found is not None and abs(found.offset_ns - -7) <= found.error_ns == 500


def test_no_samples_no_offset() -> None:
    assert estimate([]) is None


def test_crossing_bounds_fall_back_to_the_fastest_trip() -> None:
    # the agent's clock stepped between two trips: intervals that do not intersect
    found = estimate([trip(0, 0, 100, 0, 100), trip(1000, 10_000, 50, 0, 50)])
    assert found is not None and found.offset_ns == 10_000 and found.error_ns == 50


def test_union_and_overlap_of_spans() -> None:
    assert _union([(0, 10), (5, 15), (20, 30)]) == 25
    assert _overlap([(0, 10), (20, 30)], [(5, 25), (28, 40)]) == 5 + 5 + 2
    assert _overlap([], [(0, 1)]) == 0
