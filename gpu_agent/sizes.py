"""Byte counts as people read them (``4.0 GiB``), for the agent's start-up lines, logs and
error messages; machine-readable replies (status, metrics) keep plain integers."""

from __future__ import annotations

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def format_bytes(n: float) -> str:
    """``512 B``, ``1.5 KiB``, ``11.8 GiB``: binary units, one decimal from KiB on."""
    for unit in _UNITS:
        if abs(n) < 1024 or unit == _UNITS[-1]:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
