"""The notebook side of HARP on jupyter_server's own ``/metrics`` (prometheus_client's default
registry, which jupyter_server serves; ``ServerApp.authenticate_prometheus`` guards it).

Read at scrape time from the Elastic GPU kernels of this server process (their keepers' lease
states, no I/O), plus a histogram of lease waits fed by the lease changes. Labels are bounded: a
kernel's lease state is one of ``KeeperState``'s few values, and no metric has a per-kernel or
per-agent label.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import REGISTRY, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from provisioner import changes
from provisioner.elastic import live_provisioners
from provisioner.lease_record import KeeperState

#: the states a kernel's lease is counted in (its keeper's states, no others)
STATES = tuple(str(state) for state in KeeperState)
#: kernels whose acquire is being timed at once; past it the oldest is forgotten (a bound for a
#: server whose kernels vanish mid-acquire)
MAX_TIMED = 4096

LEASE_WAIT = Histogram(
    "harp_notebook_lease_wait_seconds",
    "from a kernel's GPU request to its held lease (queueing and moving included)",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800))


class NotebookMetrics(Collector):
    """Kernels by lease state, their parked bytes and GPU-seconds, read when scraped."""

    def __init__(self, states: Callable[[], list[dict[str, Any]]]) -> None:
        self._states = states

    def collect(self) -> Iterator[GaugeMetricFamily]:
        states = self._states()
        kernels = GaugeMetricFamily("harp_notebook_kernels",
                                    "Elastic GPU kernels of this server by lease state",
                                    labels=["state"])
        counts = dict.fromkeys(STATES, 0)
        for state in states:
            name = str(state.get("state"))
            if name in counts:
                counts[name] += 1
        for name, count in counts.items():
            kernels.add_metric([name], count)
        yield kernels
        yield GaugeMetricFamily(
            "harp_notebook_parked_bytes", "device memory of this server's kernels parked on "
            "agents (as each kernel's keeper last heard)",
            value=sum(int(s.get("parked_bytes") or 0) for s in states))
        yield GaugeMetricFamily(
            "harp_notebook_queued_kernels", "kernels of this server waiting in an agent's queue",
            value=counts[str(KeeperState.QUEUED)])
        yield GaugeMetricFamily(
            "harp_notebook_gpu_seconds_held", "GPU-seconds held by this server's live kernels",
            value=sum(float(s.get("gpu_seconds") or 0) for s in states))


class LeaseWaits:
    """Times each kernel's acquire (to ``held``) from the lease changes its keeper publishes."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._since: dict[str, float] = {}
        self._lock = threading.Lock()

    def on_change(self, change: dict[str, Any]) -> None:
        kernel, state = str(change.get("kernel_id")), str(change.get("state"))
        with self._lock:
            if state in (KeeperState.ACQUIRING, KeeperState.QUEUED):
                self._since.setdefault(kernel, self._clock())
                while len(self._since) > MAX_TIMED:
                    self._since.pop(next(iter(self._since)))
                return
            since = self._since.pop(kernel, None)
        if since is not None and state == KeeperState.HELD:
            LEASE_WAIT.observe(self._clock() - since)


_installed = False
_install_lock = threading.Lock()


def install() -> None:
    """Add the notebook metrics to the default registry, once per process (several servers in
    one process, as in tests, share the process's kernels)."""
    global _installed
    with _install_lock:
        if _installed:
            return
        _installed = True
    REGISTRY.register(NotebookMetrics(
        lambda: [p.lease_state() for p in live_provisioners().values()]))
    changes.subscribe(LeaseWaits().on_change)
