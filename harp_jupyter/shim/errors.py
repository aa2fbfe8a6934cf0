"""pycuda.driver's exception classes, and HARP's own, with the agent's error kinds mapped onto them.

The pycuda classes mirror pycuda 2026.1's hierarchy (src/wrapper/wrap_cudadrv.cpp and driver.py):
``Error`` derives from ``Exception``; ``MemoryError``, ``LogicError``, ``LaunchError`` and
``RuntimeError`` derive from ``Error`` only (current pycuda no longer adds the builtin
``MemoryError`` as a second base); ``CompileError`` derives from ``Error`` and keeps ``msg``,
``command_line``, ``stdout`` and ``stderr``. HARP's classes derive from ``Error`` too, so code that
catches ``pycuda.driver.Error`` catches everything the shim raises.
"""

from __future__ import annotations

import functools
import sys
import types
from collections.abc import Callable
from typing import Any, TypeVar

from harp_jupyter.shim.callsite import CallSite, is_shim_file

F = TypeVar("F", bound=Callable[..., Any])


class Error(Exception):
    """Base of every error the shim raises (pycuda.driver.Error)."""

    #: the agent's error kind (gpu_agent.protocol.ERROR_KINDS), None for client-side errors
    kind: str | None = None
    #: CUDA's error name when the agent reported one (e.g. "CUDA_ERROR_OUT_OF_MEMORY")
    code: str | None = None
    #: the operation and the user's call site of the call that failed, when known
    op: str | None = None
    site: CallSite | None = None


class MemoryError(Error):
    pass


class LogicError(Error):
    pass


class LaunchError(Error):
    pass


class RuntimeError(Error):
    pass


class CompileError(Error):
    """nvcc failed (on the agent). Same attributes as pycuda's CompileError."""

    def __init__(self, msg: str, command_line: list[str] | None = None,
                 stdout: str | None = None, stderr: str | None = None) -> None:
        super().__init__(msg)
        self.msg = msg
        self.command_line = command_line
        self.stdout = stdout
        self.stderr = stderr

    def __str__(self) -> str:
        text = self.msg
        if self.command_line:
            text += "\n[command: {}]".format(" ".join(self.command_line))
        if self.stdout:
            text += f"\n[stdout:\n{self.stdout}]"
        if self.stderr:
            text += f"\n[stderr:\n{self.stderr}]"
        return text


class GPULostError(Error):
    """The GPU agent went away (killed, unreachable, or it dropped this session)."""


class AgentNotConfiguredError(LogicError):
    """No agent endpoint: neither activate(agent=...) nor HARP_AGENT."""


class NotSupportedError(Error):
    """The agent cannot do this (e.g. a raw CUDA kernel on the emulated executor)."""


class ProtocolError(Error):
    """A message the agent refused as malformed; a bug in the shim or a version skew."""


class VersionMismatchError(ProtocolError):
    pass


class AuthError(Error):
    """The agent refused the token (HARP_TOKEN)."""


class HandleError(LogicError):
    """An unknown or freed handle, or an address outside this session's memory."""


class ContextLostError(LogicError):
    """The agent had to recreate its GPU context; this session's device state is gone."""


class SessionError(GPULostError):
    """The agent no longer knows this session."""


class DataError(Error):
    """The agent's data tree (``--data-root``) refused a request or a file is malformed;
    ``harp_jupyter.remote`` raises it as a subclass that is also the matching builtin."""


class LeaseLostError(Error):
    """The lease ended (idle release, revoke, expiry) while calls were on their way: they did not
    run. The session's device memory is parked; the next GPU call leases again and restores it."""


class StateLostError(GPULostError):
    """The parked GPU state of this kernel was dropped (TTL, capacity) or cannot be found."""


class GPUUnavailableError(GPULostError):
    """No GPU could be leased (no agents configured or reachable, or the wait timed out)."""


ERROR_CLASSES: dict[str, type[Error]] = {
    "Error": Error,
    "LogicError": LogicError,
    "LaunchError": LaunchError,
    "RuntimeError": RuntimeError,
    "MemoryError": MemoryError,
    "CompileError": CompileError,
    "ProtocolError": ProtocolError,
    "VersionMismatch": VersionMismatchError,
    "AuthError": AuthError,
    "NotSupported": NotSupportedError,
    "HandleError": HandleError,
    "ContextLost": ContextLostError,
    "SessionError": SessionError,
    "LeaseError": LeaseLostError,
    "StateLost": StateLostError,
    "DataError": DataError,
}

