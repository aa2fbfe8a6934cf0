"""Every aten operator on harp tensors: shape inference here, execution on the agent.

``run(op, args, kwargs)`` is reached two ways: from ``HarpTensor.__torch_dispatch__`` (any
operator with a harp tensor among its arguments) and from the PrivateUse1 fallback (factories
such as ``torch.empty(..., device="harp")``, which have no tensor argument). It

1. runs the operator on meta tensors of the same layouts: that gives each output's dtype, shape,
   strides and offset, and raises torch's own error for a wrong call, at the user's line;
2. makes the outputs: an output the schema says is a written argument (``add_``, ``out=``) is
   that argument; any other is a new ``HarpTensor`` with a fresh handle (a view's handle names
   a view on the agent, so aliasing is torch's own there);
3. queues ``torch_op(handles, name, schema hash, [args, kwargs])`` and returns at once.

Operators whose output shapes depend on data (``nonzero``, ``.item()``) have no meta kernel and
run synchronously (``torch_op_sync``), their outputs described by the agent. Copies between the
host and the device are ``copy_``/``_to_copy`` (``torch_write``/``torch_download``, in pieces).
"""

from __future__ import annotations

from typing import Any

import torch
from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException

from gpu_agent import protocol
from gpu_agent.executors.torch_ops import dtype_name, schema_hash
from harp_jupyter.torch.client import HarpTorchError, SessionGoneError, client
from harp_jupyter.torch.tensor import DEVICE_TYPE, HarpTensor, set_dispatcher

aten = torch.ops.aten

#: why meta inference can't tell an operator's outputs: then it runs synchronously
_NO_META = (NotImplementedError, DynamicOutputShapeException, DataDependentOutputException)

_schemas: dict[Any, tuple[str, str]] = {}


def operator_name(op: Any) -> tuple[str, str]:
    """``("aten::add.Tensor", schema hash)`` of an OpOverload."""
    known = _schemas.get(op)
    if known is None:
        schema = op._schema
        name = schema.name + (f".{schema.overload_name}" if schema.overload_name else "")
        known = _schemas[op] = (name, schema_hash(str(schema)))
    return known


