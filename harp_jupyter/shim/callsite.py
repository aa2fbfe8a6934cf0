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
from types import CodeType

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


#: (id of a code object, instruction offset) -> (that code object, its line): ``f_lineno`` scans
#: the code's line table from its start at every call (thousands of instructions inside a long
#: cell), while a loop asks for the same few sites again and again. The entry holds the code
#: object, so its id cannot pass to another (a cell compiled anew) while the entry exists.
_LINES: dict[tuple[int, int], tuple[CodeType, int]] = {}
_MAX_LINES = 4096


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
            key = (id(code), frame.f_lasti)
            known = _LINES.get(key)
            if known is not None and known[0] is code:
                return code.co_filename, known[1], code.co_name
            line = frame.f_lineno
            if len(_LINES) >= _MAX_LINES:
                _LINES.clear()
            _LINES[key] = (code, line)
            return code.co_filename, line, code.co_name
        frame = frame.f_back
    return None
