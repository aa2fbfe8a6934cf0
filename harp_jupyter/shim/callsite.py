"""Where in the user's code a call was made: the first frame outside the shim.

Recorded for every forwarded call (it must be cheap: a frame walk, no traceback objects), so that
an error the agent reports later can name the user's file and line.
"""

from __future__ import annotations

import os
import sys

#: (filename, line number, function name)
CallSite = tuple[str, int, str]

_SHIM_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def is_shim_file(filename: str) -> bool:
    """Whether ``filename`` is one of the shim's own source files."""
    return filename.startswith(_SHIM_DIR)


def user_call_site(skip: int = 1) -> CallSite | None:
    """The innermost frame whose code is not part of harp_jupyter.shim (None if there is none)."""
    try:
        frame = sys._getframe(skip)
    except ValueError:
        return None
    while frame is not None:
        code = frame.f_code
        if not code.co_filename.startswith(_SHIM_DIR):
            return code.co_filename, frame.f_lineno, code.co_name
        frame = frame.f_back
    return None
