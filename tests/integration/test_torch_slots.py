"""harp tensors share their session's GPU slot with pycuda allocations: the slot's memory cap
bounds them and the agent reports them in the session's device bytes (a real emulated agent with
two slots; CPU torch in its worker, the cap enforced as on a GPU)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from harp_jupyter import shim  # noqa: E402
from harp_jupyter.magics import lease_status  # noqa: E402
from harp_jupyter.shim.session import reset_session  # noqa: E402
from tests.agent_client import RawClient, wait_for  # noqa: E402

pytestmark = pytest.mark.timeout(180)

MiB = 1 << 20
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def slotted_agent(agent_starter: Any) -> Iterator[Any]:
    import harp_jupyter.torch  # noqa: F401 - registers the harp device

    agent = agent_starter("--slots", "2", "--slot-memory", "64MiB")
    reset_session()
    shim.activate(agent=agent.endpoint)
    try:
        yield agent
    finally:
        reset_session()
        shim.deactivate()


def session_bytes(agent: Any, field: str = "device_bytes") -> int:
    observer = RawClient(agent.endpoint)
    try:
        sessions = observer.status()["leases"]["sessions"]
        return sum(s[field] for s in sessions)
    finally:
        observer.close()


def test_tensors_count_against_the_slot_and_in_device_bytes(slotted_agent: Any) -> None:
    import harp_jupyter.torch as harp_torch

    big = torch.ones(40 * MiB // 4, device="harp")
    assert big.sum().item() == 40 * MiB // 4
    assert torch.harp.memory_allocated() == 40 * MiB
    wait_for(lambda: session_bytes(slotted_agent) == 40 * MiB, 20,
             "the session's device bytes to include its tensors")
    # apart, for the lease state: the kernel's allocator knows none of them (the sidebar and
    # %harp status showed a model on "harp" as 0 B in use)
    wait_for(lambda: session_bytes(slotted_agent, "object_bytes") == 40 * MiB, 20,
             "the session's object bytes to be its tensors")
    assert lease_status()["memory_allocated"] == 40 * MiB
    with pytest.raises(harp_torch.HarpTorchError, match=r"GPU slot's 64.0 MiB") as failure:
        (big * 2).sum().item()  # 40 MiB more: past the 64 MiB slot
    assert failure.value.kind == "MemoryError"
    del big
    again = torch.ones(48 * MiB // 4, device="harp")  # the freed tensor's room is back
    assert again.sum().item() == 48 * MiB // 4
    assert torch.harp.memory_allocated() == 48 * MiB
    wait_for(lambda: session_bytes(slotted_agent) == 48 * MiB, 20, "device bytes to follow")


def test_cpu_autograd_before_harp_is_registered_leaves_harp_autograd_working(
        module_emulated_agent: Any) -> None:
    """torch sizes its autograd device threads at a process's first backward: one that ran
    before harp existed once left harp's backward an INTERNAL ASSERT in engine.cpp."""
    code = textwrap.dedent(f"""
        import torch
        w = torch.ones(3, requires_grad=True)
        (w * 2).sum().backward()  # the process's first backward, before harp exists
        from harp_jupyter import shim
        shim.activate(agent={module_emulated_agent.endpoint!r})
        import harp_jupyter.torch
        v = torch.ones(3, device="harp", requires_grad=True)
        (v * 3).sum().backward()
        print(v.grad.cpu().tolist())
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[3.0, 3.0, 3.0]"


def test_the_harp_device_needs_no_import_and_cuda_errors_name_it(
        module_emulated_agent: Any) -> None:
    """What the Elastic GPU kernel (harp_jupyter.magics) and harp run install before user code."""
    code = textwrap.dedent(f"""
        from harp_jupyter import shim, torch_hook
        shim.activate(agent={module_emulated_agent.endpoint!r})
        torch_hook.install()
        import torch
        print(torch.ones(3, device="harp").sum().item())
        try:
            torch.ones(3, device="cuda")
        except RuntimeError as e:
            print(type(e).__name__, e)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    first, error = done.stdout.strip().splitlines()[-2:]
    assert first == "3.0"
    assert error.startswith("HarpCudaError") and 'Write device="harp"' in error


def test_in_place_storage_changes_move_the_booking(slotted_agent: Any) -> None:
    """``set_`` and an ``out=`` resized to a size known from the data give a tensor another
    storage on the agent; its booking follows, so the old storage's bytes come back (they
    were once kept until the session ended, and repeated resizes filled the slot)."""
    x = torch.ones(2 * MiB + 1, dtype=torch.bool, device="harp")  # more nonzeros than y holds
    for _ in range(6):  # 16 MiB each: a booking kept per round fills the 64 MiB slot by four
        y = torch.empty(2 * MiB, 1, dtype=torch.long, device="harp")
        with pytest.raises(NotImplementedError, match=r"resized its out= tensor"):
            torch.nonzero(x, out=y)
        del y
    assert torch.harp.memory_allocated() == x.numel()
    a = torch.zeros(MiB, device="harp")
    b = torch.ones(MiB, device="harp")
    a.set_(b)
    del b
    assert a.sum().item() == MiB
    assert torch.harp.memory_allocated() == x.numel() + 4 * MiB  # a's first storage is gone
    del a
    assert torch.harp.memory_allocated() == x.numel()
    del x
    assert torch.harp.memory_allocated() == 0
