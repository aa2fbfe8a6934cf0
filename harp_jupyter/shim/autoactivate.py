"""Activate the shim when a Python process starts with HARP_SHIM=1 (the agent from HARP_AGENT).

Hooked at interpreter start-up by ``harp_shim.pth`` (next to this file; the wheel installs it at
the top of site-packages), whose one line is::

    import os; os.environ.get("HARP_SHIM") == "1" and __import__("harp_jupyter.shim.autoactivate")

so that processes without HARP_SHIM=1 import nothing of ours.
"""

from __future__ import annotations

import os

if os.environ.get("HARP_SHIM") == "1":
    from harp_jupyter.shim import activate

    activate()
