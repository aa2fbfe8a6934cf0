"""pycuda.driver's exception classes, and HARP's own, with the agent's error kinds mapped onto them.

The pycuda classes mirror pycuda 2026.1's hierarchy (src/wrapper/wrap_cudadrv.cpp and driver.py):
``Error`` derives from ``Exception``; ``MemoryError``, ``LogicError``, ``LaunchError`` and
``RuntimeError`` derive from ``Error`` only (current pycuda no longer adds the builtin
``MemoryError`` as a second base); ``CompileError`` derives from ``Error`` and keeps ``msg``,
``command_line``, ``stdout`` and ``stderr``. HARP's classes derive from ``Error`` too, so code that
catches ``pycuda.driver.Error`` catches everything the shim raises.
"""

from __future__ import annotations

from typing import Any

from harp_jupyter.shim.callsite import CallSite


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


def describe_site(op: str | None, site: CallSite | None) -> str:
    if site is None:
        return f"raised by {op}" if op else ""
    filename, lineno, function = site
    where = f"{filename}:{lineno}"
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
]
