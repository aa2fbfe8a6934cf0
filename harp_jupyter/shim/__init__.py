"""The forwarding shim: unmodified pycuda code runs on a remote GPU agent.

``activate(agent=None)`` makes ``import pycuda``, ``pycuda.driver``, ``pycuda.autoinit``,
``pycuda.gpuarray``... resolve to ``harp_jupyter.shim.pycuda.*``: one module object under both
names, shadowing a real pycuda installed in the same environment (even one already imported)
while active. ``deactivate()`` undoes it. Nothing connects to the agent at import or activation:
the first call that needs the GPU does, to ``agent`` or else to ``HARP_AGENT=tcp://HOST:PORT``.

This module stays light (no zmq, no numpy) because it may run at every interpreter start-up
(``autoactivate``, with ``HARP_SHIM=1``).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import threading
from types import ModuleType
from typing import Any

ALIAS = "pycuda"
TARGET = "harp_jupyter.shim.pycuda"

_lock = threading.Lock()
_finder: _PycudaAliasFinder | None = None
_agent: str | None = None
_shadowed: dict[str, ModuleType] = {}


def _is_alias(name: str) -> bool:
    return name == ALIAS or name.startswith(ALIAS + ".")


class _AliasLoader(importlib.abc.Loader):
    """Loads ``pycuda.X`` as the already-imported ``harp_jupyter.shim.pycuda.X``."""

    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        module = importlib.import_module(self.target)
        self._own_spec = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        # The import system set __spec__ to the alias's spec; the module keeps its own.
        module.__spec__ = self._own_spec


class _PycudaAliasFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any = None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if not _is_alias(fullname):
            return None
        target_name = TARGET + fullname[len(ALIAS):]
        try:
            target_spec = importlib.util.find_spec(target_name)
        except ModuleNotFoundError:
            target_spec = None
        if target_spec is None:
            raise ModuleNotFoundError(
                f"No module named {fullname!r}: HARP's pycuda shim does not provide it (it"
                " forwards pycuda.driver, compiler, gpuarray, cumath, elementwise, reduction,"
                " tools, autoinit and autoprimaryctx to a remote GPU)", name=fullname)
        return importlib.util.spec_from_loader(
            fullname, _AliasLoader(target_name),
            is_package=target_spec.submodule_search_locations is not None)


def activate(agent: str | None = None) -> None:
    """Route ``pycuda.*`` imports to the shim; ``agent`` (tcp://HOST:PORT) overrides HARP_AGENT.

    Calling it again only updates the agent for sessions not yet started."""
    global _finder, _agent
    with _lock:
        if agent is not None:
            _agent = agent
        if _finder is not None:
            return
        for name in [n for n in sys.modules if _is_alias(n)]:
            module = sys.modules[name]
            if not getattr(module, "__name__", "").startswith(TARGET):
                _shadowed[name] = sys.modules.pop(name)
        _finder = _PycudaAliasFinder()
        sys.meta_path.insert(0, _finder)
        importlib.invalidate_caches()


def deactivate() -> None:
    """Stop routing ``pycuda.*`` to the shim and restore a real pycuda that was shadowed.

    The shim's own modules stay importable as ``harp_jupyter.shim.pycuda.*``."""
    global _finder, _agent
    with _lock:
        if _finder is None:
            return
        try:
            sys.meta_path.remove(_finder)
        except ValueError:
            pass
        _finder = None
        _agent = None
        for name in [n for n in sys.modules if _is_alias(n)]:
            del sys.modules[name]
        sys.modules.update(_shadowed)
        _shadowed.clear()
        importlib.invalidate_caches()


def is_active() -> bool:
    return _finder is not None


def configured_agent() -> str | None:
    """The endpoint given to ``activate``, if any."""
    return _agent


__all__ = ["activate", "configured_agent", "deactivate", "is_active"]
