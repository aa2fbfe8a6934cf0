"""The seeded traces the elasticity replay plays, and the statistics it reports.

A session's trace is what one notebook does: think (read, type, plot: no GPU work), then one
burst of GPU work (a cell), and again. Think times are heavy-tailed (lognormal, sigma 1.2, so a
few pauses are ten times the mean), bursts are lognormal around ``burst_s`` and rounded to one of
a few size classes, so that every burst of the replay is a burst whose time alone on a dedicated
GPU was measured in the same run (the calibration measures each class alone). The mean think time
is set so that the GPU duty is ``burst / (burst + think) = duty``. Device memory per session is
log-uniform between ``memory_min`` and ``memory_max`` (MiB to GiB on a GPU, scaled down under
emulation). Everything comes from one ``random.Random(seed)``, the same for every policy.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field
from typing import Any

MiB = 1 << 20
GiB = 1 << 30

#: the spread of think times (lognormal sigma): heavy-tailed, as people pause
THINK_SIGMA = 1.2
#: the spread of burst durations (lognormal sigma) before they are rounded to a class
BURST_SIGMA = 0.6
#: burst size classes, as multiples of the mean burst (log-spaced)
CLASS_FACTORS = (0.3, 0.5, 0.8, 1.25, 2.0, 3.2)


@dataclass(frozen=True)
class TraceConfig:
    sessions: int
    duty: float
    duration_s: float
    burst_s: float
    memory_min: int
    memory_max: int
    seed: int

    @property
    def think_mean_s(self) -> float:
        return self.burst_s * (1 - self.duty) / self.duty


@dataclass
class Step:
    """Think ``think_s``, then run a burst of class ``size_class``; ``bump`` is what the burst
    adds to every element of the session's data (its checksum follows)."""

    think_s: float
    size_class: int
    bump: int


@dataclass
class SessionTrace:
    index: int
    memory_bytes: int
    data_seed: int
    #: when the session's first think starts, after the replay's start (staggered)
    offset_s: float
    steps: list[Step] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def burst_classes(burst_s: float) -> list[float]:
    """The target duration (s) of each size class."""
    return [burst_s * f for f in CLASS_FACTORS]


def _nearest_class(seconds: float, classes: list[float]) -> int:
    return min(range(len(classes)), key=lambda i: abs(math.log(classes[i] / seconds)))


def _lognormal(rng: random.Random, mean: float, sigma: float) -> float:
    return rng.lognormvariate(math.log(mean) - sigma * sigma / 2, sigma)


def make_traces(config: TraceConfig) -> list[SessionTrace]:
    """One trace per session, long enough for ``duration_s`` even if nothing waits."""
    rng = random.Random(config.seed)
    classes = burst_classes(config.burst_s)
    traces = []
    log_min, log_max = math.log(config.memory_min), math.log(config.memory_max)
    for index in range(config.sessions):
        memory = int(math.exp(rng.uniform(log_min, log_max))) // 8 * 8
        trace = SessionTrace(index, max(memory, 4096), rng.randrange(1 << 31),
                             rng.uniform(0, config.think_mean_s))
        elapsed = trace.offset_s
        while elapsed < config.duration_s:
            think = _lognormal(rng, config.think_mean_s, THINK_SIGMA)
            size = _nearest_class(_lognormal(rng, config.burst_s, BURST_SIGMA), classes)
            trace.steps.append(Step(think, size, rng.randint(1, 7)))
            elapsed += think + classes[size]
        traces.append(trace)
    return traces


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100) by linear interpolation; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)
