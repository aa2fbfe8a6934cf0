"""Kernel argument packing exactly as pycuda does it, on the client.

pycuda packs launch arguments with its ``_pvt_struct`` module: Python's ``struct`` format language
with native alignment, plus ``F``/``D`` for complex64/complex128 (NumPy's type characters). The
packed buffer is what ``cuLaunchKernel`` receives, so the agent launches it as it is.

A launch is the hot path: ``ArgPacker`` keeps, per tuple of argument types, the packing a call
with those types needs (where the types alone decide it: NumPy scalars and pointer objects), so
a loop of launches finds its plan with one lookup instead of classifying every argument again.
"""

from __future__ import annotations

import functools
import re
import struct
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any

import numpy as np

_TOKEN = re.compile(r"\s*(\d*)\s*([A-Za-z?])")


@lru_cache(maxsize=512)
def _plan(fmt: str) -> tuple[struct.Struct, tuple[int, ...] | None, tuple[int, ...]]:
    """The struct for ``fmt``, which values are complex (None when none is), and which values
    are byte strings (``s``)."""
    prefix = ""
    if fmt and fmt[0] in "@=<>!":  # ("" is "in" every string: a kernel without arguments)
        prefix, fmt = fmt[0], fmt[1:]
    parts: list[str] = []
    complex_values: list[int] = []
    string_values: list[int] = []
    value_index = 0
    pos = 0
    for match in _TOKEN.finditer(fmt):
        if match.start() != pos:
            break
        pos = match.end()
        count_text, char = match.groups()
        count = int(count_text) if count_text else 1
        if char in "FD":
            base = "f" if char == "F" else "d"
            parts.append(f"{2 * count}{base}")
            complex_values.extend(range(value_index, value_index + count))
            value_index += count
        else:
            parts.append(f"{count_text}{char}")
            if char == "s":
                string_values.append(value_index)
            value_index += 1 if char in "sp" else (0 if char == "x" else count)
    if fmt[pos:].strip():
        raise struct.error(f"bad char in struct format: {fmt[pos:]!r}")
    packer = struct.Struct(prefix + "".join(parts))
    return packer, tuple(complex_values) if complex_values else None, tuple(string_values)


def _as_bytes(value: Any) -> Any:
    """An ``s`` item as pycuda's packer takes it: bytes, or any object with the buffer protocol
    (a ``gpuarray.vec`` value, a structured ndarray or np.void) as its raw bytes."""
    if isinstance(value, bytes | bytearray):
        return value
    try:
        return memoryview(value).tobytes()
    except TypeError:
        raise struct.error("argument for 's' must be a bytes object") from None


def pack(fmt: str, *values: Any) -> bytes:
    """``struct.pack`` with pycuda's complex extension; ``s`` items may be any buffer."""
    packer, complex_values, string_values = _plan(fmt)
    if string_values:
        values = tuple(_as_bytes(v) if i in string_values else v for i, v in enumerate(values))
    if complex_values is None:
        return packer.pack(*values)
    flat: list[Any] = []
    complex_set = set(complex_values)
    for i, value in enumerate(values):
        if i in complex_set:
            z = complex(value)
            flat.extend((z.real, z.imag))
        else:
            flat.append(value)
    return packer.pack(*flat)


def calcsize(fmt: str) -> int:
    return _plan(fmt)[0].size


def format_for_types(arg_types: Sequence[Any]) -> str:
    """The format string ``Function.prepare(arg_types)`` builds."""
    fmt = ""
    for arg_type in arg_types:
        if isinstance(arg_type, type) and np.number in arg_type.__mro__:
            fmt += np.dtype(arg_type).char
        elif isinstance(arg_type, np.dtype):
            fmt += f"{arg_type.itemsize}s" if arg_type.char == "V" else arg_type.char
        elif isinstance(arg_type, str):
            fmt += arg_type
        else:
            fmt += np.dtype(np.uintp).char
    return fmt


def packer_for(fmt: str) -> Callable[..., bytes]:
    """A function packing values as ``pack(fmt, *values)`` does (for ``Function.prepare``):
    the struct's own ``pack`` when the format has no complex or ``s`` items."""
    packer, complex_values, string_values = _plan(fmt)
    if complex_values is None and not string_values:
        return packer.pack
    return functools.partial(pack, fmt)


#: types passed to kernels as a device pointer read by a getter (exact types: a subclass may
#: change how it presents its pointer), registered by the modules that define them
_POINTER_GETTERS: dict[type, Callable[[Any], int]] = {}
_MAX_PLANS = 1024


