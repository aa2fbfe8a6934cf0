"""Where in the user's code a call was made: the first frame outside the shim.

Recorded for every forwarded call (it must be cheap: a frame walk, no traceback objects), so that
an error the agent reports later can name the user's file and line. Libraries that forward calls
through the shim (harp tensors: harp_jupyter.torch and torch itself, whose modules and autograd
run the operators) add their directories with ``skip_directories``: the site of an operator is
then the user's ``model(x)`` or ``loss.backward()`` line, not a line of torch.
"""

from __future__ import annotations

import os
import sys

#: (filename, line number, function name)
CallSite = tuple[str, int, str]

_SHIM_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
#: directories whose frames are never the user's (a tuple: str.startswith takes it whole)
_SKIPPED: tuple[str, ...] = (_SHIM_DIR,)


def skip_directories(*directories: str) -> None:
    """Frames in these directories (and below) are not call sites either."""
    global _SKIPPED
    added = tuple(os.path.abspath(d) + os.sep for d in directories)
    _SKIPPED = _SKIPPED + tuple(d for d in added if d not in _SKIPPED)


def is_shim_file(filename: str) -> bool:
    """Whether ``filename`` is one of the shim's own source files."""
    return filename.startswith(_SHIM_DIR)


def user_call_site(skip: int = 1) -> CallSite | None:
    """The innermost frame whose code is not part of harp_jupyter.shim or a skipped directory
    (None if there is none)."""
    try:
        frame = sys._getframe(skip)
    except ValueError:
        return None
    skipped = _SKIPPED
    while frame is not None:
        code = frame.f_code
        if not code.co_filename.startswith(skipped):
            return code.co_filename, frame.f_lineno, code.co_name
        frame = frame.f_back
    return None
