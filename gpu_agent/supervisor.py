"""The agent's supervisor: the one process that listens on the network and never touches CUDA.

It builds the agent's parts (the client socket's ``ClientRequests``, the ``WorkerPool``,
``Tenancy``, ``Drain``, the metrics) and turns their loop: worker reports, client messages, the
tick, signals (a first SIGTERM drains, a second stops), the GPU's figures and health. It never
waits: not on a tenant's work (that runs in workers), not on another agent (workers move parked
state themselves), not on a disk (workers write parked state).
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import zmq

from gpu_agent import nvml
from gpu_agent.client_requests import ClientRequests, bind_client_socket
from gpu_agent.curve import ServerKeys
from gpu_agent.drain import Drain
from gpu_agent.limits import AgentLimits
from gpu_agent.metrics import AgentMetrics
from gpu_agent.parking import ParkStore
from gpu_agent.tenancy import Tenancy
from gpu_agent.workers import WorkerConfig, WorkerPool

log = logging.getLogger("harp.agent")

AGENT_VERSION = "0.3.0"
TICK_S = 0.05
GPU_SAMPLE_S = 5.0
#: /healthz fails when the loop has not turned for this long (a wedged supervisor)
HEALTHY_WITHIN_S = 30.0
#: client messages handled in a row before the workers and the clock have a turn
CLIENT_BURST = 256


class Supervisor:
    """See the module docstring."""

    def __init__(self, endpoint: str, workers: WorkerConfig, limits: AgentLimits, *,
                 token: str | None = None, device: dict[str, Any] | None = None,
                 spares: int = 1, curve: ServerKeys | None = None,
                 pool: Callable[[], list[str]] = list, advertise: str | None = None,
                 context: zmq.Context | None = None) -> None:
        context = context or zmq.Context.instance()
        socket, authenticator = bind_client_socket(context, endpoint, limits, curve)
        self.endpoint = socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.workers = WorkerPool(context, workers, spares=spares)
        memory, limit = limits.park_budget()
        parking = ParkStore(memory, limit, limits.park_ttl, memory_dir=limits.park_memory_dir,
                            spill_dir=limits.park_dir)
        self.device = device or {}
        agent_info = {"version": AGENT_VERSION, "pid": os.getpid(), "endpoint": self.endpoint,
                      "executor": workers.executor, "emulated": workers.executor == "emulated"}
        self.metrics = AgentMetrics(health=self._healthy, ready=self._ready)
        self.metrics.info(AGENT_VERSION, workers.executor, str(self.device.get("name", "")),
                          limits.slots)
        self.tenancy = Tenancy(self.workers, parking, limits, endpoint=self.endpoint,
                               agent_info=agent_info, device_info=self.device_info,
                               metrics=self.metrics)
        self.drain = Drain(self.tenancy, grace=limits.drain_grace,
                           offer_timeout=limits.drain_offer_timeout,
                           advertise=advertise or self.endpoint, peers=pool, token=token,
                           curve=curve, context=context)
        self.requests = ClientRequests(socket, authenticator, self.tenancy, self.drain,
                                       self.workers, limits, self.metrics, token=token,
                                       agent_info=agent_info, device_info=self.device_info)
        self._signals = 0
        self._last_loop = time.monotonic()
        self._next_gpu_sample = 0.0
        self._running = False
        self._next_tick = 0.0
        self.workers.ensure_spares()

    # {{{ loop

    def serve_forever(self) -> None:
        self._running = True
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        poller = zmq.Poller()
        poller.register(self.requests.socket, zmq.POLLIN)
        poller.register(self.workers.socket, zmq.POLLIN)
        try:
            while self._running:
                events = dict(poller.poll(int(TICK_S * 1000)))
                # worker reports first, then the tick (which sees exits): a report written
                # before a worker's exit is read before the exit is acted on
                for worker, header in self.workers.receive():
                    self._guarded(partial(self.tenancy.lifecycle.on_worker, worker, header))
                if self.requests.socket in events:
                    self.requests.receive(CLIENT_BURST)
                now = self._last_loop = time.monotonic()
                if now >= self._next_tick:
                    self._next_tick = now + TICK_S
                    self._guarded(self.tenancy.tick)
                    if self._signals and not self.drain.active:
                        self._guarded(self.drain.begin)
                    if self.drain.active and self.drain.tick():
                        self._running = False
                if now >= self._next_gpu_sample:
                    self._next_gpu_sample = now + GPU_SAMPLE_S
                    self._guarded(self._sample_gpu)
                self.requests.flush()
        finally:
            self.close()

    def wait_ready(self, timeout: float) -> None:
        """Block (at start-up only) until the first worker has its context: from then on the
        agent can serve a session at once. RuntimeError when none comes."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.workers.socket.poll(100):
                for worker, header in self.workers.receive():
                    self.tenancy.lifecycle.on_worker(worker, header)
            if any(w.ready for w in self.workers.workers.values()):
                self.device = self.device_info()
                return
            for _worker, code in self.workers.reap(time.monotonic(), timeout):
                raise RuntimeError(f"its first GPU worker exited (code {code}) before it was "
                                   "ready: see the worker's messages above")
        raise RuntimeError(f"no GPU worker was ready within {timeout:g} s (harp-agent "
                           "--worker-start-timeout): see the worker's messages above")

    def device_info(self) -> dict[str, Any]:
        """The device as a session sees it: the worker's facts, its memory the slot's."""
        ready = [w for w in self.workers.workers.values() if w.ready and w.device]
        device = ready[0].device if ready else self.device
        return {**device, "total_memory": self.workers.config.memory_cap}

    def _guarded(self, step: Callable[[], None]) -> None:
        try:
            step()
        except Exception:  # a bug must not take the supervisor down
            log.exception("supervisor step failed")

    def _sample_gpu(self) -> None:
        bus = self.device.get("pci_bus_id")
        figures = nvml.read(bus) if bus and bus != "emulated" else {}
        if figures:
            self.metrics.gpu(figures["utilization_gpu"] / 100, figures["memory_used"],
                             figures["memory_total"])

    def _healthy(self) -> bool:
        """The loop turned recently (/healthz, on the metrics port's thread)."""
        return time.monotonic() - self._last_loop < HEALTHY_WITHIN_S

    def _ready(self) -> bool:
        """A worker is ready for the next session (/readyz)."""
        return self._running and not self.drain.active and not self._signals and any(
            w.ready and w.ended_by is None
                                     for w in list(self.workers.workers.values()))

    def serve_metrics(self, host: str, port: int) -> int:
        """Serve /metrics, /healthz and /readyz; the port bound."""
        return self.metrics.serve(host, port)

    def stop(self) -> None:
        self._running = False

    def _on_signal(self, *_: Any) -> None:
        """SIGTERM or SIGINT: drain (on the loop, not in the handler); a second one: stop."""
        self._signals += 1
        if self._signals > 1:
            self.stop()

    def close(self) -> None:
        self.metrics.close()
        self.drain.close()
        self.workers.close()
        self.requests.close()
        self.tenancy.close()

    # }}}