# Tracebacks show pycuda's familiar names for pycuda's classes.
for _cls in (Error, MemoryError, LogicError, LaunchError, RuntimeError, CompileError):
    _cls.__module__ = "pycuda.driver"
del _cls


def format_location(filename: str, lineno: int) -> str:
    """``file:line``, or ``Cell In[8], line 2`` for code IPython compiled from a cell (as
    IPython's own tracebacks name it, instead of the kernel's temporary file)."""
    ipython = sys.modules.get("IPython")
    get_ipython = getattr(ipython, "get_ipython", None)
    shell = get_ipython() if callable(get_ipython) else None
    format_code_name = getattr(getattr(shell, "compile", None), "format_code_name", None)
    if callable(format_code_name):
        try:
            named = format_code_name(filename)
        except Exception:  # a foreign shell's compiler: fall back to the plain name
            named = None
        if named:
            label, name = named
            return f"{label} {name}, line {lineno}"
    return f"{filename}:{lineno}"


def describe_site(op: str | None, site: CallSite | None) -> str:
    if site is None:
        return f"raised by {op}" if op else ""
    filename, lineno, function = site
    where = format_location(filename, lineno)
    if function and function != "<module>":
        where += f" in {function}"
    return f"raised by {op or 'a call'} at {where}"


def error_from_agent(error: dict[str, Any], op: str | None = None,
                     site: CallSite | None = None, later_errors: int = 0) -> Error:
    """The exception for an agent error ``{i, op, kind, msg, code}``, naming the call site."""
    kind = error.get("kind")
    cls = ERROR_CLASSES.get(kind if isinstance(kind, str) else "", Error)
    op = op or error.get("op")
    message = str(error.get("msg") or kind or "unknown error")
    where = describe_site(op, site)
    if where:
        message += "\n  " + where
    if later_errors:
        message += f"\n  ({later_errors} later error{'s' if later_errors > 1 else ''}"
        message += " in calls before this sync point not shown)"
    exc = cls(message)
    exc.kind = kind if isinstance(kind, str) else None
    exc.code = error.get("code") if isinstance(error.get("code"), str) else None
    exc.op = op
    exc.site = site
    return exc


# {{{ tracebacks that end at the user's line, as pycuda's do


def without_shim_frames(tb: types.TracebackType | None) -> types.TracebackType | None:
    """``tb`` without the entries of the shim's own frames (user callbacks below them stay)."""
    kept: list[types.TracebackType] = []
    while tb is not None:
        if not is_shim_file(tb.tb_frame.f_code.co_filename):
            kept.append(tb)
        tb = tb.tb_next
    rebuilt: types.TracebackType | None = None
    for entry in reversed(kept):
        rebuilt = types.TracebackType(rebuilt, entry.tb_frame, entry.tb_lasti, entry.tb_lineno)
    return rebuilt


def user_facing(function: F) -> F:
    """For the shim's entry points that may raise an error of an earlier call (sync points):
    the error propagates with a traceback that starts at the user's frame, so neither Python
    nor IPython shows the shim's internals under the user's line."""

    @functools.wraps(function)
    def entry_point(*args: Any, **kwargs: Any) -> Any:
        __tracebackhide__ = True  # IPython hides frames that set it
        try:
            return function(*args, **kwargs)
        except Error as e:
            e.__traceback__ = without_shim_frames(e.__traceback__)
            # a bare raise re-raises with the traceback just set and adds no entry for this
            # frame: the user's frame is the first one the error passes through
            raise

    return entry_point  # type: ignore[return-value]


# }}}


__all__ = [
    "ERROR_CLASSES",
    "AgentNotConfiguredError",
    "AuthError",
    "CompileError",
    "ContextLostError",
    "DataError",
    "Error",
    "GPULostError",
    "HandleError",
    "LaunchError",
    "LogicError",
    "MemoryError",
    "NotSupportedError",
    "ProtocolError",
    "RuntimeError",
    "SessionError",
    "VersionMismatchError",
    "describe_site",
    "error_from_agent",
    "format_location",
    "user_facing",
    "without_shim_frames",
]
