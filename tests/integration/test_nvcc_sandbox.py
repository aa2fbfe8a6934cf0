"""nvcc under the agent's Landlock sandbox (gpu_agent/nvcc_sandbox.py): the real nvcc compiles a
kernel with the toolkit's headers, but cannot open the agent's other files, however a source
names them, and a compile that runs away (a template bomb) ends at a limit of
gpu_agent/nvcc_limits.py as a clear error. Needs nvcc on PATH and a kernel with Landlock (no
GPU: it compiles for sm_80). The same through a real agent: tests/gpu/test_nvcc_limits_gpu.py."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gpu_agent import nvcc_limits, nvcc_sandbox
from gpu_agent.nvcc_limits import NvccPolicy
from tests.shim_sessions import eventually

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc on PATH"),
    pytest.mark.skipif(nvcc_sandbox.abi_version() < 1, reason="needs Linux Landlock"),
]


#: a template that instantiates itself 2**40 times: cudafe++ runs until something stops it
TEMPLATE_BOMB = """
template <int N, int M> struct B {
    static const int v = B<N - 1, 2 * M>::v + B<N - 1, 2 * M + 1>::v;
};
template <int M> struct B<0, M> { static const int v = M; };
extern "C" __global__ void k(int *x) { x[0] = B<40, 1>::v; }
"""


def _nvcc(tmp_path: Path, source: str, policy: NvccPolicy = nvcc_limits.DEFAULT_POLICY
          ) -> subprocess.CompletedProcess[str]:
    work, scratch = tmp_path / "work", tmp_path / "tmp"
    work.mkdir()
    scratch.mkdir()
    (work / "kernel.cu").write_text(source)
    return _run(["nvcc", "--cubin", "-arch", "sm_80", "kernel.cu"], work, scratch, policy)


def _run(cmdline: list[str], work: Path, scratch: Path,
         policy: NvccPolicy = nvcc_limits.DEFAULT_POLICY) -> subprocess.CompletedProcess[str]:
    command = nvcc_sandbox.sandboxed(cmdline, str(work), str(scratch), policy)
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


# {{{ limits (gpu_agent/nvcc_limits.py)


def _limit_hit(done: subprocess.CompletedProcess[str], flag: str) -> str:
    """The client's error for a compile the launcher stopped at the limit ``flag`` names."""
    assert done.returncode == nvcc_limits.LIMIT_EXIT, done.stderr[-2000:]
    error = nvcc_limits.limit_error(done.returncode, done.stderr)
    assert error is not None and error.kind == "CompileError"
    assert f"harp-agent {flag}" in str(error), str(error)
    assert "ask the agent's operator to raise the limit" in str(error)
    return str(error)


def test_a_template_bomb_ends_at_the_memory_limit(tmp_path: Path) -> None:
    done = _nvcc(tmp_path, TEMPLATE_BOMB, NvccPolicy(memory=1 << 30))
    message = _limit_hit(done, "--nvcc-memory")
    assert "1.0 GiB of memory each of its processes may use" in message


def test_a_template_bomb_ends_at_the_cpu_limit(tmp_path: Path) -> None:
    done = _nvcc(tmp_path, TEMPLATE_BOMB, NvccPolicy(cpu_seconds=2, memory=4 << 30))
    assert "2 s of CPU time" in _limit_hit(done, "--nvcc-cpu")


def test_a_compile_past_the_wall_clock_limit_is_stopped_with_its_processes(
        tmp_path: Path) -> None:
    work, scratch = tmp_path / "work", tmp_path / "tmp"
    work.mkdir()
    scratch.mkdir()
    # a stand-in for a compiler that waits on something forever, using no CPU
    done = _run(["sh", "-c", "echo $$ > pid; exec sleep 3600"], work, scratch,
                NvccPolicy(wall_seconds=1))
    assert "1 s of wall-clock time" in _limit_hit(done, "--nvcc-wall")
    pid = int((work / "pid").read_text())
    eventually(lambda: not Path(f"/proc/{pid}").exists() or
               Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z")


def test_an_endless_include_loop_is_an_ordinary_compile_error(tmp_path: Path) -> None:
    done = _nvcc(tmp_path, '#include "kernel.cu"\n'
                           'extern "C" __global__ void k(float *x) { x[0] = 1; }')
    assert done.returncode not in (0, nvcc_limits.LIMIT_EXIT)
    assert "nested depth" in done.stderr  # the preprocessor's own bound says what happened


def test_a_compiles_output_is_kept_to_a_bound(tmp_path: Path) -> None:
    work, scratch = tmp_path / "work", tmp_path / "tmp"
    work.mkdir()
    scratch.mkdir()
    done = _run(["sh", "-c", "yes error | head -c 3000000 >&2; exit 1"], work, scratch)
    assert done.returncode == 1
    assert len(done.stderr) < nvcc_limits.MAX_OUTPUT + 200
    assert "more of nvcc's output not shown" in done.stderr


# }}}
