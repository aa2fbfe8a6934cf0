"""Issue 12's tail on a real GPU, against local pycuda: cuRAND generators (same numbers for the
same seeds and calls), a ReductionKernel over a registered struct dtype, vector-type kernel
arguments and vec fills, DynamicModule / DynamicSourceModule (dynamic parallelism).
tests/programs/pycuda_tail_program.py runs once with local pycuda, once through the shim."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

PROGRAM = Path(__file__).resolve().parents[1] / "programs" / "pycuda_tail_program.py"
REPO = PROGRAM.parents[2]


def _harp_run(agent: str, out: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "harp_jupyter.cli", "run", "--agent", agent,
                           str(PROGRAM), str(out)], capture_output=True, text=True, env=env,
                          timeout=600)


def _results(path: Path) -> tuple[Any, dict[str, str]]:
    data = np.load(path)
    return data, json.loads(str(data["_errors"]))


def test_the_tail_of_issue_12_matches_local_pycuda(gpu_agent: Any, tmp_path: Path) -> None:
    forwarded, local = tmp_path / "forwarded.npz", tmp_path / "local.npz"
    plain = subprocess.run([sys.executable, str(PROGRAM), str(local)], capture_output=True,
                           text=True, timeout=600, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert plain.returncode == 0, plain.stderr
    run = _harp_run(gpu_agent.endpoint, forwarded)
    assert run.returncode == 0, run.stderr
    local_results, local_errors = _results(local)
    shim_results, shim_errors = _results(forwarded)
    assert local_errors == {}, local_errors  # local pycuda does all of it on this GPU
    assert shim_errors == {}, "\n".join(shim_errors.values())
    assert set(shim_results.files) == set(local_results.files)
    for name in sorted(set(local_results.files) - {"_errors"}):
        # same seeds, same generator, same kernels: the same bits, not merely close
        np.testing.assert_array_equal(shim_results[name], local_results[name], err_msg=name)
    np.testing.assert_array_equal(shim_results["struct_reduce"],
                                  shim_results["struct_reduce_expected"])
    np.testing.assert_array_equal(shim_results["prepared_vector"], [3, 4, 5])
    np.testing.assert_array_equal(shim_results["vector_fill"], np.tile([1, 2, 3], 100))
    np.testing.assert_array_equal(shim_results["dynamic_source"], np.arange(16))
    np.testing.assert_array_equal(shim_results["dynamic_linked"], 7 * np.arange(8))
