"""CurveZMQ on every socket a kernel opens to an agent: what crosses the wire is not readable.

The agent listens on 127.0.0.2 and advertises its workers at 127.0.0.1, where a recording TCP
proxy forwards every connection (the supervisor's and each worker's) and keeps every byte. A real
program runs through it; neither the agent's token nor a marker in the program's data may appear
in the recording. The same run without Curve shows both in clear (so the check can fail). A
client whose key the agent does not admit gets a clear error naming the setting to fix.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from gpu_agent.curve import generate
from tests.conftest import free_port_block, running_agent
from tests.worker_proxy import WorkerProxy

pytestmark = pytest.mark.timeout(120)
REPO = Path(__file__).resolve().parents[2]
TOKEN = "token-that-must-never-be-seen-0451"
MARKER = "HARP-DATA-MARKER-7731"


class RecordingProxy(WorkerProxy):
    """Forwards the workers' ports, keeping every byte."""

    def __init__(self, ports: list[int]) -> None:
        self.recorded = bytearray()
        super().__init__(ports)

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       up_reader: asyncio.StreamReader, up_writer: asyncio.StreamWriter) -> None:
        async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while data := await source.read(65536):
                    self.recorded += data
                    sink.write(data)
                    await sink.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                sink.close()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))


@contextmanager
def recorded_agent(tmp_path: Path, *, curve: bool) -> Iterator[tuple[Any, RecordingProxy]]:
    ports = free_port_block(5)
    keys = tmp_path / "keys"
    generate(str(keys))
    admitted = tmp_path / "admitted"
    admitted.mkdir()
    (admitted / "client.key").write_bytes((keys / "client.key").read_bytes())
    extra = ["--worker-host", "127.0.0.2", "--worker-ports", f"{ports[1]}-{ports[-1]}",
             "--worker-advertise", "127.0.0.1", "--token", TOKEN]
    if curve:
        extra += ["--curve-secret-key-file", str(keys / "server.key_secret"),
                  "--curve-client-keys-dir", str(admitted)]
    with running_agent(*extra, listen=f"tcp://127.0.0.2:{ports[0]}") as agent:
        proxy = RecordingProxy(ports)
        try:
            yield agent, proxy
        finally:
            proxy.close()


def run_program(endpoint: str, tmp_path: Path, env_extra: dict[str, str]
                ) -> subprocess.CompletedProcess:
    script = tmp_path / "secret_data.py"
    script.write_text(textwrap.dedent(f"""\
        import numpy as np
        import pycuda.autoinit
        import pycuda.gpuarray as gpuarray
        data = np.frombuffer(({MARKER!r} * 4096).encode(), dtype=np.uint8)
        a = gpuarray.to_gpu(data)
        back = a.get()
        assert back.tobytes() == data.tobytes()
        print("round trip ok", int(back.sum()))
    """))
    env = {k: v for k, v in os.environ.items() if not k.startswith("HARP_")}
    env.update(PYTHONPATH=str(REPO), HARP_AGENTS=endpoint, HARP_TOKEN=TOKEN,
               HARP_AGENT_TIMEOUT="5", **env_extra)
    return subprocess.run([sys.executable, "-m", "harp_jupyter.cli", "run", str(script)],
                          env=env, capture_output=True, text=True, timeout=90)


def proxied(agent: Any) -> str:
    return agent.endpoint.replace("127.0.0.2", "127.0.0.1")


def test_the_plain_wire_shows_token_and_data_so_the_check_can_fail(tmp_path: Path) -> None:
    with recorded_agent(tmp_path, curve=False) as (agent, proxy):
        done = run_program(proxied(agent), tmp_path, {})
        assert "round trip ok" in done.stdout, done.stderr
        assert TOKEN.encode() in proxy.recorded and MARKER.encode() in proxy.recorded


def test_with_curve_neither_token_nor_data_crosses_in_clear(tmp_path: Path) -> None:
    with recorded_agent(tmp_path, curve=True) as (agent, proxy):
        keys = tmp_path / "keys"
        done = run_program(proxied(agent), tmp_path, {
            "HARP_CURVE_SERVER_KEY_FILE": str(keys / "server.key"),
            "HARP_CURVE_CLIENT_KEY_FILE": str(keys / "client.key_secret")})
        assert "round trip ok" in done.stdout, done.stderr
        assert len(proxy.recorded) > 4096 * len(MARKER)  # the data did go through the proxy
        assert TOKEN.encode() not in proxy.recorded
        assert MARKER.encode() not in proxy.recorded


def test_a_client_key_the_agent_does_not_admit_is_a_clear_error(tmp_path: Path) -> None:
    with recorded_agent(tmp_path, curve=True) as (agent, _proxy):
        stranger = tmp_path / "stranger"
        generate(str(stranger))
        done = run_program(proxied(agent), tmp_path, {
            "HARP_CURVE_SERVER_KEY_FILE": str(tmp_path / "keys" / "server.key"),
            "HARP_CURVE_CLIENT_KEY_FILE": str(stranger / "client.key_secret")})
        assert done.returncode != 0
        assert "CurveZMQ" in done.stderr, done.stderr
        assert any("refused a CurveZMQ client key" in line for line in agent.output)


def test_half_a_key_setting_is_a_clear_error(tmp_path: Path) -> None:
    with recorded_agent(tmp_path, curve=True) as (agent, _proxy):
        done = run_program(proxied(agent), tmp_path, {
            "HARP_CURVE_SERVER_KEY_FILE": str(tmp_path / "keys" / "server.key")})
        assert done.returncode != 0
        assert "HARP_CURVE_CLIENT_KEY_FILE is not set" in done.stderr, done.stderr
