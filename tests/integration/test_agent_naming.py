"""One way to name the agents: HARP_AGENTS (and `harp run --agents`); the old HARP_AGENT still
works, with one warning line, for the kernel's provisioner and for `harp run`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from provisioner import settings

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[2]
SCRIPT = ("import numpy as np, pycuda.autoinit, pycuda.gpuarray as ga\n"
          "print(ga.sum(ga.to_gpu(np.arange(4.0)) * 2).get())\n")


def harp_run(tmp_path: Path, *args: str, **env_vars: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "sums.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HARP_")}
    env.update(PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
               HARP_AGENT_TIMEOUT="5", **env_vars)
    return subprocess.run([sys.executable, "-m", "harp_jupyter.cli", "run", *args, str(script)],
                          env=env, capture_output=True, text=True, timeout=40)


def test_settings_read_harp_agents_then_the_deprecated_spelling(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(settings, "_warned_deprecated_agent", False)
    assert settings.agents_from_environment({"HARP_AGENTS": "tcp://a:1,tcp://b:2"}) == \
        "tcp://a:1,tcp://b:2"
    assert settings.agents_from_environment({}) == "auto"
    assert not caplog.records
    both = {"HARP_AGENTS": "tcp://a:1", "HARP_AGENT": "tcp://old:1"}
    assert settings.agents_from_environment(both) == "tcp://a:1"
    with caplog.at_level("WARNING", logger="harp"):
        assert settings.agents_from_environment({"HARP_AGENT": "tcp://old:1"}) == "tcp://old:1"
        assert settings.agents_from_environment({"HARP_AGENT": "tcp://old:1"}) == "tcp://old:1"
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == ["harp: HARP_AGENT is deprecated: set HARP_AGENTS=tcp://old:1 instead"]


def test_harp_run_takes_agents_from_the_option_or_harp_agents(module_emulated_agent: Any,
                                                              tmp_path: Path) -> None:
    endpoint = module_emulated_agent.endpoint
    by_option = harp_run(tmp_path, "--agents", endpoint)
    assert (by_option.returncode, by_option.stdout.strip()) == (0, "12.0"), by_option.stderr
    by_variable = harp_run(tmp_path, HARP_AGENTS=endpoint)
    assert (by_variable.returncode, by_variable.stdout.strip()) == (0, "12.0"), by_variable.stderr
    assert "deprecated" not in by_option.stderr + by_variable.stderr


def test_harp_run_accepts_the_deprecated_harp_agent_with_one_warning(module_emulated_agent: Any,
                                                                     tmp_path: Path) -> None:
    done = harp_run(tmp_path, HARP_AGENT=module_emulated_agent.endpoint)
    assert (done.returncode, done.stdout.strip()) == (0, "12.0"), done.stderr
    warnings = [line for line in done.stderr.splitlines() if "deprecated" in line]
    assert warnings == ["harp run: HARP_AGENT is deprecated: set HARP_AGENTS="
                        f"{module_emulated_agent.endpoint} instead"]
