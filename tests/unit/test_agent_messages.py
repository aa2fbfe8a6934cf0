"""The agent's words to the people behind its clients: it cannot tell a notebook from a script,
so nothing it says may assume cells; byte counts read as sizes."""

from __future__ import annotations

import pytest

from gpu_agent.batches import _context_lost_message
from gpu_agent.tenants import lost_message


@pytest.mark.parametrize("text", [
    _context_lost_message("an illegal memory access was encountered"),
    lost_message("its GPU worker process died (exit code -9, killed by a signal)"),
    lost_message("the agent shut down", parked=False),
])
def test_a_lost_session_says_what_to_do_to_a_notebook_and_a_script_alike(text: str) -> None:
    assert "re-run the code that creates your device arrays" in text
    assert "cell" not in text and "notebook" not in text and "kernel's" not in text
