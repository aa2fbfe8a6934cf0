"""The ``harp`` device in torch: the PrivateUse1 backend renamed, its hooks, and ``torch.harp``.

``register()`` (idempotent) renames PrivateUse1 to ``harp``, installs the Python hooks and
device guard torch asks a backend for (``torch.utils.backend_registration``'s Python route), the
``torch.harp`` module below, ``Tensor.harp()``/``is_harp``, a PrivateUse1 fallback that sends
every operator reaching the backend (factories: ``torch.randn(..., device="harp")``) to the
dispatcher, and PrivateUse1 kernels for the factories torch would otherwise build by resizing
an ``out=`` tensor (a harp tensor keeps its layout).

Why the pure-Python route and a wrapper subclass: a tensor made by ``torch._C._acc``'s
``create_empty_tensor`` has no storage and contiguous strides only, so views (strides, offsets)
could not be told from Python; ``_make_wrapper_subclass`` takes any layout, and its
``__torch_dispatch__`` sees every operator after autograd. No C++ is built.
"""

from __future__ import annotations

import os
import threading
import warnings
from typing import Any

import torch
from torch.utils import backend_registration

from harp_jupyter.shim import callsite
from harp_jupyter.shim.endpoints import configured_endpoint
from harp_jupyter.shim.errors import AgentNotConfiguredError
from harp_jupyter.shim.session import get_session
from harp_jupyter.torch import dispatch
from harp_jupyter.torch.client import client
from harp_jupyter.torch.tensor import DEVICE_TYPE

_lock = threading.Lock()
_registered = False
_library: torch.library.Library | None = None

#: factories whose composite kernels resize an empty ``out=`` tensor: run whole on the agent
_FACTORIES = ("arange", "arange.start", "arange.start_step", "linspace", "logspace", "eye",
              "eye.m", "randperm", "range", "range.step", "tril_indices", "triu_indices")


class _Hooks(torch._C._acc.PrivateUse1Hooks):
    def is_available(self) -> bool:
        return True

    def has_primary_context(self, device_index: int) -> bool:
        return True

    def is_built(self) -> bool:
        return True


class _DeviceGuard(torch._C._acc.DeviceGuard):
    def type_(self) -> Any:
        return torch._C._autograd.DeviceType.PrivateUse1


class HarpDeviceModule:
    """``torch.harp``: what code asks of a device module. Nothing here leases a GPU except
    ``synchronize`` and ``memory_allocated`` of a session that already has one."""

    @staticmethod
    def is_available() -> bool:
        """An agent is configured (HARP_AGENTS, harp run, the Elastic GPU kernel's
        provisioner): asks no agent, leases nothing."""
        if os.environ.get("HARP_CONTROL") or os.environ.get("HARP_AGENTS", "").strip():
            return True
        try:
            configured_endpoint()
        except AgentNotConfiguredError:
            return False
        return True

    @staticmethod
    def is_initialized() -> bool:
        return True

    @staticmethod
    def _is_in_bad_fork() -> bool:
        return False

    @staticmethod
    def device_count() -> int:
        return 1

    @staticmethod
    def current_device() -> int:
        return 0

    @staticmethod
    def set_device(device: Any) -> None:
        index = torch.device(device).index if not isinstance(device, int) else device
        if index not in (None, 0):
            raise ValueError(f"harp has one device (harp:0), not {device}")

    @staticmethod
    def synchronize(device: Any = None) -> None:
        """Wait for every queued operation (errors of earlier ones are raised here)."""
        session = get_session()
        if session.connected:
            client.call_sync("synchronize")

    @staticmethod
    def manual_seed(seed: int) -> None:
        """Seed the agent's generator (sent with the next operation: seeding leases nothing)."""
        client.seed_later(seed)

    manual_seed_all = manual_seed

    @staticmethod
    def memory_allocated(device: Any = None) -> int:
        """Bytes of this kernel's harp tensors on the agent (each storage once)."""
        session = get_session()
        if not session.connected:
            return 0
        return int(client.call_sync("torch_info")["bytes"])

    @staticmethod
    def get_device_name(device: Any = None) -> str:
        return str(get_session().device.get("name") or "harp")

    @staticmethod
    def agent_torch() -> dict[str, Any]:
        """The agent's torch version, device and CUDA version (asks the agent)."""
        return dict(client.call_sync("torch_info"))