def register_pointer_type(cls: type, pointer_of: Callable[[Any], int]) -> None:
    """Objects of exactly ``cls`` go to kernels as ``pointer_of(obj)`` (what the general rules
    of ``build_arg_buf`` would find for them, found without looking)."""
    _POINTER_GETTERS[cls] = pointer_of


class ArgPacker:
    """``build_arg_buf`` for one set of pointer and handler types, with a plan per tuple of
    argument types (None: the general path, for calls with handlers, arrays by value, ...)."""

    def __init__(self, pointer_types: tuple[type, ...], handler_type: type,
                 device_alloc_of: Callable[[Any], Any]) -> None:
        self._pointer_types = pointer_types
        self._handler_type = handler_type
        self._device_alloc_of = device_alloc_of
        self._plans: dict[tuple[type, ...],
                          tuple[Callable[..., bytes], tuple[Any, ...] | None] | None] = {}

    def pack_call(self, args: tuple[Any, ...]) -> tuple[list[Any], bytes]:
        """``(argument handlers, packed buffer)``, as ``build_arg_buf`` returns them."""
        key = tuple(map(type, args))
        try:
            plan = self._plans[key]
        except KeyError:
            plan = self._plan_for(key)
        if plan is None:
            return build_arg_buf(args, self._pointer_types, self._handler_type,
                                 self._device_alloc_of)
        pack_values, converters = plan
        if converters is None:
            return [], pack_values(*args)
        return [], pack_values(*[value if convert is None else convert(value)
                                 for value, convert in zip(args, converters, strict=True)])

    def _plan_for(self, key: tuple[type, ...]
                  ) -> tuple[Callable[..., bytes], tuple[Any, ...] | None] | None:
        fmt: list[str] = []
        converters: list[Any] = []
        for cls in key:  # in build_arg_buf's order of tests
            if issubclass(cls, np.number):
                fmt.append(np.dtype(cls).char)
                converters.append(None)
            elif issubclass(cls, self._pointer_types):
                fmt.append("P")
                # the struct takes an object whose __index__ is its __int__ as it is
                to_int = getattr(cls, "__int__", None)
                converters.append(None if to_int is not None
                                  and getattr(cls, "__index__", None) is to_int else int)
            elif cls in _POINTER_GETTERS and not issubclass(cls, self._handler_type):
                fmt.append("P")
                converters.append(_POINTER_GETTERS[cls])
            else:
                return self._remember(key, None)
        try:
            packer, complex_values, string_values = _plan("".join(fmt))
        except struct.error:
            return self._remember(key, None)  # the general path raises it, as pycuda does
        if complex_values is not None or string_values:
            return self._remember(key, None)
        return self._remember(key, (packer.pack, tuple(converters)
                                    if any(c is not None for c in converters) else None))

    def _remember(self, key: tuple[type, ...], plan: Any) -> Any:
        if len(self._plans) < _MAX_PLANS:
            self._plans[key] = plan
        return plan


def build_arg_buf(args: Sequence[Any], pointer_types: tuple[type, ...],
                  handler_type: type, device_alloc_of: Callable[[Any], Any]
                  ) -> tuple[list[Any], bytes]:
    """``(argument handlers, packed buffer)`` for ``Function.__call__``'s arguments.

    NumPy scalars by value; pointer objects (``pointer_types``, ``__cuda_array_interface__``,
    ``.gpudata``) as device pointers; ``ndarray``/``np.void`` by value as raw bytes; In/Out/InOut
    handlers (``handler_type``) as the pointer of their device copy. Anything else, Python ints
    and floats included, is a TypeError, as in pycuda."""
    handlers: list[Any] = []
    fmt: list[str] = []
    data: list[Any] = []
    for i, arg in enumerate(args):
        if isinstance(arg, np.number):
            fmt.append(arg.dtype.char)
            data.append(arg)
        elif isinstance(arg, pointer_types):
            fmt.append("P")
            data.append(int(arg))
        elif isinstance(arg, handler_type):
            handlers.append(arg)
            fmt.append("P")
            data.append(int(device_alloc_of(arg)))
        elif isinstance(arg, np.ndarray):
            fmt.append(f"{arg.nbytes}s")
            data.append(arg.tobytes())
        elif isinstance(arg, np.void):
            fmt.append(f"{arg.itemsize}s")
            data.append(bytes(memoryview(arg)))
        else:
            interface = getattr(arg, "__cuda_array_interface__", None)
            if interface:
                fmt.append("P")
                data.append(int(interface["data"][0]))
                continue
            try:
                pointer = int(np.uintp(arg.gpudata))
            except AttributeError:
                raise TypeError(f"invalid type on parameter #{i} (0-based)") from None
            fmt.append("P")
            data.append(pointer)
    return handlers, pack("".join(fmt), *data)
