"""Kernel argument packing on the client: ``ArgPacker``'s per-type plans give exactly the bytes
of the general rules (``build_arg_buf``, pycuda's), and fall back to them where types alone do
not decide the packing."""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import pytest

from harp_jupyter.shim.pycuda import _kernel_args


class Pointer:
    """A pointer object, as DeviceAllocation is to the driver."""

    def __init__(self, address: int) -> None:
        self.address = address

    def __int__(self) -> int:
        return self.address


class Handler:
    def __init__(self, address: int) -> None:
        self.address = address


class Interfaced:
    """A device array known to the packer by a registered getter."""

    def __init__(self, address: int) -> None:
        self.address = address

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        return {"data": (self.address, False)}


class InterfacedSubclass(Interfaced):
    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        return {"data": (self.address + 1, False)}


_kernel_args.register_pointer_type(Interfaced, lambda a: a.address)


def general(args: list[Any]) -> tuple[list[Any], bytes]:
    return _kernel_args.build_arg_buf(args, (Pointer,), Handler, lambda h: h.address)


@pytest.fixture
def packer() -> _kernel_args.ArgPacker:
    return _kernel_args.ArgPacker((Pointer,), Handler, lambda h: h.address)


@pytest.mark.parametrize("args", [
    [],
    [np.int32(7)],
    [Pointer(0x7F00_0000_1000), np.int32(-3), np.float32(2.5), np.float64(-1.25)],
    [np.int8(1), Interfaced(0x1234_5678), np.uint64(2**63 + 5), np.uint8(255), Pointer(8)],
    [np.float16(0.5), np.int16(-2), Pointer(16)],
])
def test_a_plan_packs_what_the_general_rules_pack(packer: _kernel_args.ArgPacker,
                                                  args: list[Any]) -> None:
    assert packer.pack_call(tuple(args)) == general(args)
    assert packer.pack_call(tuple(args)) == general(args)  # the second call uses the plan


def test_a_plan_is_per_types_and_packs_each_calls_values(
        packer: _kernel_args.ArgPacker) -> None:
    first = packer.pack_call((Pointer(0x1000), np.int32(1)))[1]
    second = packer.pack_call((Pointer(0x2000), np.int32(2)))[1]
    assert struct.unpack("Pi", first[:12]) == (0x1000, 1)
    assert struct.unpack("Pi", second[:12]) == (0x2000, 2)
    wider = packer.pack_call((Pointer(0x2000), np.int64(2)))[1]  # other types: another plan
    assert wider == general([Pointer(0x2000), np.int64(2)])[1] and len(wider) == 16


def test_calls_the_types_do_not_decide_take_the_general_rules(
        packer: _kernel_args.ArgPacker) -> None:
    handler = Handler(0x3000)
    host = np.arange(3, dtype=np.int16)
    record = np.zeros(1, dtype=[("a", np.int8), ("b", np.float64)])[0]
    for args in ([handler, np.int32(1)], [host, Pointer(8)], [record], [np.complex64(1 + 2j)],
                 [InterfacedSubclass(0x40)]):
        for _ in range(2):
            assert packer.pack_call(tuple(args)) == general(args)
    assert packer.pack_call((handler,))[0] == [handler]
    # a subclass of a registered type is asked for its pointer as the general rules ask
    assert struct.unpack("P", packer.pack_call((InterfacedSubclass(0x40),))[1]) == (0x41,)


def test_a_bad_argument_fails_as_in_pycuda_every_time(packer: _kernel_args.ArgPacker) -> None:
    for _ in range(2):
        with pytest.raises(TypeError, match="parameter #1"):
            packer.pack_call((Pointer(8), 5))
    if hasattr(np, "longdouble") and np.dtype(np.longdouble).char == "g":
        for _ in range(2):  # no struct code for it: pycuda's packer fails too
            with pytest.raises(struct.error):
                packer.pack_call((np.longdouble(1),))


@pytest.mark.parametrize("fmt,values", [
    ("", ()), ("iP", (3, 0x1000)), ("fd", (1.5, -2.0)), ("iD", (7, 1.5 - 2j)),
    ("i8s", (1, np.zeros(2, np.float32))),
])
def test_a_prepared_packer_packs_as_pack(fmt: str, values: tuple[Any, ...]) -> None:
    assert _kernel_args.packer_for(fmt)(*values) == _kernel_args.pack(fmt, *values)


class IndexedPointer(Pointer):
    __index__ = Pointer.__int__


class OverridingPointer(IndexedPointer):
    """Changes __int__ only: its inherited __index__ is not its pointer."""

    def __int__(self) -> int:
        return self.address + 8


def test_a_pointer_is_what_int_says_whether_or_not_the_struct_may_take_it_as_it_is(
        packer: _kernel_args.ArgPacker) -> None:
    for pointer, address in ((IndexedPointer(0x5000), 0x5000),
                             (OverridingPointer(0x5000), 0x5008)):
        for _ in range(2):
            _, buf = packer.pack_call((pointer, np.int32(1)))
            assert buf == general([pointer, np.int32(1)])[1]
            assert struct.unpack("P", buf[:8]) == (address,)
