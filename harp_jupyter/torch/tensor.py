"""``HarpTensor``: a torch tensor on the ``harp`` device whose data lives in the leased GPU.

The local object is a wrapper (``_make_wrapper_subclass``) with no storage: sizes, strides,
offset and dtype are real, so autograd, modules and optimizers treat it as any device tensor;
``_layout`` is that layout as a hashable ``Layout`` (the key of the dispatcher's cache of output
layouts), ``_meta`` a meta tensor of it, made only when shape inference runs. ``_handle`` names
the tensor in the agent's registry, ``_session`` the GPU session it lives in. Every operator on
it reaches ``__torch_dispatch__``, which hands it to the dispatcher (``dispatch.py`` installs
itself with ``set_dispatcher``: a hook, so this module needs nothing of that one).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from harp_jupyter.shim.session import RemoteSession
from harp_jupyter.torch.client import client

DEVICE_TYPE = "harp"

Dispatcher = Callable[[Any, tuple[Any, ...], dict[str, Any]], Any]
_dispatcher: Dispatcher | None = None


def set_dispatcher(dispatcher: Dispatcher) -> None:
    global _dispatcher
    _dispatcher = dispatcher


class Layout(NamedTuple):
    """A tensor's metadata: what an operator's output shapes depend on. ``extent`` is its
    storage's length in elements (a view's storage is its base's)."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int
    extent: int

    @staticmethod
    def of(tensor: torch.Tensor) -> Layout:
        """The layout of a meta tensor."""
        return Layout(tensor.dtype, tuple(tensor.shape), tuple(tensor.stride()),
                      tensor.storage_offset(),
                      tensor.untyped_storage().nbytes() // tensor.element_size())

    @staticmethod
    def contiguous(dtype: torch.dtype, shape: Any, stride: Any, offset: int) -> Layout:
        """A layout over the least storage that holds it."""
        extent = 0 if any(n == 0 for n in shape) else 1 + sum(
            (n - 1) * s for n, s in zip(shape, stride, strict=True))
        return Layout(dtype, tuple(shape), tuple(stride), offset, offset + extent)

    def meta(self) -> torch.Tensor:
        base = torch.empty(self.extent, dtype=self.dtype, device="meta")
        return base.as_strided(self.shape, self.stride, self.offset)


class HarpTensor(torch.Tensor):
    """See the module docstring."""

    _layout: Layout
    _handle: int
    _session: RemoteSession
    _finalizer: weakref.finalize

    @staticmethod
    def __new__(cls, layout: Layout, handle: int, session: RemoteSession) -> HarpTensor:
        tensor = torch.Tensor._make_wrapper_subclass(
            cls, layout.shape, strides=layout.stride, storage_offset=layout.offset,
            dtype=layout.dtype, device=_device(), requires_grad=False)
        tensor._layout = layout
        tensor._handle = handle
        tensor._session = session
        tensor._finalizer = _finalizer(tensor)
        return tensor

    @property  # type: ignore[override]
    def data(self) -> torch.Tensor:
        return _TENSOR_DATA.__get__(self, type(self))

    @data.setter
    def data(self, value: torch.Tensor) -> None:
        """``p.data = q`` (and ``module.double()``/``.half()``, which do it to each parameter):
        torch swaps the sizes under the wrapper, so the wrapper must also name ``q``'s tensor on
        the agent; it kept its own handle and layout, so reads gave the old data or failed."""
        if not isinstance(value, HarpTensor):
            _TENSOR_DATA.__set__(self, value)  # torch's own error for another device
            return
        alias = value.detach()  # a new handle on the agent, over value's storage
        _TENSOR_DATA.__set__(self, value)
        self._finalizer()  # this wrapper's old handle is freed now
        alias._finalizer.detach()
        self._layout, self._handle, self._session = alias._layout, alias._handle, alias._session
        self._finalizer = _finalizer(self)

    @property
    def _meta(self) -> torch.Tensor:
        """A new meta tensor of this layout (an in-place change of it does not stick)."""
        return self._layout.meta()

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


_TENSOR_DATA: Any = torch._C.TensorBase.__dict__["data"]


def _finalizer(tensor: HarpTensor) -> weakref.finalize:
    """Frees the tensor's handle when the wrapper dies."""
    layout = tensor._layout
    return weakref.finalize(tensor, client.free_later, tensor._session, tensor._handle,
                            layout.extent * layout.dtype.itemsize)


_harp0: list[torch.device] = []


def _device() -> torch.device:
    """``harp:0`` (made once: it can't exist before the backend is renamed)."""
    if not _harp0:
        _harp0.append(torch.device(DEVICE_TYPE, 0))
    return _harp0[0]


def _from_host(host: torch.Tensor, requires_grad: bool) -> torch.Tensor:
    return host.to(DEVICE_TYPE).requires_grad_(requires_grad)
