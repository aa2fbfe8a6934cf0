"""pycuda, forwarded to a remote GPU agent by HARP (imported as ``pycuda`` while the shim is
active; see harp_jupyter.shim)."""

from __future__ import annotations

VERSION = (2026, 1)
VERSION_STATUS = ""
VERSION_TEXT = ".".join(str(x) for x in VERSION) + VERSION_STATUS

#: lets code tell the shim from a local pycuda
HARP_FORWARDED = True
