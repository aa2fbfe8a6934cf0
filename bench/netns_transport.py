"""The raw transport between two network namespaces on one machine, next to loopback.

    sudo .venv/bin/python bench/netns_transport.py [--out bench/results/netns-transport-HOST.md]

Needs root and ``ip`` (iproute2): there is none on the GPU machine, so this runs on CPU
machines. It creates two network namespaces joined by a veth pair (real interfaces, the
kernel's whole TCP/IP stack, unlike loopback's shortcut), with addresses from 198.18.0.0/15
(RFC 2544's range for benchmarks) that exist only inside those namespaces, and measures what
bench/raw_zmq.py measures, pyzmq DEALER to ROUTER: a small round trip (p50, p99) and 1 MiB and
64 MiB frames each way. The same runs over loopback (in the root namespace and inside one test
namespace) and over the veth pair at MTU 1500 and 9000 give the table. The namespaces (and so
the veth pair) are deleted at the end, also when something fails.

``serve ENDPOINT`` and ``client ENDPOINT OUT.json`` are the two ends, run inside a namespace.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zmq

HERE = Path(__file__).resolve().parent
MIB = 1 << 20
SIZES_MIB = (1, 64)
ROUND_TRIPS = 2000
PORT = 5791
SERVER_ADDRESS, CLIENT_ADDRESS, PREFIX = "198.18.0.1", "198.18.0.2", 30


def serve(endpoint: str) -> None:
    """ROUTER: ``ping``/``put`` answered ``ok``; ``getN`` answered with N MiB; ``stop`` ends."""
    socket = zmq.Context.instance().socket(zmq.ROUTER)
    socket.bind(endpoint)
    blobs = {mib: np.ones(mib * MIB, np.uint8) for mib in SIZES_MIB}
    poller = zmq.Poller()
    poller.register(socket, zmq.POLLIN)
    deadline = time.monotonic() + 300  # bounded: a client that never comes does not keep us
    while time.monotonic() < deadline:
        if not poller.poll(1000):
            continue
        ident, command, *_payload = socket.recv_multipart(copy=False)
        kind = command.bytes
        if kind == b"stop":
            socket.send_multipart([ident, b"ok"])
            return
        if kind.startswith(b"get"):
            socket.send_multipart([ident, blobs[int(kind[3:])]], copy=False)
        else:
            socket.send_multipart([ident, b"ok"])


def client(endpoint: str) -> dict[str, float]:
    socket = zmq.Context.instance().socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(endpoint)
    socket.send(b"ping")
    if not socket.poll(15_000):
        raise SystemExit(f"no answer from {endpoint}")
    socket.recv()
    results: dict[str, float] = {}
    samples = []
    for _ in range(ROUND_TRIPS):
        start = time.perf_counter()
        socket.send(b"ping")
        socket.recv()
        samples.append((time.perf_counter() - start) * 1e6)
    kept = samples[ROUND_TRIPS // 10:]
    results["rtt_p50_us"] = float(np.percentile(kept, 50))
    results["rtt_p99_us"] = float(np.percentile(kept, 99))
    for mib in SIZES_MIB:
        data = np.ones(mib * MIB, np.uint8)
        for name, once in (
            ("up", lambda d=data: (socket.send_multipart([b"put", d], copy=False),
                                   socket.recv())),
            ("down", lambda m=mib: (socket.send(b"get%d" % m), socket.recv(copy=False))),
        ):
            once()
            times = []
            for _ in range(10 if mib < 64 else 5):
                start = time.perf_counter()
                once()
                times.append(time.perf_counter() - start)
            results[f"{name}_{mib}MiB_GBps"] = data.nbytes / min(times) / 1e9
    socket.send(b"stop")
    socket.poll(5000)
    return results


# {{{ the namespaces


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


def in_namespace(namespace: str | None, *argv: str) -> list[str]:
    return ["ip", "netns", "exec", namespace, *argv] if namespace else list(argv)


def measure(server_ns: str | None, client_ns: str | None, host: str) -> dict[str, float]:
    endpoint = f"tcp://{host}:{PORT}"
    me = [sys.executable, str(Path(__file__).resolve())]
    server = subprocess.Popen(in_namespace(server_ns, *me, "serve", endpoint))
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    try:
        subprocess.run(in_namespace(client_ns, *me, "client", endpoint, out), check=True,
                       timeout=600)
        return json.loads(Path(out).read_text())
    finally:
        os.unlink(out)
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def run_all() -> tuple[dict[str, dict[str, float]], str]:
    tag = f"{os.getpid()}"
    server_ns, client_ns = f"harp-bench-srv-{tag}", f"harp-bench-cli-{tag}"
    server_if, client_if = f"hbs{tag}"[:15], f"hbc{tag}"[:15]
    results: dict[str, dict[str, float]] = {}
    created: list[str] = []
    try:
        for ns in (server_ns, client_ns):
            ip("netns", "add", ns)
            created.append(ns)
            ip("-n", ns, "link", "set", "lo", "up")
        # both ends are made inside their namespaces: nothing appears in the root namespace
        ip("link", "add", server_if, "netns", server_ns, "type", "veth", "peer", "name",
           client_if, "netns", client_ns)
        ip("-n", server_ns, "addr", "add", f"{SERVER_ADDRESS}/{PREFIX}", "dev", server_if)
        ip("-n", client_ns, "addr", "add", f"{CLIENT_ADDRESS}/{PREFIX}", "dev", client_if)
        for ns, dev in ((server_ns, server_if), (client_ns, client_if)):
            ip("-n", ns, "link", "set", dev, "up")
        results["loopback, root namespace"] = measure(None, None, "127.0.0.1")
        results["loopback, inside a test namespace"] = measure(server_ns, server_ns,
                                                               "127.0.0.1")
        for mtu in (1500, 9000):
            for ns, dev in ((server_ns, server_if), (client_ns, client_if)):
                ip("-n", ns, "link", "set", dev, "mtu", str(mtu))
            results[f"veth between two namespaces, MTU {mtu}"] = measure(
                server_ns, client_ns, SERVER_ADDRESS)
        kernel_view = subprocess.run(
            ["ip", "-n", server_ns, "-br", "addr"], capture_output=True, text=True,
            timeout=30).stdout.strip()
    finally:
        for ns in created:  # deleting a namespace deletes its end of the veth pair, so both
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
    return results, kernel_view


# }}}


def machine() -> str:
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{cpu}, {os.cpu_count()} logical CPUs, Linux {platform.release()}, "
            f"load average at the end {load} (shared machine)")


def report(results: dict[str, dict[str, float]], kernel_view: str, out: Path) -> str:
    lines = [
        f"# Transport between network namespaces vs loopback ({platform.node()})",
        "",
        f"Run {datetime.datetime.now().isoformat(timespec='seconds')} on {platform.node()}: "
        f"{machine()}, Python {platform.python_version()}, pyzmq {zmq.__version__} "
        f"(libzmq {zmq.zmq_version()}): `python bench/netns_transport.py` as root. Two network "
        f"namespaces joined by a veth pair ({SERVER_ADDRESS} and {CLIENT_ADDRESS}/{PREFIX}, "
        "only inside them), pyzmq DEALER to ROUTER as bench/raw_zmq.py; no GPU involved. "
        "All rows in this one run.",
        "",
        "| path | round trip p50 (µs) | p99 (µs) | up 1 MiB (GB/s) | down 1 MiB | "
        "up 64 MiB | down 64 MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for path, r in results.items():
        lines.append(f"| {path} | {r['rtt_p50_us']:.1f} | {r['rtt_p99_us']:.1f} | "
                     f"{r['up_1MiB_GBps']:.2f} | {r['down_1MiB_GBps']:.2f} | "
                     f"{r['up_64MiB_GBps']:.2f} | {r['down_64MiB_GBps']:.2f} |")
    lines += ["", "The server namespace's addresses during the run (`ip -br addr`):", "",
              "```", kernel_view, "```", "", "Raw figures (JSON):", "", "```",
              json.dumps(results, indent=1), "```"]
    text = "\n".join(lines) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return text


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        serve(sys.argv[2])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "client":
        Path(sys.argv[3]).write_text(json.dumps(client(sys.argv[2])))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (ip netns)")
    results, kernel_view = run_all()
    out = args.out or HERE / "results" / f"netns-transport-{platform.node()}.md"
    print(report(results, kernel_view, out))


if __name__ == "__main__":
    main()
