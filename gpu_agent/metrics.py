"""Prometheus metrics and the health endpoints of one agent (``harp-agent --metrics-port``).

The supervisor owns one :class:`AgentMetrics` and tells it what happened (a lease granted, a park
done, a worker restarted); Prometheus scrapes ``/metrics``; Kubernetes probes ``/healthz`` and
``/readyz`` on the same port, so one port serves the operator's whole view of the agent.

Every family is per agent: which agent a series came from is Prometheus's target label, never a
label set here. No label carries a kernel, user or session id: a busy cluster would otherwise
create series without bound. The only labels are enumerations whose values are fixed below;
anything else is counted as ``"other"``.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric

log = logging.getLogger(__name__)

#: Why the supervisor replaced a session's worker process.
WORKER_RESTART_REASONS = frozenset(
    {"crashed", "hung", "sticky_cuda_error", "out_of_memory", "other"})

#: Why the agent refused a request (a lease, a message, a connection).
REFUSAL_KINDS = frozenset(
    {"unauthorized", "protocol_version", "bad_message", "draining", "queue_full",
     "over_memory_cap", "unknown_session", "other"})

#: ``harp_parked_bytes{where}`` and ``harp_sessions{state}``.
PARKED_WHERE = ("memory", "disk")
SESSION_STATES = ("active", "parked")

# Lease waits run from a warm acquire (milliseconds) to a queue behind busy GPUs (minutes).
LEASE_WAIT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                      10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
# A park or restore is a copy of up to tens of GiB: from milliseconds to about a minute.
TRANSFER_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                    120.0)

Check = Callable[[], bool]


def bounded(value: str, allowed: Iterable[str]) -> str:
    """``value`` if it is one of ``allowed``, else ``"other"``: a label never grows unbounded."""
    return value if value in allowed else "other"


def _always() -> bool:
    return True


def _non_negative(amount: float) -> float:
    # a counter only goes up; a clock step must not take the agent down over a metric
    return amount if amount > 0 else 0.0


class AgentMetrics:
    """The metric families of one agent, in a registry of their own, and their HTTP server.

    A private ``CollectorRegistry`` (not prometheus_client's global one) lets a process hold
    several agents' metrics, as tests and embedded local agents do, without name clashes.

    ``health`` says whether the agent is alive (liveness: false means restart it); ``ready``
    whether it should get new leases (readiness: false while starting or draining, which takes
    the pod out of the headless Service's DNS). Both are called on each probe, from the HTTP
    server's thread, so they must be quick and thread-safe; an exception counts as false.
    """

    def __init__(self, health: Check = _always, ready: Check = _always) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._health = health
        self._ready = ready
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        r = self.registry

        self.leases_held = Gauge("harp_leases_held", "Leases (slots) held now.", registry=r)
        self.leases_queued = Gauge("harp_leases_queued", "Lease requests waiting now.",
                                   registry=r)
        self.lease_wait_seconds = Histogram(
            "harp_lease_wait_seconds", "Time from a lease request to its grant.",
            buckets=LEASE_WAIT_BUCKETS, registry=r)
        self.gpu_seconds_held = Counter(
            "harp_gpu_seconds_held", "Slot-seconds held by leases.", registry=r)
        self.gpu_seconds_held_idle = Counter(
            "harp_gpu_seconds_held_idle",
            "Slot-seconds held by leases with no GPU work in flight.", registry=r)
        self.reclaims = Counter(
            "harp_reclaims", "Idle holders parked because someone was waiting.", registry=r)
        self.parks = Counter("harp_parks", "Sessions parked.", registry=r)
        self.park_bytes = Counter("harp_park_bytes", "Device bytes copied out by parks.",
                                  registry=r)
        self.park_seconds = Histogram("harp_park_seconds", "Duration of a park.",
                                      buckets=TRANSFER_BUCKETS, registry=r)
        self.restores = Counter("harp_restores", "Parked sessions restored.", registry=r)
        self.restore_bytes = Counter("harp_restore_bytes",
                                     "Device bytes copied back by restores.", registry=r)
        self.restore_seconds = Histogram("harp_restore_seconds", "Duration of a restore.",
                                         buckets=TRANSFER_BUCKETS, registry=r)
        self.parked_bytes_by_where = Gauge(
            "harp_parked_bytes", "Parked device memory held now, by where it is kept.",
            ["where"], registry=r)
        self.sessions_by_state = Gauge("harp_sessions", "Sessions now, by state.", ["state"],
                                       registry=r)
        self.worker_restarts = Counter(
            "harp_worker_restarts", "Worker processes replaced, by reason.", ["reason"],
            registry=r)
        self.refusals = Counter("harp_refusals", "Requests refused, by kind.", ["kind"],
                                registry=r)
        self.gpu_utilization = Gauge(
            "harp_gpu_utilization_ratio", "GPU busy share over NVML's last sample (0 to 1).",
            registry=r)
        self.gpu_memory_used = Gauge("harp_gpu_memory_used_bytes",
                                     "GPU memory in use (NVML).", registry=r)
        self.gpu_memory_total = Gauge("harp_gpu_memory_total_bytes",
                                      "GPU memory in all (NVML).", registry=r)
        self.slots = Gauge("harp_slots", "Leases this agent can hold at once (--slots).",
                           registry=r)
        self.agent_info = Info("harp_agent", "What this agent runs.", registry=r)

        # every label value exists from the start, so rate() and dashboards see zeros, not gaps
        for where in PARKED_WHERE:
            self.parked_bytes_by_where.labels(where=where)
        for state in SESSION_STATES:
            self.sessions_by_state.labels(state=state)
        for reason in WORKER_RESTART_REASONS:
            self.worker_restarts.labels(reason=reason)
        for kind in REFUSAL_KINDS:
            self.refusals.labels(kind=kind)

    # --- what the supervisor reports -------------------------------------------------------

    def lease_granted(self, wait_s: float) -> None:
        """A lease was granted ``wait_s`` seconds after it was requested (0 when not queued)."""
        self.lease_wait_seconds.observe(_non_negative(wait_s))

    def leases(self, held: int, queued: int) -> None:
        """The lease table changed: ``held`` slots are leased, ``queued`` requests wait."""
        self.leases_held.set(held)
        self.leases_queued.set(queued)

    def gpu_seconds(self, held_s: float, idle_s: float) -> None:
        """Add slot-seconds held since the last call, and how many of them had no GPU work.

        Deltas, not totals, so that the supervisor can report on each tick and at each release.
        """
        self.gpu_seconds_held.inc(_non_negative(held_s))
        self.gpu_seconds_held_idle.inc(_non_negative(idle_s))

    def reclaimed(self) -> None:
        """An idle holder was parked early because another kernel was waiting."""
        self.reclaims.inc()

    def parked(self, nbytes: int, seconds: float) -> None:
        """A session was parked: ``nbytes`` of device memory copied out in ``seconds``."""
        self.parks.inc()
        self.park_bytes.inc(_non_negative(nbytes))
        self.park_seconds.observe(_non_negative(seconds))

    def restored(self, nbytes: int, seconds: float) -> None:
        """A parked session was restored: ``nbytes`` copied back in ``seconds``."""
        self.restores.inc()
        self.restore_bytes.inc(_non_negative(nbytes))
        self.restore_seconds.observe(_non_negative(seconds))

    def parked_bytes(self, memory: int, disk: int) -> None:
        """Parked state held now: ``memory`` bytes in host memory, ``disk`` spilled to disk."""
        self.parked_bytes_by_where.labels(where="memory").set(memory)
        self.parked_bytes_by_where.labels(where="disk").set(disk)

    def sessions(self, active: int, parked: int) -> None:
        """Sessions now: ``active`` on the GPU (in a worker), ``parked`` off it."""
        self.sessions_by_state.labels(state="active").set(active)
        self.sessions_by_state.labels(state="parked").set(parked)

    def worker_restarted(self, reason: str) -> None:
        """A worker was replaced; ``reason`` outside ``WORKER_RESTART_REASONS`` counts as other."""
        self.worker_restarts.labels(reason=bounded(reason, WORKER_RESTART_REASONS)).inc()

    def refused(self, kind: str) -> None:
        """A request was refused; ``kind`` outside ``REFUSAL_KINDS`` counts as other."""
        self.refusals.labels(kind=bounded(kind, REFUSAL_KINDS)).inc()

    def gpu(self, util_ratio: float, used: int, total: int) -> None:
        """NVML's last sample: busy share from 0 to 1 (NVML's percent / 100), memory bytes."""
        self.gpu_utilization.set(min(max(util_ratio, 0.0), 1.0))
        self.gpu_memory_used.set(used)
        self.gpu_memory_total.set(total)

    def info(self, version: str, executor: str, device: str, slots: int) -> None:
        """What the agent is: a constant 1 labelled with its version, executor and device."""
        self.agent_info.info({"version": version, "executor": executor, "device": device})
        self.slots.set(slots)

    # --- HTTP: /metrics, /healthz, /readyz -------------------------------------------------

    def serve(self, host: str = "0.0.0.0", port: int = 9400) -> int:
        """Serve ``/metrics``, ``/healthz`` and ``/readyz`` from one daemon thread.

        Returns the port bound (port 0 binds a free one). A second call is an error: one agent
        has one metrics endpoint.
        """
        if self._server is not None:
            raise RuntimeError("AgentMetrics is already serving")
        server_class = _IPv6Server if ":" in host else ThreadingHTTPServer
        server = server_class((host, port), _handler_for(self))
        server.daemon_threads = True
        thread = threading.Thread(target=server.serve_forever, name="harp-metrics",
                                  kwargs={"poll_interval": 0.5}, daemon=True)
        thread.start()
        self._server, self._thread = server, thread
        return int(server.server_address[1])

    def close(self) -> None:
        """Stop the HTTP server (if serving) and free its port."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(timeout=5)

    def exposition(self, accept: str | None = None) -> tuple[bytes, str]:
        """The registry in the text format ``accept`` asks for, and its content type."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(_WithoutCreated(self.registry)), content_type

    def check(self, which: str) -> bool:
        """``health`` or ``ready``, with an exception from the callable counted as false."""
        probe = self._health if which == "health" else self._ready
        try:
            return bool(probe())
        except Exception:
            log.exception("the agent's %s check raised", which)
            return False


class _WithoutCreated:
    """The registry less prometheus_client's ``*_created`` samples.

    They would add a series per counter and histogram, each holding about the agent's start
    time, and names beyond the documented families; Prometheus sees resets without them.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        for family in self._registry.collect():
            family.samples = [s for s in family.samples if not s.name.endswith("_created")]
            yield family


class _IPv6Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6


def _handler_for(metrics: AgentMetrics) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "harp-agent-metrics"

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                body, content_type = metrics.exposition(self.headers.get("Accept"))
                self._reply(200, body, content_type)
            elif path in ("/healthz", "/readyz"):
                which = "health" if path == "/healthz" else "ready"
                ok = metrics.check(which)
                text = "ok\n" if ok else ("unhealthy\n" if which == "health" else "not ready\n")
                self._reply(200 if ok else 503, text.encode(), "text/plain; charset=utf-8")
            else:
                self._reply(404, b"not found: try /metrics, /healthz or /readyz\n",
                            "text/plain; charset=utf-8")

        def _reply(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            # probes and scrapes every few seconds would drown the agent's own log
            log.debug("metrics http: " + format, *args)

    return Handler
