"""Kernel printf reaches the program's stdout at the next sync point, in order, as locally."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.timeout(300)
REPO = Path(__file__).resolve().parents[2]


def test_printf_of_a_kernel_appears_in_order_under_harp_run(gpu_agent: Any,
                                                             tmp_path: Path) -> None:
    script = tmp_path / "hello.py"
    script.write_text(textwrap.dedent("""\
        import numpy as np
        import pycuda.autoinit
        import pycuda.driver as cuda
        from pycuda.compiler import SourceModule
        hello = SourceModule('''
        #include <cstdio>
        __global__ void hello(int round)
        { if (threadIdx.x < 2) printf("kernel %d thread %d\\\\n", round, threadIdx.x); }
        ''').get_function("hello")
        for round in range(3):
            print("before", round, flush=True)
            hello(np.int32(round), block=(2, 1, 1), grid=(1, 1))
            cuda.Context.synchronize()
            print("after", round, flush=True)
    """))
    env = {k: v for k, v in os.environ.items() if not k.startswith("HARP_")}
    env.update(PYTHONPATH=str(REPO), HARP_AGENTS=gpu_agent.endpoint)
    done = subprocess.run([sys.executable, "-m", "harp_jupyter.cli", "run", str(script)],
                          env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    expected = []
    for round in range(3):
        expected += [f"before {round}", f"kernel {round} thread 0", f"kernel {round} thread 1",
                     f"after {round}"]
    assert sorted(lines[1:3]) == expected[1:3] and lines[0] == expected[0], lines
    assert [x for x in lines if x.startswith(("before", "after"))] == [
        x for x in expected if x.startswith(("before", "after"))]
    for round in range(3):  # each round's kernel lines come between its before and after
        i, j = lines.index(f"before {round}"), lines.index(f"after {round}")
        assert sorted(lines[i + 1:j]) == [f"kernel {round} thread 0", f"kernel {round} thread 1"]
