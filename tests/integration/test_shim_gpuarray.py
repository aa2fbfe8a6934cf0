"""An unchanged pycuda gpuarray/cumath program through `harp run` against a real emulated agent."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

PROGRAMS = Path(__file__).resolve().parents[1] / "programs"
REPO = PROGRAMS.parents[1]


def load_expected() -> dict[str, np.ndarray]:
    spec = importlib.util.spec_from_file_location("expected", PROGRAMS / "expected.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.expected()


def harp_run(agent: str, script: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "harp_jupyter.cli", "run", "--agent", agent,
                           str(script), *args], capture_output=True, text=True, env=env,
                          timeout=120)


def errors_of(results: Any) -> dict[str, str]:
    return json.loads(str(results["_errors"]))


def check_against_numpy(results: Any, expected: dict[str, np.ndarray]) -> None:
    assert errors_of(results) == {}
    assert set(results.files) - {"_errors"} == set(expected)
    for name, want in expected.items():
        got = results[name]
        assert got.shape == np.shape(want), name
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6, err_msg=name)


def test_gpuarray_program_matches_numpy(emulated_agent: Any, tmp_path: Path) -> None:
    out = tmp_path / "results.npz"
    run = harp_run(emulated_agent.endpoint, PROGRAMS / "gpuarray_program.py", str(out))
    assert run.returncode == 0, run.stderr
    check_against_numpy(np.load(out), load_expected())


def test_user_kernels_on_emulated_agent_say_a_gpu_is_needed(emulated_agent: Any,
                                                           tmp_path: Path) -> None:
    script = tmp_path / "elementwise.py"
    script.write_text(
        "import numpy as np, pycuda.autoinit, pycuda.gpuarray as ga\n"
        "from pycuda.elementwise import ElementwiseKernel\n"
        "k = ElementwiseKernel('float *x', 'x[i] = 2 * x[i]', 'double_it')\n"
        "a = ga.to_gpu(np.ones(4, np.float32))\n"
        "k(a)\n"
        "print(a.get())\n")
    run = harp_run(emulated_agent.endpoint, script)
    assert run.returncode != 0
    assert "needs a real GPU" in run.stderr
    assert "elementwise.py:5" in run.stderr  # the call that failed


@pytest.mark.timeout(60)
def test_a_thousand_array_ops_make_no_round_trip_before_get(emulated_agent: Any) -> None:
    from harp_jupyter import shim
    from harp_jupyter.shim.session import get_session, reset_session

    reset_session()
    shim.activate(agent=emulated_agent.endpoint)
    try:
        import pycuda.autoinit  # noqa: F401
        import pycuda.gpuarray as gpuarray

        a = gpuarray.to_gpu(np.zeros(1000, np.float32))
        session = get_session()
        session.flush()
        before = session.sync_points
        for _ in range(1000):
            a += 1
        assert session.sync_points == before
        assert a.get()[0] == 1000
        assert session.sync_points == before + 1
    finally:
        reset_session()
        shim.deactivate()


def test_an_array_operation_looks_for_the_users_line_once(
        emulated_agent: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A result array sub-allocated in a chunk already mapped queues no ``alloc``, and its
    ``free`` none: the user's call site is looked for once per operation (the operation's own
    call), not for the allocation and the free too; an allocation that does map a chunk still
    carries the user's line."""
    from harp_jupyter import shim
    from harp_jupyter.shim import callsite, memory_calls
    from harp_jupyter.shim import session as session_module
    from harp_jupyter.shim.session import get_session, reset_session

    walks: list[Any] = []

    def counted(skip: int = 1) -> Any:
        site = callsite.user_call_site(skip + 1)
        walks.append(site)
        return site

    reset_session()
    shim.activate(agent=emulated_agent.endpoint)
    try:
        import pycuda.autoinit  # noqa: F401
        import pycuda.gpuarray as gpuarray

        a = gpuarray.to_gpu(np.ones(1000, np.float32))
        b = a - a  # the shared chunk is mapped now
        del b
        monkeypatch.setattr(memory_calls, "user_call_site", counted)
        monkeypatch.setattr(session_module, "user_call_site", counted)
        for _ in range(10):
            b = a - a
            del b
        assert len(walks) == 10
        assert {site[0] for site in walks} == {__file__}
        walks.clear()
        big = gpuarray.empty(1 << 22, np.float32)  # 16 MiB: chunks of its own, mapped now
        queued = get_session()
        assert [site[0] for site in walks] == [__file__]  # the alloc's, found when queued
        del big
        assert queued.lost is False
    finally:
        reset_session()
        shim.deactivate()


def test_structured_vector_arrays_travel_with_their_fields(emulated_agent: Any,
                                                           tmp_path: Path) -> None:
    script = tmp_path / "vec.py"
    script.write_text(
        "import numpy as np\nimport pycuda.autoinit\nimport pycuda.gpuarray as gpuarray\n"
        "a = gpuarray.empty(100, dtype=gpuarray.vec.float3)\n"
        "a.fill(gpuarray.vec.make_float3(0.0, 1.0, 2.0))\n"
        "host = a.get()\n"
        "assert host.dtype == gpuarray.vec.float3 and host[99]['z'] == 2.0\n"
        "b = gpuarray.to_gpu(host)\n"
        "c = b.copy()\n"
        "assert (c.get()['y'] == 1.0).all()\n"
        "print('vec ok')\n")
    done = harp_run(emulated_agent.endpoint, script)
    assert done.returncode == 0 and "vec ok" in done.stdout, done.stderr
