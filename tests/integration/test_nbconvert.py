"""Notebooks executed headless on the Elastic GPU kernel, as CI runs them: `jupyter nbconvert
--to notebook --execute` and papermill (with a parameter), against a real emulated agent named by
HARP_AGENTS; the executed notebooks' outputs are checked, and so is the example notebook that
scripts/run copies into notebooks/."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

pytestmark = pytest.mark.timeout(180)

REPO = Path(__file__).resolve().parents[2]
PARAMETERS = "n = 10"
GPU_MATH = ("import numpy as np\n"
            "import pycuda.autoinit\n"
            "import pycuda.cumath as cumath\n"
            "import pycuda.gpuarray as gpuarray\n"
            "a = gpuarray.to_gpu(np.arange(n, dtype=np.float32))\n"
            "print('sum', gpuarray.sum(a * 2 + 1).get())\n"
            "print('sqrt', cumath.sqrt(a).get()[4])")


def gpu_notebook(path: Path) -> Path:
    notebook = new_notebook(cells=[new_code_cell(PARAMETERS, metadata={"tags": ["parameters"]}),
                                   new_code_cell(GPU_MATH), new_code_cell("%harp status")])
    notebook.metadata["kernelspec"] = {"name": "elastic-gpu", "display_name": "Elastic GPU",
                                       "language": "python"}
    nbformat.write(notebook, path)
    return path


def headless_env(agents: str, variable: str = "HARP_AGENTS") -> dict[str, str]:
    """The environment a CI job has: the agents in HARP_AGENTS, the repo's Elastic GPU
    kernelspec on JUPYTER_PATH, nothing of a running lab."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HARP_", "JPY_"))}
    env.update(JUPYTER_PATH=str(REPO / "share" / "jupyter"),
               PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
    env[variable] = agents
    return env


def run(argv: list[str], env: dict[str, str], cwd: Path) -> None:
    done = subprocess.run([sys.executable, "-m", *argv], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=150)
    assert done.returncode == 0, f"{argv[0]} failed:\n{done.stdout}\n{done.stderr}"


def outputs_text(path: Path) -> list[str]:
    """Each code cell's outputs as one text (streams and text/plain results)."""
    texts = []
    for cell in nbformat.read(path, as_version=4).cells:
        if cell.cell_type != "code":
            continue
        assert not [o for o in cell.outputs if o.output_type == "error"], cell.outputs
        texts.append("".join(o.get("text", "") or o.get("data", {}).get("text/plain", "")
                             for o in cell.outputs))
    return texts


# HARP_AGENT: the deprecated spelling still finds the agent (with a warning), as a CI job
# written for it expects
@pytest.mark.parametrize("variable", ["HARP_AGENTS", "HARP_AGENT"])
def test_nbconvert_executes_a_gpuarray_notebook(module_emulated_agent: Any, tmp_path: Path,
                                                variable: str) -> None:
    source = gpu_notebook(tmp_path / "gpu-math.ipynb")
    run(["jupyter", "nbconvert", "--to", "notebook", "--execute", source.name,
         "--output", "executed.ipynb"], headless_env(module_emulated_agent.endpoint, variable),
        tmp_path)
    _, math, status = outputs_text(tmp_path / "executed.ipynb")
    assert math.split() == ["sum", "100.0", "sqrt", "2.0"]
    assert "state: held" in status and module_emulated_agent.endpoint in status


def test_papermill_executes_it_with_a_parameter(module_emulated_agent: Any,
                                                tmp_path: Path) -> None:
    source = gpu_notebook(tmp_path / "gpu-math.ipynb")
    run(["papermill", source.name, "executed.ipynb", "-p", "n", "100", "-k", "elastic-gpu"],
        headless_env(module_emulated_agent.endpoint), tmp_path)
    texts = outputs_text(tmp_path / "executed.ipynb")
    assert texts[-2].split() == ["sum", "10000.0", "sqrt", "2.0"]  # sum(2i + 1), i < 100
    assert "state: held" in texts[-1]


def test_the_example_notebook_runs_headless(module_emulated_agent: Any, tmp_path: Path) -> None:
    example = REPO / "examples" / "first-steps.ipynb"
    run(["jupyter", "nbconvert", "--to", "notebook", "--execute", str(example),
         "--output-dir", str(tmp_path)], headless_env(module_emulated_agent.endpoint), tmp_path)
    texts = outputs_text(tmp_path / example.name)
    assert len(texts[0].split()) == 2  # sum and max of the first cell
    assert "state: held" in texts[1]
