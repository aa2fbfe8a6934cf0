"""The sidebar's server API (docs/sidebar-api.md) on a real jupyter_server with token auth on:
real Elastic GPU kernels (ipykernel processes started through the server's REST API), real
emulated agents, requests through pytest-jupyter's ``jp_fetch``.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("jupyter_server")
pytest.importorskip("pytest_jupyter")
from tornado.httpclient import HTTPClientError

from harp_jupyter.server import LEASE_EVENT_SCHEMA_ID
from provisioner import local_agents

pytest_plugins = ["pytest_jupyter.jupyter_server"]
pytestmark = pytest.mark.timeout(180)

REPO = Path(__file__).resolve().parents[2]
GPU_CELL = ("import pycuda.autoinit, pycuda.gpuarray as ga, numpy as np\n"
            "a = ga.to_gpu(np.arange(1000, dtype=np.float32))\n"
            "print(float(a.get().sum()))")


def dead_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture
def agents() -> list[Any]:
    return []


@pytest.fixture
def jp_server_config(agents: list[Any], agent_starter: Callable[..., Any], jp_kernel_dir: Path,
                     monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Any:
    """One emulated agent (or what the test's ``harp_agents`` marker says), the repository's
    Elastic GPU kernelspec, and our server extension enabled."""
    from traitlets.config import Config

    marker = request.node.get_closest_marker("harp_agents")
    if marker is None:
        agents.append(agent_starter())
        spec = agents[0].endpoint
    else:
        spec = marker.args[0]
    shutil.copytree(REPO / "share" / "jupyter" / "kernels" / "elastic-gpu",
                    jp_kernel_dir / "elastic-gpu")
    monkeypatch.setenv("HARP_AGENTS", spec)
    monkeypatch.setenv("HARP_IDLE_TIMEOUT", "600")
    monkeypatch.delenv("HARP_TOKEN", raising=False)
    monkeypatch.delenv("HARP_AGENT", raising=False)
    return Config({"ServerApp": {"jpserver_extensions": {"harp_jupyter.server": True}}})


@pytest.fixture
def events(jp_serverapp: Any) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []

    async def listener(logger: Any, schema_id: str, data: dict[str, Any]) -> None:
        seen.append(dict(data))

    jp_serverapp.event_logger.add_listener(schema_id=LEASE_EVENT_SCHEMA_ID, listener=listener)
    return seen


async def get(jp_fetch: Callable[..., Any], *parts: str) -> dict[str, Any]:
    response = await jp_fetch(*parts)
    assert response.code == 200
    return json.loads(response.body)  # type: ignore[no-any-return]


async def post(jp_fetch: Callable[..., Any], *parts: str) -> dict[str, Any]:
    response = await jp_fetch(*parts, method="POST", body="{}")
    assert response.code == 200
    return json.loads(response.body)  # type: ignore[no-any-return]


async def failing(jp_fetch: Callable[..., Any], *parts: str, method: str = "GET",
                  **options: Any) -> tuple[int, dict[str, Any]]:
    with pytest.raises(HTTPClientError) as caught:
        await jp_fetch(*parts, method=method, body="{}" if method == "POST" else None,
                       **options)
    body = caught.value.response.body if caught.value.response is not None else b""
    try:
        return caught.value.code, json.loads(body or b"{}")
    except json.JSONDecodeError:
        return caught.value.code, {}


async def start_notebook(jp_fetch: Callable[..., Any], path: str) -> str:
    """A notebook session on the Elastic GPU kernel, as the lab starts one; its kernel id."""
    response = await jp_fetch("api", "sessions", method="POST", body=json.dumps(
        {"path": path, "name": path, "type": "notebook", "kernel": {"name": "elastic-gpu"}}))
    return json.loads(response.body)["kernel"]["id"]  # type: ignore[no-any-return]


async def run_cell(serverapp: Any, kernel_id: str, code: str, timeout: float = 60) -> str:
    """Run ``code`` in the kernel the way a notebook does; its stdout (fails on an error)."""
    client = serverapp.kernel_manager.get_kernel(kernel_id).client()
    client.start_channels()
    out: list[str] = []
    errors: list[str] = []

    def hook(msg: dict[str, Any]) -> None:
        if msg["msg_type"] == "stream":
            out.append(msg["content"]["text"])
        elif msg["msg_type"] == "error":
            errors.append(f"{msg['content']['ename']}: {msg['content']['evalue']}")

    try:
        await client.wait_for_ready(timeout=60)
        await client.execute_interactive(code, timeout=timeout, output_hook=hook)
    finally:
        client.stop_channels()
    assert not errors, errors
    return "".join(out)


def card(listing: dict[str, Any], kernel_id: str) -> dict[str, Any]:
    return next(k for k in listing["kernels"] if k["kernel_id"] == kernel_id)


async def until(check: Callable[[], Any], timeout: float = 30) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = await check()
        if result:
            return result
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.1)


async def test_every_endpoint_refuses_a_caller_without_the_token(
        jp_fetch: Callable[..., Any]) -> None:
    for method, parts in [("GET", ("harp", "api", "kernels")), ("GET", ("harp", "api", "pool")),
                          ("POST", ("harp", "api", "kernels", "k1", "lease")),
                          ("POST", ("harp", "api", "kernels", "k1", "release"))]:
        code, _ = await failing(jp_fetch, *parts, method=method,
                                headers={"Authorization": "token wrong"})
        assert code in (401, 403), (method, parts, code)


async def test_a_notebook_leases_releases_and_gets_its_arrays_back(
        jp_fetch: Callable[..., Any], jp_serverapp: Any, agents: list[Any],
        events: list[dict[str, Any]]) -> None:
    kernel_id = await start_notebook(jp_fetch, "work/a.ipynb")
    listing = await get(jp_fetch, "harp", "api", "kernels")
    assert listing["agents"] == [agents[0].endpoint] and listing["problem"] is None
    first = card(listing, kernel_id)
    assert first["path"] == "work/a.ipynb" and first["name"] == "a.ipynb"
    assert first["profile_at"] is None
    assert first["state"] == "none" and first["gpu_seconds"] == 0

    assert await run_cell(jp_serverapp, kernel_id, GPU_CELL) == "499500.0\n"
    held = card(await get(jp_fetch, "harp", "api", "kernels"), kernel_id)
    assert held["state"] == "held" and held["agent"] == agents[0].endpoint
    assert held["emulated"] is True and "emulated" in held["gpu"]
    assert held["memory_used"] >= 4000 and held["idle_left_s"] > 0

    pool = await get(jp_fetch, "harp", "api", "pool")
    assert pool["summary"] == {"gpus": 1, "free": 0, "held": 1, "queued": 0, "unreachable": 0}
    assert pool["agents"][0]["holder"]["path"] == "work/a.ipynb"

    released = (await post(jp_fetch, "harp", "api", "kernels", kernel_id, "release"))["kernel"]
    assert released["state"] == "parked" and released["parked_bytes"] >= 4000
    assert released["gpu_seconds"] > 0
    pool = await get(jp_fetch, "harp", "api", "pool")
    assert pool["summary"]["free"] == 1 and pool["agents"][0]["parked_count"] == 1

    # the Lease button leases before the next cell; that cell then finds its array intact
    leased = (await post(jp_fetch, "harp", "api", "kernels", kernel_id, "lease"))["kernel"]
    assert leased["state"] == "held"
    assert await run_cell(jp_serverapp, kernel_id, "print(float(a.get().sum()))") == "499500.0\n"

    states = [e["state"] for e in events if e["kernel_id"] == kernel_id]
    assert states == ["acquiring", "held", "parking", "parked", "acquiring", "held"], states
    assert all(e["previous"] != e["state"] for e in events)
    held_event = next(e for e in events if e["state"] == "held")
    assert held_event["emulated"] is True and "emulated" in held_event["gpu"]


async def test_a_second_notebook_queues_with_its_position_and_gets_the_gpu(
        jp_fetch: Callable[..., Any], jp_serverapp: Any, events: list[dict[str, Any]]) -> None:
    first = await start_notebook(jp_fetch, "a.ipynb")
    second = await start_notebook(jp_fetch, "b.ipynb")
    assert await run_cell(jp_serverapp, first, GPU_CELL) == "499500.0\n"
    # the second notebook's GPU cell waits in the queue of the only agent
    waiting = asyncio.ensure_future(run_cell(jp_serverapp, second, GPU_CELL))

    async def second_queued() -> Any:
        queued = card(await get(jp_fetch, "harp", "api", "kernels"), second)
        return queued if queued["state"] == "queued" else None

    queued = await until(second_queued)
    assert queued["position"] == 1 and not waiting.done()
    pool = await get(jp_fetch, "harp", "api", "pool")
    assert [q["path"] for q in pool["agents"][0]["queue"]] == ["b.ipynb"]
    assert pool["summary"]["queued"] == 1

    await post(jp_fetch, "harp", "api", "kernels", first, "release")
    assert await asyncio.wait_for(waiting, 60) == "499500.0\n"
    listing = await get(jp_fetch, "harp", "api", "kernels")
    assert card(listing, second)["state"] == "held"
    assert card(listing, first)["state"] == "parked"
    assert {"kernel_id": second, "state": "queued", "position": 1} in [
        {k: e.get(k) for k in ("kernel_id", "state", "position")} for e in events]
    # and the first notebook, queued behind the second now, still has its array
    waiting = asyncio.ensure_future(run_cell(jp_serverapp, first, "print(float(a.get().sum()))"))
    await until(lambda: _state_is(jp_fetch, first, "queued"))
    await post(jp_fetch, "harp", "api", "kernels", second, "release")
    assert await asyncio.wait_for(waiting, 60) == "499500.0\n"


async def _state_is(jp_fetch: Callable[..., Any], kernel_id: str, state: str) -> bool:
    return card(await get(jp_fetch, "harp", "api", "kernels"), kernel_id)["state"] == state


async def test_unknown_kernels_are_404_with_a_hint(jp_fetch: Callable[..., Any]) -> None:
    for action in ("lease", "release"):
        code, body = await failing(jp_fetch, "harp", "api", "kernels", "no-such-kernel", action,
                                   method="POST")
        assert code == 404 and body["error"]["kind"] == "NoSuchKernel"
        assert body["error"]["hint"]


@pytest.mark.harp_agents(dead_endpoint())
async def test_a_dead_agent_is_shown_and_leasing_says_what_to_do(
        jp_fetch: Callable[..., Any], monkeypatch: pytest.MonkeyPatch) -> None:
    # the keeper asks a silent pool again for reach_timeout before it gives up: keep it short
    monkeypatch.setenv("HARP_REACH_TIMEOUT", "2")
    kernel_id = await start_notebook(jp_fetch, "a.ipynb")
    pool = await get(jp_fetch, "harp", "api", "pool")
    assert pool["agents"][0]["reachable"] is False and pool["agents"][0]["error"]
    assert pool["summary"]["unreachable"] == 1 and pool["problem"]["kind"] == "AgentsUnreachable"
    code, body = await failing(jp_fetch, "harp", "api", "kernels", kernel_id, "lease",
                               method="POST")
    assert code == 503 and body["error"]["kind"] == "GPUUnavailable"
    assert "harp-agent" in body["error"]["message"] + body["error"]["hint"]
    # the kernel is still listed, with why it has no GPU
    listing = card(await get(jp_fetch, "harp", "api", "kernels"), kernel_id)
    assert listing["state"] == "none" and listing["message"]


@pytest.mark.harp_agents("auto")
async def test_no_agents_and_no_gpu_is_a_problem_with_what_to_do(
        jp_fetch: Callable[..., Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(local_agents, "count_gpus", lambda: 0)  # this machine's fact, stated
    for endpoint in ("kernels", "pool"):
        problem = (await get(jp_fetch, "harp", "api", endpoint))["problem"]
        assert problem["kind"] == "NoAgents" and "HARP_AGENTS" in problem["hint"]


async def test_a_kernels_latest_profile_reaches_the_sidebar(
        jp_fetch: Callable[..., Any], jp_serverapp: Any, events: list[dict[str, Any]]) -> None:
    kernel_id = await start_notebook(jp_fetch, "p.ipynb")
    code, body = await failing(jp_fetch, "harp", "api", "kernels", kernel_id, "profile")
    assert code == 404 and body["error"]["kind"] == "NoProfile"
    await run_cell(jp_serverapp, kernel_id, "%%harp profile\n" + GPU_CELL + "\n"
                   "for _ in range(5):\n    x = a.get()\n")
    profile = (await get(jp_fetch, "harp", "api", "kernels", kernel_id, "profile"))["profile"]
    assert profile["version"] == 1 and profile["at"] > 0
    assert any(a["op"] == "dtoh" and a["count"] == 5 for a in profile["advice"])
    assert any(e.get("name") == "thread_name" for e in profile["trace"]["traceEvents"])
    assert any(e.get("profile_at") == profile["at"] for e in events
               if e["kernel_id"] == kernel_id)
    listing = card(await get(jp_fetch, "harp", "api", "kernels"), kernel_id)
    assert listing["profile_at"] == profile["at"]  # the card offers "Latest profile"
