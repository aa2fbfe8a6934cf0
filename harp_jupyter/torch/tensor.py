"""``HarpTensor``: a torch tensor on the ``harp`` device whose data lives in the leased GPU.

The local object is a wrapper (``_make_wrapper_subclass``) with no storage: sizes, strides,
offset and dtype are real, so autograd, modules and optimizers treat it as any device tensor;
``_meta`` is a meta tensor of the same layout, what shape inference runs on. ``_handle`` names
the tensor in the agent's registry, ``_session`` the GPU session it lives in. Every operator on
it reaches ``__torch_dispatch__``, which hands it to the dispatcher (``dispatch.py`` installs
itself with ``set_dispatcher``: a hook, so this module needs nothing of that one).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch

from harp_jupyter.shim.session import RemoteSession
from harp_jupyter.torch.client import client

DEVICE_TYPE = "harp"

Dispatcher = Callable[[Any, tuple[Any, ...], dict[str, Any]], Any]
_dispatcher: Dispatcher | None = None


def set_dispatcher(dispatcher: Dispatcher) -> None:
    global _dispatcher
    _dispatcher = dispatcher


class HarpTensor(torch.Tensor):
    """See the module docstring."""

    _meta: torch.Tensor
    _handle: int
    _session: RemoteSession

    @staticmethod
    def __new__(cls, meta: torch.Tensor, handle: int, session: RemoteSession) -> HarpTensor:
        tensor = torch.Tensor._make_wrapper_subclass(
            cls, meta.shape, strides=meta.stride(), storage_offset=meta.storage_offset(),
            dtype=meta.dtype, device=torch.device(DEVICE_TYPE, 0), requires_grad=False)
        tensor._meta = meta
        tensor._handle = handle
        tensor._session = session
        weakref.finalize(tensor, client.free_later, session, handle)
        return tensor

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        assert _dispatcher is not None, "harp_jupyter.torch.dispatch was not imported"
        return _dispatcher(func, args, kwargs or {})

    def __repr__(self, *, tensor_contents: Any = None) -> str:
        text = repr(self.detach().cpu())
        extra = f", device='{self.device}'"
        if self.grad_fn is not None:
            extra += f", grad_fn=<{type(self.grad_fn).__name__}>"
        elif self.requires_grad:
            extra += ", requires_grad=True"
        if text.endswith(")"):
            # torch's text of the CPU copy, with this tensor's device and autograd state
            body = text[:-1]
            for suffix in (", requires_grad=True",):
                body = body.removesuffix(suffix)
            return body + extra + ")"
        return text + extra

    def tolist(self) -> Any:
        """A sync point, as on CUDA."""
        return self.detach().cpu().tolist()

    def numpy(self, *, force: bool = False) -> Any:
        if not force:
            raise TypeError("can't convert harp:0 device type tensor to numpy. Use "
                            "Tensor.cpu() to copy the tensor to host memory first.")
        return self.detach().cpu().numpy()

    def __reduce_ex__(self, protocol: Any) -> Any:
        # torch.save/pickle of a harp tensor keeps its data (on the host) and its device
        return (_from_host, (self.detach().cpu(), self.requires_grad))


def _from_host(host: torch.Tensor, requires_grad: bool) -> torch.Tensor:
    return host.to(DEVICE_TYPE).requires_grad_(requires_grad)
