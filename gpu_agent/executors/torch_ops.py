"""PyTorch tensors as session objects: the ``torch_*`` operations, shared by every executor.

A session's tensors live in this worker's torch (CUDA torch on the pycuda executor, sharing the
primary context pycuda retained; CPU torch on the emulated executor) in a registry from the
client's integer handles to ``torch.Tensor``. A handle names a tensor, which may be a view:
aliasing is torch's own, so writing through a view writes its base here as it would locally.
The client runs autograd and shape inference itself and sends aten operators by name
(``torch_op``); arguments arrive as the msgpack tree ``protocol.torch_tree_problem`` checks, never
pickle. An operator runs only if its name is one of the agent's own aten overloads (minus
``DENIED_OPS``) and its schema hashes to what the client's torch hashed (versions may differ
between the two sides; a changed operator is refused by name, never run with misread
arguments).

Bounds a client can cross, each a clear error: tensors per session (``MAX_TENSORS``), tensor
bytes (the executor's memory, through ``torch_reserve``), one upload or download (the worker's
frame limit), the argument tree (protocol). Bytes are booked per storage, and each handle
remembers the storage it is booked under: an operator that writes an argument may give it
another storage (``set_``, an ``out=`` resized from the data), and ``_rebook`` then moves the
handle's booking there, so the old storage's bytes come back when its last handle goes.

A ``torch_op`` that fails (an index out of range, refused for memory) is reported at the client's
next sync point, but the client made its outputs when it queued it and frees their handles when
they die. Those handles are kept as failed (``_torch_failed``, at most ``MAX_TENSORS``): freeing
one forgets it, using one says which operator failed. So every output handle of an operator
that reached the agent is freed exactly once, and ``torch_free`` of a handle never named as an
output stays a ``HandleError``, raised after the call's other handles are freed.

Parking: tensors are in no mapped chunk, so ``park_objects`` hands the worker an index (every
handle's storage, dtype, shape, strides, offset and the RNG states) and then each storage's
bytes once (views stay views of the same storage after ``restore_objects``).

torch is imported on the first torch call of a session, not with the executor: importing it
costs a worker about a second and hundreds of MiB, which pycuda-only sessions and warm spares
should not pay.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import msgpack

from gpu_agent import protocol as P
from gpu_agent.errors import AgentError
from gpu_agent.sizes import format_bytes

#: live tensors one session may hold (each is a Python object in the worker)
MAX_TENSORS = 1 << 18

#: aten operators a client may not run, though they are aten's: they read files of the agent's
#: machine, or build tensors over memory without checking its bounds
DENIED_OPS = frozenset((
    "aten::from_file", "aten::from_file.out", "aten::_reshape_alias",
    "aten::_reshape_alias_copy", "aten::_reshape_alias_copy.out",
    "aten::set_.source_Storage", "aten::set_.source_Storage_storage_offset",
    "aten::set.source_Storage", "aten::set.source_Storage_storage_offset",
    "aten::set.source_Storage_out", "aten::set.source_Storage_storage_offset_out",
    "aten::_pin_memory", "aten::pin_memory", "aten::is_pinned",
))

#: texts of CUDA errors that leave the context unusable (torch's wording of them)
_STICKY = ("illegal memory access", "device-side assert", "unspecified launch failure",
           "misaligned address", "illegal instruction", "an illegal instruction",
           "CUDA_ERROR_ILLEGAL_ADDRESS", "hardware stack error")

_torch_module: Any = None


def torch_module() -> Any:
    """The agent's torch, imported on first need; NotSupported where it is not installed."""
    global _torch_module
    if _torch_module is None:
        try:
            _torch_module = importlib.import_module("torch")
        except ImportError as e:
            raise AgentError("NotSupported", f"this agent has no PyTorch ({e}): harp tensors "
                             "need torch installed beside harp-agent "
                             "(pip install 'harp-jupyter[torch]')") from None
    return _torch_module


def schema_hash(schema_text: str) -> str:
    """The hash both sides compute of an operator's schema (``str(op._schema)``)."""
    return hashlib.blake2b(schema_text.encode(), digest_size=8).hexdigest()


