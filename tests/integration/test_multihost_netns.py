"""Several hosts on one machine: two "GPU nodes" and a "CPU node" in network namespaces.

Each node is a network namespace joined to a bridge (in a fourth, "switch" namespace) by a veth
pair: real interfaces, the kernel's whole TCP/IP stack, addresses from 198.18.0.0/15 (RFC 2544's
benchmark range) that exist only inside the namespaces. Each GPU node runs a real ``harp-agent``
(emulated executor: host memory, no GPU) with CurveZMQ and a token; the CPU node runs a real
``harp run`` program whose only agent setting is one name, ``harp-agents``, that the CPU node's
/etc/hosts (``ip netns exec`` mounts /etc/netns/NODE/hosts) resolves to both GPU nodes. What must
hold: the pool is found by the name (both agents), leases and sessions work across hosts on an
encrypted wire, parked state moves from one GPU node to the other (fetched agent to agent), and
then moves again when its agent drains (SIGTERM) and hands it to the other.

Needs root and ``ip netns``; it is skipped, saying why, where either is missing.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from gpu_agent.curve import generate

pytestmark = pytest.mark.timeout(240)
REPO = Path(__file__).resolve().parents[2]
TOKEN = "netns-pool-token"
NAME = "harp-agents"
GPU_NODES = {"gpu1": "198.18.0.1", "gpu2": "198.18.0.2"}
CPU_NODE = ("cpu", "198.18.0.10")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


def netns_unavailable() -> str | None:
    if shutil.which("ip") is None:
        return "no `ip` (iproute2) on this machine"
    if os.geteuid() != 0:
        return "network namespaces need root (CI runs this as root)"
    probe = f"harp-probe-{os.getpid()}"
    try:
        _ip("netns", "add", probe)
    except subprocess.CalledProcessError as e:
        return f"`ip netns add` is not permitted here: {e.stderr.strip()}"
    _ip("netns", "delete", probe)
    return None


@contextmanager
def network() -> Iterator[dict[str, str]]:
    """The nodes' namespaces (node -> namespace name), joined by a bridge; removed after."""
    tag = str(os.getpid())
    switch = f"harp-sw-{tag}"
    nodes = {node: f"harp-{node}-{tag}" for node in [*GPU_NODES, CPU_NODE[0]]}
    addresses = {**GPU_NODES, CPU_NODE[0]: CPU_NODE[1]}
    created: list[str] = []
    hosts = "127.0.0.1 localhost\n" + "".join(f"{a} {NAME}\n" for a in GPU_NODES.values())
    try:
        for ns in (switch, *nodes.values()):
            _ip("netns", "add", ns)
            created.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
            etc = Path("/etc/netns") / ns
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text(hosts)
        _ip("-n", switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", switch, "link", "set", "br0", "up")
        for i, (node, ns) in enumerate(nodes.items()):
            _ip("link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", f"port{i}",
                "netns", switch)
            _ip("-n", switch, "link", "set", f"port{i}", "master", "br0")
            _ip("-n", switch, "link", "set", f"port{i}", "up")
            _ip("-n", ns, "addr", "add", f"{addresses[node]}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
        yield nodes
    finally:
        for ns in created:
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True, timeout=30)
            shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)


