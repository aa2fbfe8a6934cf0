"""harp-agent --client-cuda-source: the operator's choice of how clients' CUDA C is compiled,
said at start (loudly for the unsafe one) and handed to every worker. What each choice does to a
SourceModule needs nvcc and a GPU: tests/gpu/test_nvcc_limits_gpu.py."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.timeout(120)


def _start_line(agent: Any, text: str) -> list[str]:
    return [line for line in agent.output if text in line]


def test_the_unsafe_choice_is_named_and_warned_about_at_start(agent_starter: Any) -> None:
    agent = agent_starter("--client-cuda-source", "unsafe-unsandboxed", "--nvcc-wall", "30")
    warning = _start_line(agent, "WARNING: --client-cuda-source unsafe-unsandboxed")
    assert warning and "WITHOUT the Landlock sandbox" in warning[0]
    assert "only where every client is trusted" in warning[0]


def test_the_default_is_sandboxed_and_says_nothing(agent_starter: Any) -> None:
    agent = agent_starter()
    assert not _start_line(agent, "--client-cuda-source")


def test_refuse_is_said_at_start(agent_starter: Any) -> None:
    agent = agent_starter("--client-cuda-source", "refuse")
    assert _start_line(agent, "CUDA C from clients is refused (--client-cuda-source refuse)")


def test_an_unknown_choice_stops_the_agent_with_the_choices() -> None:
    done = subprocess.run([sys.executable, "-m", "gpu_agent.cli", "--listen",
                           "tcp://127.0.0.1:0", "--client-cuda-source", "whatever"],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 2
    assert "sandboxed" in done.stderr and "unsafe-unsandboxed" in done.stderr
