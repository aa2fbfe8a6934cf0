"""The docs that the code states are current: the module map and the README's bounds table, and
its claim that tests cross every bound."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from gpu_agent.limits import AgentLimits

REPO = Path(__file__).resolve().parents[2]


def test_module_map_and_bounds_table_match_the_code() -> None:
    done = subprocess.run([sys.executable, "scripts/docs_from_code.py", "--check"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_no_doc_points_outside_the_repository() -> None:
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        text = path.read_text()
        assert "../shared" not in text and ".device/" not in text, path


def test_every_bound_is_named_by_a_test() -> None:
    """The README says tests cross every bound: a flag added to gpu_agent/limits.py that no
    test names (``--flag`` in a unit, integration or GPU test) fails here, until one does.
    Naming is what can be checked here; that the test crosses the bound is for its review."""
    here = Path(__file__).resolve()
    texts = [path.read_text() for folder in ("unit", "integration", "gpu")
             for path in sorted((REPO / "tests" / folder).rglob("*.py")) if path != here]
    untested = [flag for flag in (f"--{name.replace('_', '-')}" for name, _ in
                                  AgentLimits.flags())
                if not any(re.search(re.escape(flag) + r"(?![\w-])", text) for text in texts)]
    assert not untested, f"no test crosses these bounds: {untested}"
