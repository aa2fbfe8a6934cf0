"""Byte counts in the agent's lines and messages read as people write them."""

from __future__ import annotations

import pytest

from gpu_agent.sizes import format_bytes


@pytest.mark.parametrize(("n", "text"), [
    (0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536, "1.5 KiB"), (2 << 20, "2.0 MiB"),
    (4294967296, "4.0 GiB"), (12637995008, "11.8 GiB"), (52519366656, "48.9 GiB"),
    (3 << 40, "3.0 TiB"), (5 << 50, "5120.0 TiB"),
])
def test_format_bytes(n: int, text: str) -> None:
    assert format_bytes(n) == text