class NodeAgent:
    """``harp-agent`` inside a node's namespace; its output kept."""

    def __init__(self, namespace: str, address: str, keys: Path) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO), HARP_TOKEN=TOKEN)
        self.endpoint = f"tcp://{address}:5555"
        self.process = subprocess.Popen(
            ["ip", "netns", "exec", namespace, sys.executable, "-m", "gpu_agent.cli",
             "--listen", self.endpoint, "--executor", "emulated", "--log-level", "INFO",
             "--curve-secret-key-file", str(keys / "server.key_secret"),
             "--curve-client-keys-dir", str(keys / "admitted"),
             "--pool", f"tcp://{NAME}:5555", "--drain-grace", "60"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.output: list[str] = []
        self.serving = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.output.append(line)
            if line.startswith("harp-agent: serving"):
                self.serving.set()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)


PROGRAM = textwrap.dedent(f"""\
    import json, sys
    import numpy as np
    import pycuda.autoinit
    import pycuda.gpuarray as gpuarray
    from harp_jupyter.shim.endpoints import configured_agents
    from harp_jupyter.shim.session import get_session
    from provisioner.lease_client import BlockingLeaseClient

    def say(**fields):
        print(json.dumps(fields), flush=True)

    session = get_session()
    host = np.random.default_rng(3).random(300_000)
    a = gpuarray.to_gpu(host)
    b = a * 2
    pointer = int(b.gpudata)
    say(step="leased", pool=configured_agents(), agent=session.endpoint)
    session.release()
    # another kernel takes the GPU this one parked on: the next cell moves to the other node
    other = BlockingLeaseClient(token={TOKEN!r})
    held = other.request(session.endpoint, "other-kernel", "s")
    assert held["state"] == "held", held
    first = session.endpoint
    ok = bool(np.array_equal((a + b).get(), host * 3)) and int(b.gpudata) == pointer
    say(step="moved", ok=ok, agent=session.endpoint, from_agent=first)
    other.release(first, held["id"], held["token"])
    other.close()
    session.release()
    say(step="parked", agent=session.endpoint)
    sys.stdin.readline()  # the test drains that agent now
    ok = bool(np.array_equal((a - b).get(), -host)) and int(b.gpudata) == pointer
    say(step="after-drain", ok=ok, agent=session.endpoint)
""")


def test_pool_by_name_leases_and_parked_state_move_between_hosts_encrypted(
        tmp_path: Path) -> None:
    reason = netns_unavailable()
    if reason is not None:
        pytest.skip(reason)
    keys = tmp_path / "keys"
    generate(str(keys))
    (keys / "admitted").mkdir()
    (keys / "admitted" / "client.key").write_bytes((keys / "client.key").read_bytes())
    script = tmp_path / "cpu_node_program.py"
    script.write_text(PROGRAM)
    with network() as nodes:
        agents = {node: NodeAgent(nodes[node], address, keys)
                  for node, address in GPU_NODES.items()}
        program = None
        try:
            for agent in agents.values():
                assert agent.serving.wait(60), "".join(agent.output)
                assert any("CurveZMQ encryption on" in line for line in agent.output)
            env = {k: v for k, v in os.environ.items() if not k.startswith("HARP_")}
            env.update(PYTHONPATH=str(REPO), HARP_AGENTS=f"tcp://{NAME}:5555",
                       HARP_TOKEN=TOKEN, HARP_AGENT_TIMEOUT="10",
                       HARP_CURVE_SERVER_KEY_FILE=str(keys / "server.key"),
                       HARP_CURVE_CLIENT_KEY_FILE=str(keys / "client.key_secret"))
            program = subprocess.Popen(
                ["ip", "netns", "exec", nodes[CPU_NODE[0]], sys.executable, "-m",
                 "harp_jupyter.cli", "run", str(script)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                text=True, env=env)
            steps = StepReader(program)
            leased = steps.next("leased")
            endpoints = {a.endpoint for a in agents.values()}
            assert set(leased["pool"]) == endpoints  # one name, both GPU nodes
            moved = steps.next("moved")
            assert moved["ok"] and moved["agent"] != moved["from_agent"]
            assert {moved["agent"], moved["from_agent"]} == endpoints
            parked = steps.next("parked")
            draining = next(a for a in agents.values() if a.endpoint == parked["agent"])
            draining.process.send_signal(signal.SIGTERM)
            assert draining.process.wait(90) == 0, "".join(draining.output)
            assert any("moved to" in line for line in draining.output), draining.output
            assert program.stdin is not None
            program.stdin.write("\n")
            program.stdin.flush()
            after = steps.next("after-drain")
            assert after["ok"] and after["agent"] != parked["agent"]
            assert program.wait(60) == 0, steps.stderr()
        finally:
            if program is not None and program.poll() is None:
                program.kill()
                program.wait(10)
            for agent in agents.values():
                agent.stop()


class StepReader:
    """The program's JSON lines, one step at a time (its stderr kept for the failure)."""

    def __init__(self, program: subprocess.Popen) -> None:
        self.program = program
        self._err: list[str] = []
        assert program.stderr is not None
        threading.Thread(target=lambda: self._err.extend(program.stderr), daemon=True).start()

    def stderr(self) -> str:
        return "".join(self._err)

    def next(self, step: str) -> dict:
        assert self.program.stdout is not None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = self.program.stdout.readline()
            if not line:
                break
            if line.startswith("{"):
                message = json.loads(line)
                assert message["step"] == step, message
                return message
        raise AssertionError(f"the CPU node's program did not reach {step!r}:\n"
                             + self.stderr())
