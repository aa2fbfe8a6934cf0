"""`harp run script.py args...` against a real emulated agent: argv, exit codes, tracebacks."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[2]


def harp(*args: str, agent_env: str | None = None, cwd: Path | None = None,
         timeout: float = 40) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HARP_")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["HARP_AGENT_TIMEOUT"] = "5"
    if agent_env is not None:
        env["HARP_AGENT"] = agent_env
    return subprocess.run([sys.executable, "-m", "harp_jupyter.cli", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def write(path: Path, source: str) -> Path:
    path.write_text(textwrap.dedent(source))
    return path


ROUND_TRIP = """\
    import sys
    import numpy as np
    import pycuda.autoinit
    import pycuda.driver as cuda

    data = np.arange(256, dtype=np.float32)
    dev = cuda.to_device(data)
    assert np.array_equal(cuda.from_device_like(dev, data), data)
    print("argv", sys.argv)
    print("main", __name__, "device", pycuda.autoinit.device.name())
    sys.exit(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
"""


def test_script_runs_like_python_would_with_argv_and_exit_code(
        emulated_agent: Any, tmp_path: Path) -> None:
    script = write(tmp_path / "job.py", ROUND_TRIP)
    done = harp("run", "--agent", emulated_agent.endpoint, str(script), "0", "--flag", "x")
    assert done.returncode == 0, done.stderr
    assert f"argv {[str(script), '0', '--flag', 'x']}" in done.stdout
    assert "main __main__ device" in done.stdout
    failed = harp("run", "--agent", emulated_agent.endpoint, str(script), "3")
    assert failed.returncode == 3, failed.stderr


def test_agent_from_harp_agent_and_script_dir_on_sys_path(
        emulated_agent: Any, tmp_path: Path) -> None:
    write(tmp_path / "helper.py", "VALUE = 42\n")
    script = write(tmp_path / "uses_helper.py", """\
        import helper
        import pycuda.driver as cuda
        print("helper", helper.VALUE, "free", cuda.mem_get_info()[0] > 0)
    """)
    done = harp("run", str(script), agent_env=emulated_agent.endpoint, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert "helper 42 free True" in done.stdout


def test_uncaught_error_traceback_points_at_the_script(
        emulated_agent: Any, tmp_path: Path) -> None:
    script = write(tmp_path / "bad.py", """\
        import pycuda.autoinit
        import pycuda.driver as cuda
        from gpu_agent.protocol import GRANULARITY

        cuda.mem_alloc(pycuda.autoinit.device.total_memory() + GRANULARITY)
    """)
    done = harp("run", "--agent", emulated_agent.endpoint, str(script))
    assert done.returncode == 1
    assert f'File "{script}", line 5, in <module>' in done.stderr
    assert "MemoryError" in done.stderr and f"{script}:5" in done.stderr
    assert "runpy" not in done.stderr and "harp_jupyter/cli.py" not in done.stderr


def test_deferred_error_names_the_line_that_caused_it(
        emulated_agent: Any, tmp_path: Path) -> None:
    script = write(tmp_path / "deferred.py", """\
        import pycuda.autoinit
        import pycuda.driver as cuda
        from harp_jupyter.shim.session import get_session

        base, size = get_session().address_range
        cuda.memset_d32(base + size - 4096, 7, 4)
        print("returned at once")
        cuda.Context.synchronize()
    """)
    done = harp("run", "--agent", emulated_agent.endpoint, str(script))
    assert done.returncode == 1
    assert "returned at once" in done.stdout
    assert f'File "{script}", line 8' in done.stderr  # raised at the sync point...
    assert f"raised by memset at {script}:6" in done.stderr  # ...naming the call that failed


def test_no_agent_configured_is_a_clear_error(tmp_path: Path) -> None:
    script = write(tmp_path / "needs_gpu.py", """\
        import pycuda.autoinit  # importing does not need the agent
        import pycuda.driver as cuda
        print("imported")
        cuda.mem_alloc(16)
    """)
    done = harp("run", str(script))
    assert done.returncode == 1
    assert "imported" in done.stdout
    assert "HARP_AGENT" in done.stderr and "AgentNotConfiguredError" in done.stderr


def test_missing_script_and_help(tmp_path: Path) -> None:
    missing = harp("run", str(tmp_path / "nope.py"))
    assert missing.returncode == 2 and "nope.py" in missing.stderr
    usage = harp("--help")
    assert usage.returncode == 0 and "run" in usage.stdout
    run_usage = harp("run", "--help")
    assert run_usage.returncode == 0 and "--agent" in run_usage.stdout
