"""``%%harp profile`` of harp tensor code against a real emulated agent (CPU torch in its
worker): aten operators by name at the user's lines on every track, and the advisor naming a
``.item()`` in a loop with what to do instead."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from harp_jupyter import shim  # noqa: E402
from harp_jupyter.profiler.display import ProfileResult  # noqa: E402
from harp_jupyter.profiler.profile import profiled  # noqa: E402
from harp_jupyter.shim.session import reset_session  # noqa: E402
from tests.integration.test_profiler import tracks, validate_trace  # noqa: E402

pytestmark = pytest.mark.timeout(180)

WORKLOAD = '''
import torch


def train(model, x, y, steps):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)  # the forward line
        loss.backward()  # the backward line
        optimizer.step()
        losses.append(loss.item())  # the line the advisor must name
    return losses


def tiny_ops(x, n):
    for _ in range(n):
        x = x + 1.0
    return x
'''


@pytest.fixture(scope="module")
def harp(module_emulated_agent: Any) -> Iterator[Any]:
    import harp_jupyter.torch as harp_torch

    shim.activate(agent=module_emulated_agent.endpoint)
    try:
        yield harp_torch
    finally:
        reset_session()
        shim.deactivate()


@pytest.fixture
def workload(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """The user's code in a real file, so call sites and source lines are real."""
    (tmp_path / "harp_torch_workload.py").write_text(WORKLOAD)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield importlib.import_module("harp_torch_workload")
    sys.modules.pop("harp_torch_workload", None)


def line_of(marker: str) -> int:
    return next(i for i, line in enumerate(WORKLOAD.splitlines(), start=1) if marker in line)


def test_a_training_loop_shows_aten_ops_at_the_users_lines_and_item_is_named(
        harp: Any, workload: ModuleType) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1).to("harp")
    x, y = torch.randn(32, 8).to("harp"), torch.randn(32, 1).to("harp")
    workload.train(model, x, y, 1)  # warm: the operators' layouts are inferred here

    losses, profile = profiled(lambda: workload.train(model, x, y, 6))
    assert len(losses) == 6 and losses[-1] < losses[0]
    result = ProfileResult(profile)
    validate_trace(result.trace)
    found = tracks(result.trace)

    forward, backward = line_of("the forward line"), line_of("the backward line")
    api = found["API calls"]
    at_forward = {e["name"] for e in api if e["args"]["at"].endswith(f"workload.py:{forward}")}
    at_backward = {e["name"] for e in api
                   if e["args"]["at"].endswith(f"workload.py:{backward}")}
    assert "aten::addmm" in at_forward and "aten::mse_loss" in at_forward, at_forward
    assert "aten::mse_loss_backward" in at_backward, at_backward
    assert not any("site-packages" in e["args"]["at"] or "harp_jupyter" in e["args"]["at"]
                   for e in api), "an operator placed at a line of torch or of harp"
    executed = {e["name"] for e in found["agent execution"]}
    assert {"aten::addmm", "aten::mse_loss_backward", "aten::_local_scalar_dense"} <= executed
    device = {e["name"] for t, events in found.items() if t.startswith("emulated device")
              for e in events}
    assert "aten::addmm" in device
    assert result.summary["top_kernels"] and all(
        k["name"].startswith("aten::") for k in result.summary["top_kernels"])

    top = result.advice[0]
    assert top["op"] == "aten::_local_scalar_dense", result.advice
    assert top["site"].endswith(f"harp_torch_workload.py:{line_of('the advisor must name')}")
    assert top["count"] == 6 and "losses.append(loss.item())" in top["code"]
    assert "`.item()`" in top["advice"] and "accumulate" in top["advice"]
    assert "aten::_local_scalar_dense" in result._text()


def test_frees_of_a_loop_of_small_operators_go_together(harp: Any,
                                                         workload: ModuleType) -> None:
    """Dead tensors are forgotten on the agent in groups of FREE_BATCH, not one call each."""
    from harp_jupyter.torch.client import FREE_BATCH

    x = torch.ones(16, device="harp")
    workload.tiny_ops(x, 2).sum().item()
    total, profile = profiled(lambda: workload.tiny_ops(x, 4 * FREE_BATCH).sum().item())
    assert total == 16 * (1 + 4 * FREE_BATCH)
    ops: dict[str, int] = {}
    for c in profile.recorder.calls:  # a record per run of calls of one op from one line
        ops[c.op] = ops.get(c.op, 0) + c.count
    assert ops["torch_op"] == 4 * FREE_BATCH + 1
    assert 1 <= ops["torch_free"] <= 5, ops["torch_free"]


def test_bytes_to_and_from_the_device_count_tensor_copies_and_item(harp: Any) -> None:
    """The profile's ↑/↓ figures count torch's traffic as they count pycuda's htod/dtoh: a
    copy up, a small host tensor inline in an operator, a copy down and an ``.item()``
    (whose value comes back in its reply), not 0 B."""
    host = torch.arange(64, dtype=torch.float32)

    def step() -> float:
        y = host.to("harp")  # 256 B up (torch_write)
        z = y + torch.ones(())  # a 0-d host tensor: 4 B inline in the operator's call
        assert torch.equal(z.cpu(), host + 1)  # 256 B down (torch_download)
        return z.sum().item()  # 4 B down: one float32

    step()  # warm: the operators' layouts are inferred here
    total, profile = profiled(step)
    assert total == float((host + 1).sum())
    summary = ProfileResult(profile).summary
    assert summary["bytes_up"] == 256 + 4, summary
    assert summary["bytes_down"] == 256 + 4, summary
