"""nvcc under the agent's Landlock sandbox (gpu_agent/nvcc_sandbox.py): the real nvcc compiles a
kernel with the toolkit's headers, but cannot open the agent's other files, however a source
names them. Needs nvcc on PATH and a kernel with Landlock (no GPU: it compiles for sm_80)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gpu_agent import nvcc_sandbox

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc on PATH"),
    pytest.mark.skipif(nvcc_sandbox.abi_version() < 1, reason="needs Linux Landlock"),
]


def _nvcc(tmp_path: Path, source: str) -> subprocess.CompletedProcess[str]:
    work, scratch = tmp_path / "work", tmp_path / "tmp"
    work.mkdir()
    scratch.mkdir()
    (work / "kernel.cu").write_text(source)
    command = nvcc_sandbox.sandboxed(["nvcc", "--cubin", "-arch", "sm_80", "kernel.cu"],
                                     str(work), str(scratch))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run(command, cwd=work, capture_output=True, text=True, env=env,
                          timeout=240)


def test_a_kernel_with_toolkit_headers_compiles(tmp_path: Path) -> None:
    done = _nvcc(tmp_path, "#include <cuda_fp16.h>\n#include <cstdint>\n"
                           'extern "C" __global__ void k(__half *x) { x[0] = __float2half(1); }')
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "work" / "kernel.cubin").stat().st_size > 0


def test_an_include_of_another_file_is_denied_even_through_a_macro(tmp_path: Path) -> None:
    secret = tmp_path / "secret.h"
    secret.write_text("this text must not come back\n")
    done = _nvcc(tmp_path, f'#define WHERE "{secret}"\n#include WHERE\n'
                           'extern "C" __global__ void k(float *x) { x[0] = 1; }')
    assert done.returncode != 0
    assert "Permission denied" in done.stderr
    assert "must not come back" not in done.stdout + done.stderr


def test_the_sandbox_cannot_write_outside_its_directories(tmp_path: Path) -> None:
    work, scratch, target = tmp_path / "work", tmp_path / "scratch", tmp_path / "written"
    work.mkdir()
    scratch.mkdir()
    command = nvcc_sandbox.sandboxed(["sh", "-c", f"echo x > {target}; echo y > ok"],
                                     str(work), str(scratch))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(command, cwd=work, capture_output=True, text=True, env=env,
                          timeout=60)
    assert "Permission denied" in done.stderr and not target.exists()
    assert (work / "ok").read_text() == "y\n"  # its own directory stays writable
