"""The docs that the code states are current: the module map and the README's bounds table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_module_map_and_bounds_table_match_the_code() -> None:
    done = subprocess.run([sys.executable, "scripts/docs_from_code.py", "--check"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_no_doc_points_outside_the_repository() -> None:
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        text = path.read_text()
        assert "../shared" not in text and ".device/" not in text, path
