"""Encryption benchmark: what CurveZMQ costs on the wire between a kernel and its agent.

    python bench/encryption.py [--gpu] [--out bench/results/encryption-<machine>.md]

Runs bench/workloads.py through the shim twice in one run, against a local harp-agent without
and with CurveZMQ (``--curve-secret-key-file`` on the agent, ``HARP_CURVE_*`` on the client):
the sync read's latency (a 4-byte ``memcpy_dtoh``, p50 and p99) and H2D/D2H throughput at
``workloads.COPY_SIZES`` (4 KiB to 256 MiB). The table gives each figure both ways and the cost
of encryption as a ratio (time with Curve over time without: 1.00 is free). The executor is
emulated unless ``--gpu``; the emulated device is host memory, so its rows are the wire's and
the agent's cost alone.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from forwarding import ENV, HERE, report, run_json, start_agent
from workloads import COPY_SIZES, copy_key

from gpu_agent.curve import generate

READS = ("read4_p50_us", "read4_p99_us")
COPIES = [copy_key(way, nbytes) for nbytes, _reps in COPY_SIZES for way in ("h2d", "d2h")]


def machine() -> str:
    """This machine's CPU model (the emulated rows are the CPU's and the wire's)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        return re.search(r"model name\s*:\s*(.+)", text)[1].strip()  # type: ignore[index]
    except (OSError, TypeError):
        return platform.processor() or platform.machine()


def measure(gpu: bool, keys: Path | None) -> dict[str, Any]:
    extra: list[str] = []
    env = dict(ENV)
    if keys is not None:
        extra = ["--curve-secret-key-file", str(keys / "server.key_secret"),
                 "--curve-client-keys-dir", str(keys / "admitted")]
        env.update(HARP_CURVE_SERVER_KEY_FILE=str(keys / "server.key"),
                   HARP_CURVE_CLIENT_KEY_FILE=str(keys / "client.key_secret"))
    agent, endpoint = start_agent(not gpu, *extra)
    try:
        return run_json([str(HERE / "workloads.py"), "shim", endpoint], env=env)
    finally:
        agent.kill()
        agent.wait()


def table(plain: dict[str, Any], curve: dict[str, Any]) -> list[str]:
    lines = ["| figure | without Curve | with Curve | cost of encryption (time ratio) |",
             "|---|---|---|---|"]
    for key in READS:
        label = f"sync read, 4 bytes, {key.split('_')[1]} (µs)"
        lines.append(f"| {label} | {plain[key]:.1f} | {curve[key]:.1f} | "
                     f"{curve[key] / plain[key]:.2f}x |")
    for key in COPIES:
        way, size = key.split("_")[:2]
        label = f"{'H2D' if way == 'h2d' else 'D2H'} {size} (GB/s)"
        lines.append(f"| {label} | {plain[key]:.2f} | {curve[key]:.2f} | "
                     f"{plain[key] / curve[key]:.2f}x |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="a pycuda agent on GPU 0")
    parser.add_argument("--out", help="Markdown file to write (default bench/results/...)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        keys = Path(tmp)
        generate(str(keys))
        (keys / "admitted").mkdir()
        (keys / "admitted" / "client.key").write_bytes((keys / "client.key").read_bytes())
        plain = measure(args.gpu, None)
        curve = measure(args.gpu, keys)
    where = plain["device"] if args.gpu else f"emulated, {machine()}"
    slug = re.sub(r"[^a-z0-9]+", "-", where.lower()).strip("-")
    out = args.out or str(HERE / "results" / f"encryption-{slug}.md")
    report("encryption", where, f"python bench/encryption.py{' --gpu' if args.gpu else ''}",
           f"One local agent ({'pycuda' if args.gpu else 'emulated executor: host memory, no GPU'}"
           f"), the shim over TCP loopback, {os.cpu_count()} CPUs; without CurveZMQ, then with "
           "it, in this one run. Throughput rows: the best of a few copies. Load average at "
           f"the end: {os.getloadavg()[0]:.1f} (other work on the machine moves the figures).",
           table(plain, curve), {"without_curve": plain, "with_curve": curve}, out)


if __name__ == "__main__":
    main()
