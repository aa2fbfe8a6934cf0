"""The Elastic GPU kernelspec as pip installs it (share/jupyter/kernels/elastic-gpu, with its
provisioner): a real ipykernel, driven by jupyter_client, runs pycuda cells on a real emulated agent
and keeps its CPU state when a GPU call fails."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.manager import start_new_kernel

REPO = Path(__file__).resolve().parents[2]
KERNEL_NAME = "elastic-gpu"
pytestmark = pytest.mark.timeout(120)


def run_cell(client: Any, code: str) -> tuple[str, str]:
    """(stdout text, error name or '') of one executed cell."""
    msg_id = client.execute(code)
    out, error = [], ""
    while True:
        msg = client.get_iopub_msg(timeout=60)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        kind, content = msg["msg_type"], msg["content"]
        if kind == "stream":
            out.append(content["text"])
        elif kind == "error":
            error = content["ename"]
        elif kind == "status" and content["execution_state"] == "idle":
            return "".join(out), error


def test_elastic_gpu_kernel_runs_pycuda_cells(emulated_agent: Any,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JUPYTER_PATH", str(REPO / "share" / "jupyter"))
    monkeypatch.setenv("PYTHONPATH", str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("HARP_AGENTS", emulated_agent.endpoint)
    manager, client = start_new_kernel(kernel_name=KERNEL_NAME)
    try:
        out, error = run_cell(client, "import numpy as np\nimport pycuda.autoinit\n"
                                      "import pycuda.gpuarray as ga\n"
                                      "a = ga.to_gpu(np.arange(10, dtype=np.float32))\n"
                                      "cpu_state = 42\n"
                                      "print(ga.sum(a * 2).get(), ga.__name__)")
        assert error == ""
        assert out.split() == ["90.0", "harp_jupyter.shim.pycuda.gpuarray"]
        _, error = run_cell(client, "from pycuda.compiler import SourceModule\n"
                                    "SourceModule('__global__ void k() {}').get_function('k')\n"
                                    "pycuda.autoinit.context.synchronize()")
        assert error == "NotSupportedError"
        out, error = run_cell(client, "print(cpu_state, a.get()[3])")
        assert (out.split(), error) == (["42", "3.0"], "")
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)