def register() -> None:
    """Make ``device="harp"`` work in this process; see the module docstring."""
    global _registered, _library
    with _lock:
        if _registered:
            return
        current = torch._C._get_privateuse1_backend_name()
        if current not in ("privateuseone", DEVICE_TYPE):
            raise RuntimeError(f"torch's PrivateUse1 backend is already {current!r} in this "
                               "process: harp tensors need it")
        module = HarpDeviceModule()
        if current != DEVICE_TYPE:
            backend_registration._setup_privateuseone_for_python_backend(
                DEVICE_TYPE, module, _Hooks(), _DeviceGuard())
        library = torch.library.Library("_", "IMPL")
        library.fallback(dispatch._fallback, dispatch_key="PrivateUse1")
        factories = torch.library.Library("aten", "IMPL")
        for name in _FACTORIES:
            base, _, overload = name.partition(".")
            op = getattr(getattr(torch.ops.aten, base), overload or "default")
            factories.impl(name, _factory(op), "PrivateUse1")
        _library = (library, factories)
        _registered = True
        # an operator's call site (errors, %%harp profile) is the user's line, not torch's
        callsite.skip_directories(os.path.dirname(os.path.abspath(dispatch.__file__)),
                                  os.path.dirname(os.path.abspath(torch.__file__)))
    # backward runs in the calling thread: torch sizes its per-device autograd threads once, at
    # the first backward of the process, so one run before harp existed left none for harp
    # (an INTERNAL ASSERT in engine.cpp); it also keeps backward's operators under the user's
    # line for %%harp profile
    torch._C._set_multithreading_enabled(False)
    _warn_when_cuda_starts()


_CUDA_BESIDE_HARP = (
    "harp tensors make 'harp' this process's PyTorch accelerator: autograd on 'cuda' tensors in "
    "this process fails (torch {version} asserts in its autograd engine). Use device='harp' or "
    "device='cuda' in one process, not both.")


def _warn_when_cuda_starts() -> None:
    """torch (2.11 to 2.13 at least) makes a registered PrivateUse1 backend the process's
    accelerator; its autograd engine then finds no stream for nodes on ``cuda`` tensors and
    stops at an INTERNAL ASSERT. The process is told when it starts CUDA beside harp (at once
    if it has already). Not at registration wherever a GPU is present: that warned every
    process on a GPU machine that registers harp and never touches CUDA (the harp tests' and
    ``harp run``'s processes there, a kernel on a GPU host), and asking
    ``torch.cuda.is_available()`` started the CUDA driver in each of them."""
    if not torch.backends.cuda.is_built():
        return
    if torch.cuda.is_initialized():
        _warn_cuda_beside_harp()
        return
    original = torch.cuda._lazy_init
    if getattr(original, "_harp_warns", False):
        return

    def lazy_init() -> None:
        original()  # raises where CUDA can't start: nothing to warn about then
        if not warned:
            warned.append(True)
            _warn_cuda_beside_harp()

    warned: list[bool] = []
    lazy_init._harp_warns = True  # type: ignore[attr-defined]
    # torch's C++ calls torch.cuda._lazy_init by name before the first CUDA tensor is made
    torch.cuda._lazy_init = lazy_init


def _warn_cuda_beside_harp() -> None:
    warnings.warn(_CUDA_BESIDE_HARP.format(version=torch.__version__), RuntimeWarning,
                  stacklevel=3)


def _factory(op: Any) -> Any:
    def kernel(*args: Any, **kwargs: Any) -> Any:
        return dispatch.run(op, args, kwargs)

    return kernel