@dataclass
class _Operators:
    """The agent's aten overloads by name, their schema hashes, and resolved overloads."""

    names: frozenset[str]
    hashes: dict[str, str] = field(default_factory=dict)
    overloads: dict[str, Any] = field(default_factory=dict)
    #: name -> the positions (an index, or a keyword's name) of the arguments it writes
    written: dict[str, tuple[int | str, ...]] = field(default_factory=dict)
    all_hash: str = ""


_operators: _Operators | None = None


def operators() -> _Operators:
    global _operators
    if _operators is None:
        torch = torch_module()
        names = frozenset(n for n in torch._C._dispatch_get_all_op_names()
                          if n.startswith("aten::") and n not in DENIED_OPS)
        table = _Operators(names)
        digest = hashlib.blake2b(digest_size=8)
        for name in sorted(names):
            digest.update(_schema_text(torch, name).encode())
        table.all_hash = digest.hexdigest()
        _operators = table
    return _operators


def _schema_text(torch: Any, name: str) -> str:
    base, _, overload = name.partition(".")
    return str(torch._C._get_schema(base, overload))


def resolve_operator(name: str, client_hash: str) -> Any:
    """The OpOverload called ``name`` ("aten::add.Tensor"), after the allow-list and schema
    checks."""
    table = operators()
    overload = table.overloads.get(name)
    if overload is not None and table.hashes[name] == client_hash:
        return overload
    torch = torch_module()
    if name not in table.names:
        raise AgentError("NotSupported", f"{name} is not an operator this agent runs (its torch "
                         f"{torch.__version__} has no such aten overload, or it is refused)")
    ours = table.hashes.get(name)
    if ours is None:
        ours = table.hashes[name] = schema_hash(_schema_text(torch, name))
    if ours != client_hash:
        raise AgentError("VersionMismatch", f"{name} has another schema on the agent (torch "
                         f"{torch.__version__}: {_schema_text(torch, name)}) than in this "
                         "kernel's torch: install the agent's torch version in the kernel")
    base, _, overload_name = name.partition(".")
    packet = getattr(torch.ops.aten, base.removeprefix("aten::"))
    overload = getattr(packet, overload_name or "default")
    table.overloads[name] = overload
    table.written[name] = tuple(
        (str(argument.name) if argument.kwarg_only else position)
        for position, argument in enumerate(overload._schema.arguments)
        if argument.alias_info is not None and argument.alias_info.is_write)
    return overload


def tensor_returns(schema: Any) -> list[bool]:
    """Which of a schema's returns are single tensors. A synchronous operator's client sends
    one output handle for each (``Tensor`` or ``Tensor?``); an operator may leave one undefined
    (``None``: a gradient its ``output_mask`` did not ask for), and that handle is then never
    made. Both sides count outputs by this rule, so they agree on which handle names which."""
    return [str(ret.type) in ("Tensor", "Tensor?") for ret in schema.returns]


def dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


