"""``device="harp"`` with no import in the Elastic GPU kernel and under ``harp run``.

``install()`` registers the harp device the moment user code imports torch (or at once, if torch
is imported already): a one-shot finder on ``sys.meta_path`` lets torch load as usual and then
imports ``harp_jupyter.torch``. Importing torch costs a second and hundreds of MiB, so a kernel
that never uses it never pays for it.

Where torch has no CUDA (the kernel's CPU-only torch), what ``torch.cuda`` raises for code
written for ``"cuda"`` says what to change: ``device="harp"``.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from typing import Any

CUDA_HINT = ("this kernel's PyTorch has no CUDA: its GPU is the leased one, device \"harp\". "
             "Write device=\"harp\" where the code says \"cuda\" (torch.randn(..., "
             "device=\"harp\"), model.to(\"harp\"), torch.harp.synchronize())")


class HarpCudaError(RuntimeError):
    """A ``torch.cuda`` call in a process whose torch has no CUDA, with the harp hint."""


def install() -> None:
    """See the module docstring (idempotent)."""
    if "torch" in sys.modules:
        _register()
        return
    if not any(isinstance(f, _TorchFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _TorchFinder())


def _register() -> None:
    import torch

    import harp_jupyter.torch  # noqa: F401 - registers the harp device

    if not (torch.backends.cuda.is_built() and torch.cuda.is_available()):
        lazy_init = torch.cuda._lazy_init
        if getattr(lazy_init, "_harp", False):
            return

        def explained() -> None:
            try:
                lazy_init()
            except (AssertionError, RuntimeError) as e:
                raise HarpCudaError(f"{e}: {CUDA_HINT}") from None

        explained._harp = True  # type: ignore[attr-defined]
        # torch's C++ calls torch.cuda._lazy_init by name before any CUDA tensor is made
        torch.cuda._lazy_init = explained


class _TorchFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != "torch":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec("torch")
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _ThenRegister(spec.loader)
        return spec


class _ThenRegister(importlib.abc.Loader):
    """torch's own loader, then the harp device."""

    def __init__(self, loader: Any) -> None:
        self._loader = loader

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self._loader.exec_module(module)
        _register()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)
