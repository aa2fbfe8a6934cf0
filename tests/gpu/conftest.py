"""tests/gpu: real GPU, pycuda executor. Skipped, visibly, on machines without pycuda and a GPU."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest


def _why_no_gpu() -> str | None:
    # asked in a child process so this test process never imports the real pycuda (the shim
    # must be what `import pycuda` finds here)
    probe = subprocess.run(
        [sys.executable, "-c",
         "from gpu_agent.executors import gpu_available; print(gpu_available(0) or '')"],
        capture_output=True, text=True, timeout=120)
    if probe.returncode != 0:
        return probe.stderr.strip().splitlines()[-1] if probe.stderr.strip() else "probe failed"
    return probe.stdout.strip() or None


_WHY_NOT = _why_no_gpu()


def pytest_collection_modifyitems(config: Any, items: list[Any]) -> None:
    for item in items:
        if "tests/gpu/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.gpu)
            if _WHY_NOT is not None:
                item.add_marker(pytest.mark.skip(reason=f"needs a GPU: {_WHY_NOT}"))
