"""gpu_agent.nvcc_limits: the policy workers are started with, and the client's error for a
compile the launcher stopped (tests/integration/test_nvcc_sandbox.py runs the real nvcc)."""

from __future__ import annotations

import pytest

from gpu_agent.nvcc_limits import LIMIT_EXIT, LIMIT_MARK, NvccPolicy, limit_error


def test_the_policy_travels_to_workers_unchanged() -> None:
    policy = NvccPolicy("refuse", 12.5, 3 << 30, 40)
    assert NvccPolicy.parse(policy.to_arg()) == policy
    with pytest.raises(ValueError, match="unknown nvcc mode 'yolo'"):
        NvccPolicy.parse("yolo,1,1,1")


def test_only_the_launchers_limit_exit_is_a_limit_error() -> None:
    assert limit_error(1, b"kernel.cu(1): error: expected a ;") is None
    error = limit_error(LIMIT_EXIT, f"lots of output\n{LIMIT_MARK}the compile was stopped "
                                    "after 5 s of wall-clock time (harp-agent --nvcc-wall)\n")
    assert error is not None and error.kind == "CompileError"
    assert str(error).startswith("nvcc did not finish compiling your CUDA C: the compile was "
                                 "stopped after 5 s of wall-clock time (harp-agent --nvcc-wall)")