class TorchOps:
    """The ``op_torch_*`` methods of an ``ExecutorSession``; see the module docstring.

    The executor session provides ``torch_device`` (``"cpu"``, ``"cuda:0"``) and may override
    the memory hooks ``torch_reserve``/``torch_unreserve`` and ``torch_context_lost``."""

    torch_device: str = "cpu"
    #: set by the ExecutorSession this mixes into (base.py)
    slot_cap: int | None = None
    slot_chunk_bytes: Any = staticmethod(lambda: 0)
    _torch_tensors: dict[int, Any] | None = None
    #: output handles of operators that failed -> the operator's name (see the module docstring)
    _torch_failed: dict[int, str] | None = None
    #: storage key -> [bytes reserved, handles using it]
    _torch_storages: dict[int, list[int]] | None = None
    #: handle -> the storage key it is booked under (an in-place ``set_``/resize moves it)
    _torch_keys: dict[int, int] | None = None
    #: the sum of those bytes (the slot check runs on every operator: no sum over storages)
    _torch_total = 0

    # {{{ hooks

    def torch_reserve(self, nbytes: int) -> None:
        """Account ``nbytes`` more tensor memory (MemoryError past the session's room)."""

    def torch_unreserve(self, nbytes: int) -> None:
        """Give back what ``torch_reserve`` took."""

    def torch_context_lost(self) -> None:
        """A sticky CUDA error happened in torch: the device is unusable in this process."""

    # }}}

    # {{{ the registry

    def _tensors(self) -> dict[int, Any]:
        if self._torch_tensors is None:
            torch = torch_module()
            if self.torch_device != "cpu":
                # aten overloads called by name skip torch.cuda's lazy initialisation, and
                # torch.manual_seed only queues the CUDA seed until it happens: without this
                # a seed never reached the CUDA generator (random numbers unlike local CUDA's)
                torch.cuda.init()
            self._torch_tensors, self._torch_storages, self._torch_failed = {}, {}, {}
            self._torch_keys = {}
        return self._torch_tensors

    def _tensor(self, handle: int) -> Any:
        try:
            return self._tensors()[handle]
        except KeyError:
            failed = (self._torch_failed or {}).get(handle)
            if failed is not None:
                raise AgentError("HandleError", f"tensor handle {handle} was never made: the "
                                 f"operator that makes it ({failed}) failed") from None
            raise AgentError("HandleError", f"unknown tensor handle {handle} (freed, or made in "
                             "an earlier GPU session of this kernel)") from None

    def _note_failed(self, outs: list[int | None], name: str) -> None:
        """Keep the output handles of an operator that failed, so the client's frees of them
        are not errors (past ``MAX_TENSORS`` of them the rest are not kept)."""
        try:
            tensors = self._tensors()
        except AgentError:  # no torch here: nothing was made, and no free will be taken
            return
        failed = self._torch_failed
        assert failed is not None
        for handle in outs:
            if handle is not None and handle not in tensors and len(failed) < MAX_TENSORS:
                failed[handle] = name

    def _register(self, pairs: list[tuple[int, Any]]) -> None:
        tensors = self._tensors()
        storages = self._torch_storages
        assert storages is not None
        if len(tensors) + len(pairs) > MAX_TENSORS:
            raise AgentError("MemoryError", f"more than {MAX_TENSORS} live tensors in this "
                             "session: free some (del) before making more")
        new: dict[int, int] = {}
        keys = []
        seen: set[int] = set()
        for handle, tensor in pairs:
            if handle in tensors or handle in seen:
                raise AgentError("HandleError", f"tensor handle {handle} is already in use")
            seen.add(handle)
            key, nbytes = _storage_key(tensor)
            keys.append(key)
            if key not in storages:
                new[key] = nbytes
        total = sum(new.values())
        if total:
            self._check_slot(total)
            self.torch_reserve(total)
            self._torch_total += total
        for key, nbytes in new.items():
            storages[key] = [nbytes, 0]
        failed, booked = self._torch_failed, self._torch_keys
        assert failed is not None and booked is not None
        for (handle, tensor), key in zip(pairs, keys, strict=True):
            tensors[handle] = tensor
            storages[key][1] += 1
            booked[handle] = key
            failed.pop(handle, None)

    def _forget(self, handle: int) -> bool:
        """Drop ``handle`` (False where no tensor or failed operator's output has it)."""
        tensor = self._tensors().pop(handle, None)
        if tensor is None:
            assert self._torch_failed is not None
            return self._torch_failed.pop(handle, None) is not None
        assert self._torch_keys is not None
        self._release(self._torch_keys.pop(handle))
        return True

    def _release(self, key: int) -> None:
        """One handle fewer on storage ``key``: its bytes go back with the last."""
        storages = self._torch_storages
        assert storages is not None
        entry = storages[key]
        entry[1] -= 1
        if entry[1] == 0:
            del storages[key]
            self._torch_total -= entry[0]
            self.torch_unreserve(entry[0])

    def _rebook(self, handles: Iterable[int]) -> None:
        """Move the booking of tensors an operator wrote to the storage they have now: an
        in-place ``set_`` or resize (``out=`` of a data-dependent size) gives a tensor another
        storage, and the old one's bytes must go back when nothing else holds it."""
        tensors, storages, booked = self._tensors(), self._torch_storages, self._torch_keys
        assert storages is not None and booked is not None
        for handle in handles:
            tensor = tensors.get(handle)
            if tensor is None:
                continue
            key, nbytes = _storage_key(tensor)
            old = booked[handle]
            if key == old:
                continue
            if key not in storages:
                self._check_slot(nbytes)
                self.torch_reserve(nbytes)
                self._torch_total += nbytes
                storages[key] = [nbytes, 0]
            storages[key][1] += 1
            booked[handle] = key
            self._release(old)

    def _check_slot(self, nbytes: int) -> None:
        """Tensors share the session's slot with its mapped chunks (on a GPU the operator has
        already allocated them: refused here, they are dropped and their memory goes back)."""
        cap = self.slot_cap
        if cap is None:
            return
        free = cap - self.slot_chunk_bytes() - self.object_bytes()
        if nbytes > free:
            raise AgentError("MemoryError", f"out of memory: harp tensors of "
                             f"{format_bytes(nbytes)}, {format_bytes(max(free, 0))} of this GPU "
                             f"slot's {format_bytes(cap)} free: free tensors "
                             "(del, or a smaller batch) and run it again",
                             "CUDA_ERROR_OUT_OF_MEMORY")

    def torch_bytes(self) -> int:
        """Tensor memory this session holds (each storage counted once)."""
        return self._torch_total

    def object_bytes(self) -> int:
        return self.torch_bytes()

    def torch_close(self) -> None:
        if self._torch_tensors is not None:
            for handle in list(self._torch_tensors):
                self._forget(handle)
            self._torch_failed = {}

    # }}}

    # {{{ operations

    def op_torch_op(self, outs: list[int | None], name: str, schema: str,
                    tree: list[Any]) -> None:
        try:
            self._run_operator(outs, name, schema, tree)
        except Exception:
            # the client has its outputs already (a sync operator's it makes from the reply)
            self._note_failed(outs, name)
            raise

    def op_torch_op_sync(self, outs: list[int | None], name: str, schema: str,
                         tree: list[Any]) -> Any:
        return _describe(self._run_operator(outs, name, schema, tree, sync=True))

    def _run_operator(self, outs: list[int | None], name: str, schema: str,
                      tree: list[Any], sync: bool = False) -> Any:
        with self._torch_errors(name):
            operator = resolve_operator(name, schema)
            args = [self._decode(value) for value in tree[0]]
            kwargs = {key: self._decode(value) for key, value in tree[1].items()}
            result = operator(*args, **kwargs)
            written = operators().written[name]
            if written:
                self._rebook(_handles_at(tree, written))
            produced = _outputs_of(operator, result) if sync else list(_tensors_in(result))
            if len(produced) != len(outs):
                raise AgentError("LogicError", f"{name} produced {len(produced)} tensors; the "
                                 f"client expected {len(outs)} (torch versions differ?)")
            self._register([(h, t) for h, t in zip(outs, produced, strict=True)
                            if h is not None and t is not None])
            return result

    def op_torch_write(self, handle: int, offset: int, data: Any) -> None:
        torch = torch_module()
        with self._torch_errors("torch_write"):
            flat = self._bytes_of(handle, offset, len(data))
            with warnings.catch_warnings():  # frames are read-only; the bytes are only read
                warnings.simplefilter("ignore")
                source = torch.frombuffer(data, dtype=torch.uint8) if len(data) else None
            if source is not None:
                flat[offset:offset + len(data)].copy_(source)

    def op_torch_download(self, handle: int, offset: int, nbytes: int) -> Any:
        with self._torch_errors("torch_download"):
            flat = self._bytes_of(handle, offset, nbytes)
            # a copy: a later call of the same batch may change the tensor before the reply
            return flat[offset:offset + nbytes].to("cpu", copy=True).numpy()

    def _bytes_of(self, handle: int, offset: int, nbytes: int) -> Any:
        torch = torch_module()
        tensor = self._tensor(handle)
        if not tensor.is_contiguous():
            raise AgentError("LogicError", f"tensor {handle} is not contiguous: the client "
                             "copies bytes of contiguous tensors only")
        flat = tensor.reshape(-1).view(torch.uint8)
        if offset + nbytes > flat.numel():
            raise AgentError("LogicError", f"bytes [{offset}, {offset + nbytes}) of a tensor "
                             f"of {flat.numel()} bytes")
        return flat

    def op_torch_free(self, handles: list[int | None]) -> None:
        unknown = [h for h in handles if h is not None and not self._forget(h)]
        if unknown:
            shown = ", ".join(map(str, unknown[:8])) + (", ..." if len(unknown) > 8 else "")
            raise AgentError("HandleError", f"torch_free: unknown tensor handle"
                             f"{'s' if len(unknown) > 1 else ''} {shown} (never made, or "
                             "freed already); the other handles were freed")

    def op_torch_seed(self, seed: int) -> None:
        with self._torch_errors("torch_seed"):
            self._tensors()
            torch_module().manual_seed(seed)

    def op_torch_info(self) -> dict[str, Any]:
        torch = torch_module()
        tensors = self._tensors()
        return {"version": torch.__version__, "device": self.torch_device,
                "cuda": torch.version.cuda, "schema_hash": operators().all_hash,
                "tensors": len(tensors), "bytes": self.torch_bytes(),
                "max_tensors": MAX_TENSORS}

    # }}}

    # {{{ arguments

    def _decode(self, value: Any) -> Any:
        kind = type(value)
        if kind is list:
            return [self._decode(item) for item in value]
        if kind is not dict:
            return value
        ((tag, payload),) = value.items()
        torch = torch_module()
        if tag == P.TORCH_TENSOR:
            return self._tensor(payload)
        if tag == P.TORCH_DTYPE:
            return getattr(torch, payload)
        if tag == P.TORCH_DEVICE:
            return torch.device(self.torch_device)
        if tag == P.TORCH_LAYOUT:
            return torch.strided
        if tag == P.TORCH_MEMORY_FORMAT:
            return getattr(torch, payload)
        if tag == P.TORCH_HOST_TENSOR:
            dtype_text, shape, data = payload
            dtype = getattr(torch, dtype_text)
            if not data:
                host = torch.empty(shape, dtype=dtype)
            else:
                host = torch.frombuffer(bytearray(data), dtype=dtype).reshape(shape)
            return host if host.dim() == 0 else host.to(self.torch_device)
        raise AgentError("ProtocolError", f"unknown tag {tag!r} in a torch argument tree")

    @contextlib.contextmanager
    def _torch_errors(self, name: str) -> Iterator[None]:
        """torch's exceptions as the AgentError the client reads (sticky CUDA ones end the
        session, as pycuda's do)."""
        try:
            yield
        except AgentError:
            raise
        except (RuntimeError, ValueError, TypeError, IndexError, NotImplementedError,
                OverflowError) as e:
            text = f"{type(e).__name__}: {e}"
            torch = torch_module()
            if isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e):
                raise AgentError("MemoryError", f"{name}: {text}",
                                 "CUDA_ERROR_OUT_OF_MEMORY") from None
            if self.torch_device != "cpu" and any(m in str(e) for m in _STICKY):
                self.torch_context_lost()
                raise AgentError("ContextLost", f"{name}: {text}") from None
            raise AgentError("RuntimeError", f"{name}: {text}", type(e).__name__) from None

    # }}}

    # {{{ parking

    def park_objects(self) -> Iterable[tuple[str, Any]]:
        """The session's tensors as payloads for the park files: an index first, then each
        storage's bytes (one at a time, so a GPU session never has two copies in host memory)."""
        if not self._torch_tensors and not self._torch_failed:
            return
        torch = torch_module()
        device = self.torch_device
        if device != "cpu":
            torch.cuda.synchronize(device)
        keys: dict[int, int] = {}
        storages: list[Any] = []
        tensors: list[list[Any]] = []
        for handle, tensor in (self._torch_tensors or {}).items():
            key, _nbytes = _storage_key(tensor)
            if key not in keys:
                keys[key] = len(storages)
                storages.append(tensor.untyped_storage())
            tensors.append([handle, keys[key], dtype_name(tensor.dtype), list(tensor.shape),
                            list(tensor.stride()), tensor.storage_offset()])
        rng = {"cpu": bytes(torch.get_rng_state().numpy())}
        if device != "cpu":
            rng["cuda"] = bytes(torch.cuda.get_rng_state(device).numpy())
        yield "index", msgpack.packb({"tensors": tensors, "rng": rng,
                                      "failed": list((self._torch_failed or {}).items()),
                                      "storages": [s.nbytes() for s in storages]})
        for index, storage in enumerate(storages):
            flat = torch.empty(0, dtype=torch.uint8, device=device).set_(storage)
            yield f"storage{index}", flat.cpu().numpy()

    def restore_objects(self, payloads: list[memoryview]) -> None:
        """Recreate the tensors ``park_objects`` described (payloads in the same order)."""
        if not payloads:
            return
        torch = torch_module()
        try:
            index = msgpack.unpackb(payloads[0], raw=False, strict_map_key=False)
            sizes = index["storages"]
            failed = {int(h): str(n) for h, n in index.get("failed", ())[:MAX_TENSORS]}
            if len(payloads) != len(sizes) + 1:
                raise ValueError(f"{len(payloads) - 1} storages for {len(sizes)}")
        except (ValueError, KeyError, TypeError, msgpack.UnpackException) as e:
            raise AgentError("StateLost", f"the parked tensors' index is damaged: {e}") from None
        device = self.torch_device
        self._tensors()
        storages = []
        for size, payload in zip(sizes, payloads[1:], strict=True):
            if len(payload) != size:
                raise AgentError("StateLost", "a parked tensor storage came back short")
            flat = (torch.frombuffer(payload, dtype=torch.uint8) if size
                    else torch.empty(0, dtype=torch.uint8))
            storages.append(flat.to(device).untyped_storage())
        pairs = []
        for handle, storage_index, dtype, shape, stride, offset in index["tensors"]:
            tensor = torch.empty(0, dtype=getattr(torch, dtype), device=device)
            tensor.set_(storages[storage_index], offset, shape, stride)
            pairs.append((handle, tensor))
        self._register(pairs)
        self._torch_failed = failed
        torch.set_rng_state(torch.frombuffer(bytearray(index["rng"]["cpu"]), dtype=torch.uint8))
        if "cuda" in index["rng"] and device != "cpu":
            torch.cuda.set_rng_state(
                torch.frombuffer(bytearray(index["rng"]["cuda"]), dtype=torch.uint8), device)

    # }}}


