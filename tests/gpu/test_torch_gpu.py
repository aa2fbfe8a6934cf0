"""harp tensors on a real GPU: the pycuda executor's worker runs CUDA torch in pycuda's primary
context; results against local CUDA torch on the same GPU (and pycuda beside torch in one
session). Needs torch with CUDA in this environment (the GPU machine's 2.11 + CUDA 13)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from harp_jupyter import shim  # noqa: E402
from harp_jupyter.shim.session import get_session, reset_session  # noqa: E402
from tests.integration.test_torch_parity import small_cnn, train  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.timeout(300),
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA torch")]


@pytest.fixture
def harp(gpu_agent: Any) -> Iterator[Any]:
    import harp_jupyter.torch  # noqa: F401 - registers the harp device

    reset_session()
    shim.activate(agent=gpu_agent.endpoint)
    try:
        yield gpu_agent
    finally:
        reset_session()
        shim.deactivate()


def test_the_agent_runs_cuda_torch(harp: Any) -> None:
    info = torch.harp.agent_torch()
    assert info["device"].startswith("cuda") and info["cuda"]
    assert "emulated" not in torch.harp.get_device_name()


def test_matmul_conv_and_random_match_local_cuda(harp: Any) -> None:
    torch.manual_seed(0)
    a = torch.randn(512, 512, device="harp")
    torch.manual_seed(0)
    local = torch.randn(512, 512, device="cuda")
    torch.testing.assert_close(a.cpu(), local.cpu())
    torch.testing.assert_close((a @ a).cpu(), (local @ local).cpu(), rtol=1e-3, atol=1e-3)
    image, kernel = torch.randn(8, 3, 32, 32), torch.randn(16, 3, 3, 3)
    torch.testing.assert_close(
        torch.nn.functional.conv2d(image.to("harp"), kernel.to("harp")).cpu(),
        torch.nn.functional.conv2d(image.cuda(), kernel.cuda()).cpu(), rtol=1e-3, atol=1e-3)


#: local CUDA training in a fresh interpreter: once harp is registered, torch makes it this
#: process's accelerator and autograd on cuda tensors here stops at an INTERNAL ASSERT
_LOCAL_TRAINING = """
import json, sys, torch
from tests.integration.test_torch_parity import small_cnn, train
model = small_cnn()
model.load_state_dict(torch.load(sys.argv[1]))
model.cuda()
print(json.dumps(train(model, torch.optim.Adam(model.parameters(), lr=1e-2), "cuda", 6)))
"""


def local_cuda_losses(state: dict[str, Any], tmp_path: Any) -> list[float]:
    path = tmp_path / "initial.pt"
    torch.save(state, path)
    done = subprocess.run([sys.executable, "-c", _LOCAL_TRAINING, str(path)],
                          capture_output=True, text=True, timeout=240,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    return list(json.loads(done.stdout.strip().splitlines()[-1]))


def test_training_matches_local_cuda_and_survives_a_park(harp: Any, tmp_path: Any) -> None:
    torch.manual_seed(3)
    remote = small_cnn()
    expected = local_cuda_losses(remote.state_dict(), tmp_path)
    remote.to("harp")
    remote_opt = torch.optim.Adam(remote.parameters(), lr=1e-2)
    data = torch.Generator().manual_seed(7)
    got = train(remote, remote_opt, "harp", 3, data)
    assert get_session().release()["bytes"] > 0
    got += train(remote, remote_opt, "harp", 3, data)
    assert got == pytest.approx(expected, rel=1e-3, abs=1e-5)


def test_cuda_autograd_beside_harp_is_named_when_cuda_starts() -> None:
    """The limit the training test steps around is told to the user when the process starts
    CUDA beside harp, and not to a process on this GPU machine that only registers harp."""
    def stderr_of(code: str) -> str:
        probe = subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True,
                               text=True, timeout=120,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert probe.returncode == 0, probe.stderr
        return probe.stderr

    warning = "device='harp' or device='cuda' in one process"
    assert warning not in stderr_of("import harp_jupyter.torch")
    assert warning in stderr_of("import harp_jupyter.torch, torch; torch.ones(1, device='cuda')")


def test_pycuda_and_torch_share_one_session(harp: Any) -> None:
    import importlib

    cuda = importlib.import_module("pycuda.driver")
    importlib.import_module("pycuda.autoinit")
    gpuarray = importlib.import_module("pycuda.gpuarray")
    import numpy as np

    array = gpuarray.to_gpu(np.arange(8, dtype=np.float32))
    tensor = torch.arange(8.0, device="harp")
    assert float((array * 2).get().sum()) == float((tensor * 2).sum().item())
    cuda.Context.synchronize()