def run(op: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    special = _SPECIAL.get(op)
    if special is not None:
        return special(op, args, kwargs)
    return _run_remote(op, args, kwargs)


# {{{ the general case


def _run_remote(op: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    name, digest = operator_name(op)
    if not name.startswith("aten::"):
        raise NotImplementedError(f"{name}: harp tensors run aten operators only")
    session = client.session()
    meta_args = _to_meta(args, session)
    meta_kwargs = _to_meta(kwargs, session)
    try:
        meta_result = op(*meta_args, **meta_kwargs)
    except _NO_META:
        return _run_sync(op, name, digest, args, kwargs)
    if not any(isinstance(m, torch.Tensor) and m.is_meta for m in _flat(meta_result)):
        if not _flat(meta_result) or all(not isinstance(m, torch.Tensor)
                                         for m in _flat(meta_result)):
            if meta_result is not None and not isinstance(meta_result, tuple | list):
                return meta_result  # an answer from metadata alone (is_same_size ...)
        elif all(isinstance(m, torch.Tensor) and m.device.type == "cpu"
                 for m in _flat(meta_result)):
            return meta_result  # a host tensor made from metadata (empty_like(device="cpu"))
    _refuse_metadata_change(op, args, kwargs, meta_args, meta_kwargs)
    handles: list[int | None] = []
    result = _outputs(op, args, kwargs, meta_result, handles, session)
    temporaries: list[int] = []
    tree = [_encode(list(args), temporaries), _encode_map(kwargs, temporaries)]
    client.call("torch_op", handles, name, digest, tree)
    if temporaries:
        client.call("torch_free", temporaries)
    return result


def _run_sync(op: Any, name: str, digest: str, args: tuple[Any, ...],
              kwargs: dict[str, Any]) -> Any:
    session = client.session()
    expected = 0
    for ret in op._schema.returns:
        kind = str(ret.type)
        if kind in ("Tensor", "Tensor?"):
            expected += 1
        elif "Tensor" in kind:
            raise NotImplementedError(f"{name}: a list of tensors whose shapes depend on data "
                                      "is not supported on harp tensors")
    handles: list[int | None] = [client.new_handle() for _ in range(expected)]
    temporaries: list[int] = []
    tree = [_encode(list(args), temporaries), _encode_map(kwargs, temporaries)]
    described = client.call_sync("torch_op_sync", handles, name, digest, tree)
    if temporaries:
        client.call("torch_free", temporaries)
    queue = list(handles)
    return _rebuild(described, queue, session)


def _rebuild(value: Any, handles: list[int | None], session: Any) -> Any:
    if isinstance(value, dict) and protocol.TORCH_TENSOR in value:
        dtype, shape, stride, offset = value[protocol.TORCH_TENSOR]
        handle = handles.pop(0)
        assert handle is not None
        return HarpTensor(_meta_of(getattr(torch, dtype), shape, stride, offset), handle,
                          session)
    if isinstance(value, list):
        return tuple(_rebuild(item, handles, session) for item in value)
    return value


def _outputs(op: Any, args: tuple[Any, ...], kwargs: dict[str, Any], meta_result: Any,
             handles: list[int | None], session: Any) -> Any:
    """The operator's result as the caller sees it; ``handles`` gets one entry per tensor
    output, in order (None for a written argument, which the agent already has)."""
    returns = op._schema.returns
    if not returns:
        return meta_result
    values = (meta_result,) if len(returns) == 1 else tuple(meta_result)
    built = []
    for ret, value in zip(returns, values, strict=True):
        alias = ret.alias_info
        if alias is not None and alias.is_write:
            argument = _argument_with_alias(op, args, kwargs, alias.before_set)
            handles.extend(None for _ in _flat(value) if isinstance(_, torch.Tensor))
            built.append(argument)
        else:
            built.append(_wrap(value, handles, session))
    return built[0] if len(returns) == 1 else tuple(built)


def _wrap(value: Any, handles: list[int | None], session: Any) -> Any:
    if isinstance(value, torch.Tensor):
        handle = client.new_handle()
        handles.append(handle)
        return HarpTensor(value, handle, session)
    if isinstance(value, list | tuple):
        return type(value)(_wrap(item, handles, session) for item in value)
    return value


def _argument_with_alias(op: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                         alias_set: set[str]) -> Any:
    for position, argument in enumerate(op._schema.arguments):
        info = argument.alias_info
        if info is not None and info.is_write and info.before_set == alias_set:
            if argument.kwarg_only or position >= len(args):
                return kwargs.get(argument.name)
            return args[position]
    raise HarpTorchError(f"{op}: no argument is written as its result says")


def _refuse_metadata_change(op: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                            meta_args: Any, meta_kwargs: Any) -> None:
    """A wrapper's sizes can't change after it is made: in-place operators that reshape their
    argument (``t_``, ``resize_`` to another size) are refused, not run wrong."""
    for argument, meta in zip(_flat((args, kwargs)), _flat((meta_args, meta_kwargs)),
                              strict=False):
        if isinstance(argument, HarpTensor) and isinstance(meta, torch.Tensor) and (
                meta.shape != argument.shape or meta.stride() != argument.stride()
                or meta.storage_offset() != argument.storage_offset()):
            raise NotImplementedError(
                f"{operator_name(op)[0]} changes the shape or strides of a harp tensor in place;"
                " harp tensors keep their layout: use the out-of-place form")


# }}}

# {{{ meta tensors and the argument tree


def _meta_of(dtype: torch.dtype, shape: Any, stride: Any, offset: int) -> torch.Tensor:
    extent = 0 if any(n == 0 for n in shape) else 1 + sum(
        (n - 1) * s for n, s in zip(shape, stride, strict=True))
    base = torch.empty(offset + extent, dtype=dtype, device="meta")
    return base.as_strided(shape, stride, offset)


def _to_meta(value: Any, session: Any) -> Any:
    if isinstance(value, HarpTensor):
        _check_session(value, session)
        return value._meta.detach()  # its own metadata: an in-place change must not stick
    if isinstance(value, torch.Tensor):
        return value if value.dim() == 0 else value.to("meta")
    if isinstance(value, torch.device) and value.type == DEVICE_TYPE:
        return torch.device("meta")
    if isinstance(value, torch.Generator):
        raise NotImplementedError("a torch.Generator can't be used with harp tensors: seed "
                                  "with torch.manual_seed (it seeds the agent's generator)")
    if isinstance(value, list | tuple):
        return type(value)(_to_meta(item, session) for item in value)
    if isinstance(value, dict):
        return {key: _to_meta(item, session) for key, item in value.items()}
    return value


def _check_session(tensor: HarpTensor, session: Any) -> None:
    if tensor._session is not session:
        raise SessionGoneError(
            "this harp tensor lived in a GPU session this kernel lost (its memory is gone): "
            "re-run the cells that create it (model.to('harp'), torch.randn(..., "
            "device='harp'))")


def _flat(value: Any) -> list[Any]:
    if isinstance(value, list | tuple):
        return [leaf for item in value for leaf in _flat(item)]
    if isinstance(value, dict):
        return [leaf for item in value.values() for leaf in _flat(item)]
    return [value]


def _encode_map(kwargs: dict[str, Any], temporaries: list[int]) -> dict[str, Any]:
    return {key: _encode(value, temporaries) for key, value in kwargs.items()}


def _encode(value: Any, temporaries: list[int]) -> Any:
    if value is None or type(value) in (bool, int, float, complex, str):
        return value
    if isinstance(value, HarpTensor):
        return {protocol.TORCH_TENSOR: value._handle}
    if isinstance(value, torch.Tensor):
        return _encode_host_tensor(value, temporaries)
    if isinstance(value, list | tuple):
        return [_encode(item, temporaries) for item in value]
    if isinstance(value, torch.dtype):
        return {protocol.TORCH_DTYPE: _wire_dtype(value)}
    if isinstance(value, torch.device):
        if value.type != DEVICE_TYPE:
            raise HarpTorchError(f"an operator on harp tensors was given device {value}: "
                                 "move its tensors with .to()/.cpu() first")
        return {protocol.TORCH_DEVICE: 0}
    if isinstance(value, torch.layout):
        if value is not torch.strided:
            raise NotImplementedError(f"layout {value}: harp tensors are strided only")
        return {protocol.TORCH_LAYOUT: "strided"}
    if isinstance(value, torch.memory_format):
        return {protocol.TORCH_MEMORY_FORMAT: str(value).removeprefix("torch.")}
    if isinstance(value, bool | int | float | complex):  # numpy scalars, SymInts made concrete
        return value.item() if hasattr(value, "item") else type(value)(value)
    raise TypeError(f"an argument of type {type(value).__name__} can't be sent to the GPU "
                    "agent with a harp tensor operator")


def _wire_dtype(dtype: torch.dtype) -> str:
    text = dtype_name(dtype)
    if text not in protocol.TORCH_DTYPES:
        raise NotImplementedError(f"dtype {dtype} is not supported on harp tensors "
                                  f"(supported: {', '.join(sorted(protocol.TORCH_DTYPES))})")
    return text


def _encode_host_tensor(host: torch.Tensor, temporaries: list[int]) -> Any:
    """A host tensor argument: inline when small (a 0-d scalar), else uploaded first."""
    host = host.detach().resolve_conj().resolve_neg().contiguous()
    nbytes = host.numel() * host.element_size()
    if nbytes <= protocol.MAX_INLINE_BYTES:
        data = host.reshape(-1).view(torch.uint8).numpy().tobytes() if nbytes else b""
        return {protocol.TORCH_HOST_TENSOR: [_wire_dtype(host.dtype), list(host.shape), data]}
    handle = _empty_on_agent(host.dtype, list(host.shape))
    client.write(handle, host)
    temporaries.append(handle)
    return {protocol.TORCH_TENSOR: handle}


def _empty_on_agent(dtype: torch.dtype, shape: list[int]) -> int:
    """A new contiguous tensor on the agent, by handle only (a temporary)."""
    handle = client.new_handle()
    name, digest = operator_name(aten.empty.memory_format)
    client.call("torch_op", [handle], name, digest,
                [[shape], {"dtype": {protocol.TORCH_DTYPE: _wire_dtype(dtype)},
                           "device": {protocol.TORCH_DEVICE: 0}}])
    return handle


# }}}

# {{{ copies between the host and the device, and sync points


def download(tensor: HarpTensor) -> torch.Tensor:
    """A contiguous host copy of ``tensor`` (a sync point)."""
    _check_session(tensor, client.session())
    host = torch.empty(tuple(tensor.shape), dtype=tensor.dtype)
    if tensor._meta.is_contiguous():
        client.read(tensor._handle, host)
        return host
    handle = client.new_handle()
    name, digest = operator_name(aten.clone.default)
    client.call("torch_op", [handle], name, digest,
                [[{protocol.TORCH_TENSOR: tensor._handle}],
                 {"memory_format": {protocol.TORCH_MEMORY_FORMAT: "contiguous_format"}}])
    try:
        client.read(handle, host)
    finally:
        client.call("torch_free", [handle])
    return host


def upload(target: HarpTensor, source: torch.Tensor) -> None:
    """``target.copy_(source)`` for a host ``source`` (broadcast and cast as copy_ does)."""
    _check_session(target, client.session())
    host = source.detach().resolve_conj().resolve_neg().to(dtype=target.dtype)
    host = host.expand(target.shape).contiguous()
    if target._meta.is_contiguous():
        client.write(target._handle, host)
        return
    temporary = _empty_on_agent(target.dtype, list(target.shape))
    client.write(temporary, host)
    name, digest = operator_name(aten.copy_.default)
    client.call("torch_op", [None], name, digest,
                [[{protocol.TORCH_TENSOR: target._handle},
                  {protocol.TORCH_TENSOR: temporary}], {}])
    client.call("torch_free", [temporary])


def _to_copy(op: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    device = kwargs.get("device")
    source = args[0]
    if device is not None and device.type == "cpu" and isinstance(source, HarpTensor):
        host = download(source)
        dtype = kwargs.get("dtype")
        memory_format = kwargs.get("memory_format")
        if dtype is not None and dtype != host.dtype:
            host = host.to(dtype)
        if memory_format not in (None, torch.preserve_format, torch.contiguous_format):
            host = host.contiguous(memory_format=memory_format)
        return host
    return _run_remote(op, args, kwargs)


def _copy(op: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    target, source = args[0], args[1]
    if isinstance(target, HarpTensor) and not isinstance(source, HarpTensor):
        upload(target, source)
        return target
    if not isinstance(target, HarpTensor) and isinstance(source, HarpTensor):
        target.copy_(download(source))
        return target
    return _run_remote(op, args, kwargs)


def _item(op: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    name, digest = operator_name(op)
    return _run_sync(op, name, digest, args, kwargs)


_SPECIAL = {
    aten._to_copy.default: _to_copy,
    aten.copy_.default: _copy,
    aten._local_scalar_dense.default: _item,
    aten.equal.default: _item,
    aten.is_nonzero.default: _item,
}

# }}}


def _fallback(op: Any, *args: Any, **kwargs: Any) -> Any:
    """The PrivateUse1 kernel of every operator without one: factories on the harp device."""
    return run(op, args, kwargs)


set_dispatcher(run)
