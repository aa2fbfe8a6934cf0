"""The offset between an agent's clock and the notebook's, from the profiled round trips.

For a batch sent at notebook time ``s`` and answered at ``r``, which the agent received at its
time ``a`` and finished at ``b``, the offset (agent minus notebook) lies in ``[b - r, a - s]``
(neither message travels back in time). Every batch narrows the interval; the estimate is its
middle, and its half-width is the error bound.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class ClockOffset:
    offset_ns: int
    error_ns: int
    samples: int

    def to_notebook(self, agent_ns: int) -> int:
        return agent_ns - self.offset_ns


def estimate(samples: Iterable[tuple[int, int, int, int]]) -> ClockOffset | None:
    """``samples``: (sent, agent received, agent ended, received) per round trip."""
    low, high, count = None, None, 0
    best_rtt, best_mid = None, 0
    for sent, agent_received, agent_ended, received in samples:
        count += 1
        lo, hi = agent_ended - received, agent_received - sent
        low = lo if low is None else max(low, lo)
        high = hi if high is None else min(high, hi)
        rtt = (received - sent) - (agent_ended - agent_received)
        if best_rtt is None or rtt < best_rtt:
            best_rtt, best_mid = rtt, (lo + hi) // 2
    if low is None or high is None:
        return None
    if low <= high:
        return ClockOffset((low + high) // 2, (high - low) // 2, count)
    # bounds that cross mean a clock stepped meanwhile: trust the fastest round trip
    return ClockOffset(best_mid, max(0, (best_rtt or 0) // 2), count)
