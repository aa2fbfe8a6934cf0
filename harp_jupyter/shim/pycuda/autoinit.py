"""pycuda.autoinit, forwarded: ``device`` and ``context`` for device 0 of the agent.

Importing it does not contact the agent: the first GPU call does.
"""

from __future__ import annotations

import atexit

from harp_jupyter.shim.pycuda import driver as cuda
from harp_jupyter.shim.pycuda.tools import make_default_context  # noqa: F401 - pycuda's name

cuda.init()
device = cuda.Device(0)
context = device.make_context()


def _finish_up() -> None:
    global context
    if context is not None and cuda.Context.get_current() is context:
        context.pop()
    context = None


atexit.register(_finish_up)
