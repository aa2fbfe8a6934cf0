"""A real Prometheus server (Debian's ``prometheus``) scraping given targets, for tests.

``running_prometheus(["127.0.0.1:PORT"], tmp_path)`` starts ``/usr/bin/prometheus`` with a
1 s scrape interval, its storage in ``tmp_path``, on a free loopback port, waits until it is
ready and kills it on exit. ``PrometheusServer.wait_for(query)`` polls the HTTP query API until
the query returns a result. Used by the scrape tests of AgentMetrics and of a real harp-agent.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROMETHEUS = "/usr/bin/prometheus"
JOB = "harp-agent"

Result = list[dict[str, Any]]


def prometheus_binary() -> str | None:
    """The Prometheus server binary, or None where it is not installed."""
    return PROMETHEUS if Path(PROMETHEUS).is_file() else shutil.which("prometheus")


def _free_port() -> int:
    # the port is free when this returns, not necessarily when prometheus binds it:
    # start_prometheus retries on a lost race
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PrometheusServer:
    """A running Prometheus: ``url`` is its HTTP API, ``log`` its combined output file."""

    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def query(self, promql: str) -> Result:
        """The instant vector ``promql`` evaluates to now (``data.result`` of /api/v1/query)."""
        address = f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
        with urllib.request.urlopen(address, timeout=5) as reply:
            body = json.load(reply)
        if body.get("status") != "success":
            raise AssertionError(f"prometheus query {promql!r} failed: {body}")
        result: Result = body["data"]["result"]
        return result

    def wait_for(self, promql: str, accept: Callable[[Result], bool] = bool,
                 timeout: float = 60.0) -> Result:
        """Poll ``promql`` until ``accept(result)`` (default: non-empty); fail at the deadline."""
        deadline = time.monotonic() + timeout
        result: Result = []
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"prometheus exited ({self.process.returncode}):\n"
                                     f"{self.output()}")
            result = self.query(promql)
            if accept(result):
                return result
            time.sleep(0.2)
        targets = self.targets()
        raise AssertionError(f"prometheus: {promql!r} gave {result} after {timeout} s; "
                             f"targets: {targets}\n{self.output()}")

    def targets(self) -> list[dict[str, Any]]:
        """The active scrape targets with their health and last error (/api/v1/targets)."""
        with urllib.request.urlopen(f"{self.url}/api/v1/targets", timeout=5) as reply:
            active: list[dict[str, Any]] = json.load(reply)["data"]["activeTargets"]
        return [{key: target.get(key) for key in ("scrapeUrl", "health", "lastError")}
                for target in active]

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=30)


def write_config(path: Path, targets: Sequence[str], scrape_interval: str = "1s") -> None:
    """A prometheus.yml scraping ``targets`` (``host:port``) at ``/metrics`` as job harp-agent."""
    # JSON is YAML; prometheus refuses a scrape timeout above the interval, so set both
    config = {
        "global": {"scrape_interval": scrape_interval, "scrape_timeout": scrape_interval,
                   "evaluation_interval": scrape_interval},
        "scrape_configs": [{"job_name": JOB, "metrics_path": "/metrics",
                            "static_configs": [{"targets": list(targets)}]}],
    }
    path.write_text(json.dumps(config, indent=2))


def start_prometheus(targets: Sequence[str], workdir: Path, scrape_interval: str = "1s",
                     timeout: float = 60.0, attempts: int = 5) -> PrometheusServer:
    """Start Prometheus scraping ``targets`` and return it once ``/-/ready`` answers 200.

    Storage, config and log live in ``workdir``. A port taken between choosing it and
    prometheus binding it is retried on another port, up to ``attempts`` times.
    """
    binary = prometheus_binary()
    if binary is None:
        raise FileNotFoundError("no prometheus binary: apt-get install prometheus")
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "prometheus.yml"
    write_config(config, targets, scrape_interval)
    failures: list[str] = []
    for attempt in range(attempts):
        port = _free_port()
        log = workdir / f"prometheus-{attempt}.log"
        with log.open("wb") as log_file:
            process = subprocess.Popen(
                [binary, f"--config.file={config}",
                 f"--storage.tsdb.path={workdir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{port}",
                 "--storage.tsdb.retention.time=1h", "--log.level=warn"],
                stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        server = PrometheusServer(f"http://127.0.0.1:{port}", process, log)
        try:
            if _wait_ready(server, timeout):
                return server
        except BaseException:
            server.stop()
            raise
        server.stop()
        output = server.output()
        failures.append(output)
        if "address already in use" not in output:
            break
    raise RuntimeError("prometheus did not become ready:\n" + "\n---\n".join(failures))


def _wait_ready(server: PrometheusServer, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(f"{server.url}/-/ready", timeout=2) as reply:
                if reply.status == 200:
                    return True
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.1)
    return False


@contextmanager
def running_prometheus(targets: Sequence[str], workdir: Path,
                       scrape_interval: str = "1s") -> Iterator[PrometheusServer]:
    """``start_prometheus`` for a ``with`` block; the server is killed when the block ends."""
    server = start_prometheus(targets, workdir, scrape_interval)
    try:
        yield server
    finally:
        server.stop()