def _storage_key(tensor: Any) -> tuple[int, int]:
    storage = tensor.untyped_storage()
    return storage.data_ptr(), storage.nbytes()


def _handles_at(tree: list[Any], positions: tuple[int | str, ...]) -> Iterator[int]:
    """The tensor handles an argument tree passes at ``positions``."""
    args, kwargs = tree[0], tree[1]
    for position in positions:
        if type(position) is int:
            value = args[position] if position < len(args) else None
        else:
            value = kwargs.get(position)
        if type(value) is dict and P.TORCH_TENSOR in value:
            yield value[P.TORCH_TENSOR]


def _outputs_of(operator: Any, result: Any) -> list[Any]:
    """A synchronous operator's outputs by ``tensor_returns``: one per tensor return, None
    where the operator left it undefined."""
    kinds = tensor_returns(operator._schema)
    values = [result] if len(kinds) == 1 else list(result)
    return [value for value, kind in zip(values, kinds, strict=True) if kind]


def _tensors_in(result: Any) -> Iterator[Any]:
    """The tensors of an operator's result, in order (tuples and lists flattened)."""
    if isinstance(result, tuple | list):
        for item in result:
            yield from _tensors_in(item)
    elif isinstance(result, torch_module().Tensor):
        yield result


def _describe(result: Any) -> Any:
    """An operator's result for the wire: tensors as their layout, scalars as they are."""
    if isinstance(result, tuple | list):
        return [_describe(item) for item in result]
    if result is None or type(result) in (bool, int, float, complex):
        return result
    if hasattr(result, "untyped_storage"):
        return {P.TORCH_TENSOR: [dtype_name(result.dtype), list(result.shape),
                                 list(result.stride()), result.storage_offset()]}
    raise AgentError("NotSupported", f"an operator result of type {type(result).__name__} "
                     "cannot travel to the client")
