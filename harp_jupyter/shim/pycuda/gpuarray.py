"""pycuda.gpuarray, forwarded: arrays live in the agent's device memory, operations run there.

A ``GPUArray`` here is a shape, a dtype, strides and a device allocation. Every operation
allocates its result on the client (dtype and shape inferred as pycuda does) and queues one
``array`` call for the agent, so nothing waits for the GPU until the user reads a value
(``get()``, ``str()``, ``bool()``...).
"""

from __future__ import annotations

import builtins
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from gpu_agent.protocol import dtype_text
from harp_jupyter.shim.errors import user_facing
from harp_jupyter.shim.pycuda import _kernel_args
from harp_jupyter.shim.pycuda import driver as drv
from harp_jupyter.shim.pycuda.characterize import has_double_support  # noqa: F401 - pycuda's
from harp_jupyter.shim.session import RemoteSession, get_session

Scalar = numbers.Number | np.generic


def _session() -> RemoteSession:
    return get_session()


def _stream_handle(stream: Any) -> int | None:
    return None if stream is None else drv._stream_handle(stream)


def _contiguous_strides(shape: tuple[int, ...], itemsize: int, order: str) -> tuple[int, ...]:
    strides = []
    step = itemsize
    dims = shape if order == "F" else tuple(reversed(shape))
    for n in dims:
        strides.append(step)
        step *= builtins.max(n, 1)
    return tuple(strides) if order == "F" else tuple(reversed(strides))


def _is_contiguous(shape: tuple[int, ...], strides: tuple[int, ...], itemsize: int,
                   order: str) -> bool:
    """NumPy's rule: contiguous in ``order``, ignoring the strides of axes of length 1."""
    if 0 in shape:
        return True
    expected = itemsize
    axes = range(len(shape)) if order == "F" else reversed(range(len(shape)))
    for axis in axes:
        if shape[axis] != 1:
            if strides[axis] != expected:
                return False
            expected *= shape[axis]
    return True


class _ArrayFlags:
    """``GPUArray.flags``, as pycuda's: one class whose instances say ``c_contiguous``,
    ``f_contiguous`` and ``forc`` (built on every use: a class made per call cost more than the
    array operation that asked)."""

    __slots__ = ("c_contiguous", "f_contiguous", "forc")

    def __init__(self, c_contiguous: bool, f_contiguous: bool) -> None:
        self.c_contiguous, self.f_contiguous = c_contiguous, f_contiguous
        self.forc = c_contiguous or f_contiguous


def _is_scalar(value: Any) -> bool:
    return isinstance(value, numbers.Number | np.generic) and not isinstance(value, np.ndarray)


def _scalar(value: Any) -> Any:
    """A scalar as it travels: Python bool/int/float/complex."""
    return value.item() if isinstance(value, np.generic) else value


def _common_dtype(a: Any, b: Any) -> np.dtype:
    def part(x: Any) -> Any:
        if isinstance(x, GPUArray):
            return x.dtype
        return _scalar(x)  # Python scalars are weak, as in NumPy 2 and pycuda

    return np.result_type(part(a), part(b))


def _broadcast_shape(a: Any, b: Any) -> tuple[int, ...]:
    shapes = [x.shape for x in (a, b) if isinstance(x, GPUArray)]
    if len(shapes) == 2 and shapes[0] != shapes[1] and () not in shapes:
        raise NotImplementedError(
            f"Broadcasting binary operator with shapes: {shapes[0]}, {shapes[1]}.")
    return builtins.max(shapes, key=len)


def _operand(value: Any) -> Any:
    return value.descriptor if isinstance(value, GPUArray) else _scalar(value)


def _run(function: str, out: GPUArray, operands: Sequence[Any], stream: Any = None,
         **kwargs: Any) -> GPUArray:
    if out.size or function in ("sum", "dot", "max", "min", "any", "all"):
        _session().call("array", function, out.descriptor, [_operand(x) for x in operands],
                        kwargs, _stream_handle(stream))
    return out


class GPUArray:
    """An array in the GPU agent's memory, with pycuda's GPUArray interface."""

    __array_priority__ = 100

    def __init__(self, shape: Any, dtype: Any, allocator: Callable[[int], Any] | None = None,
                 base: Any = None, gpudata: Any = None, strides: Any = None,
                 order: str = "C") -> None:
        if isinstance(shape, np.ndarray) and shape.ndim == 0:
            shape = shape.item()
        shape = (int(shape),) if isinstance(shape, numbers.Integral) else tuple(
            int(n) for n in shape)
        self.shape = shape
        self.dtype = np.dtype(dtype)
        self.size = math.prod(shape)  # (np.prod: 40x the time, on every result array)
        self.nbytes = self.size * self.dtype.itemsize
        self.itemsize = self.dtype.itemsize
        self.mem_size = self.size
        self.strides = (tuple(int(s) for s in strides) if strides is not None
                        else _contiguous_strides(shape, self.dtype.itemsize, order))
        self.allocator = allocator or drv.mem_alloc
        self.base = base
        if gpudata is None:
            gpudata = self.allocator(self.nbytes) if self.nbytes else None
        self.gpudata = gpudata

    # {{{ basics

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def ptr(self) -> int:
        return int(self.gpudata) if self.gpudata is not None else 0

    @property
    def descriptor(self) -> list[Any]:
        return [self.ptr, dtype_text(self.dtype), list(self.shape), list(self.strides)]

    @property
    def flags(self) -> _ArrayFlags:
        return _ArrayFlags(_is_contiguous(self.shape, self.strides, self.dtype.itemsize, "C"),
                           _is_contiguous(self.shape, self.strides, self.dtype.itemsize, "F"))

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        return {"shape": self.shape, "strides": self.strides, "data": (self.ptr, False),
                "typestr": self.dtype.str, "stream": None, "version": 3}

    def __len__(self) -> int:
        if not self.shape:
            raise TypeError("len() of unsized object")
        return self.shape[0]

    def _new_like_me(self, dtype: Any = None, shape: Any = None, order: str = "C") -> GPUArray:
        dtype = self.dtype if dtype is None else np.dtype(dtype)
        if shape is None and dtype == self.dtype and self.flags.forc:
            # as pycuda: a result of the same dtype keeps the layout (an F array stays F)
            return GPUArray(self.shape, dtype, allocator=self.allocator, strides=self.strides)
        return GPUArray(self.shape if shape is None else shape, dtype, allocator=self.allocator,
                        order=order)

    def _contiguous(self) -> GPUArray:
        return self if self.flags.forc else self.copy()

    # }}}

    # {{{ host transfers

    @user_facing
    def set(self, ary: Any, async_: bool = False, stream: Any = None) -> None:
        ary = np.asarray(ary)
        if ary.size != self.size:
            raise ValueError("ary and self must be the same size")
        if ary.dtype != self.dtype:
            raise ValueError("ary and self must have the same dtype")
        if not self.flags.forc:
            raise RuntimeError("only contiguous arrays may be set from host")
        if self.size:
            order = "F" if self.flags.f_contiguous and not self.flags.c_contiguous else "C"
            data = np.ascontiguousarray(ary) if order == "C" else np.asfortranarray(ary)
            _session().htod(self.ptr, data.reshape(-1, order="A"), _stream_handle(stream),
                            keep=async_)

    def set_async(self, ary: Any, stream: Any = None) -> None:
        self.set(ary, async_=True, stream=stream)

    @user_facing
    def get(self, ary: np.ndarray | None = None, pagelocked: bool = False,
            async_: bool = False, stream: Any = None) -> np.ndarray:
        source = self._contiguous()
        order = "F" if source.flags.f_contiguous and not source.flags.c_contiguous else "C"
        if ary is None:
            ary = np.empty(self.shape, self.dtype, order=order)
        elif ary.size != self.size or ary.dtype != self.dtype:
            raise TypeError("'ary' has non-matching size or type")
        if self.size:
            target = ary if ary.flags.c_contiguous or ary.flags.f_contiguous else np.empty_like(ary)
            _session().dtoh_into(target.reshape(-1, order="A"), source.ptr,
                                 _stream_handle(stream), wait=not async_)
            if target is not ary:
                ary[...] = target
        return ary

    def get_async(self, stream: Any = None, ary: np.ndarray | None = None) -> np.ndarray:
        return self.get(ary=ary, async_=True, stream=stream)

    def copy(self) -> GPUArray:
        return _run("copy", self._new_like_me(), [self])

    @user_facing
    def __str__(self) -> str:
        return str(self.get())

    @user_facing
    def __repr__(self) -> str:
        return repr(self.get())

    def __hash__(self) -> int:
        raise TypeError("GPUArrays are not hashable.")

    @user_facing
    def __bool__(self) -> bool:
        if self.size == 1:
            return bool(self.get())
        raise ValueError("The truth value of an array with more than one element is "
                         "ambiguous. Use a.any() or a.all()")

    @user_facing
    def __float__(self) -> float:
        return float(self.get())

    @user_facing
    def __int__(self) -> int:
        return int(self.get())

    @user_facing
    def __complex__(self) -> complex:
        return complex(self.get())

    # }}}

    # {{{ arithmetic

    def _binary(self, function: str, other: Any, reflected: bool = False,
                dtype: Any = None) -> GPUArray:
        if not (isinstance(other, GPUArray) or _is_scalar(other)):
            return NotImplemented
        out = GPUArray(_broadcast_shape(self, other), dtype or _common_dtype(self, other),
                       allocator=self.allocator)
        operands = [other, self] if reflected else [self, other]
        return _run(function, out, operands)

    def _inplace(self, function: str, other: Any) -> GPUArray:
        if not (isinstance(other, GPUArray) or _is_scalar(other)):
            return NotImplemented
        return _run(function, self, [self, other])

    def __add__(self, other: Any) -> GPUArray:
        return self._binary("add", other)

    def __radd__(self, other: Any) -> GPUArray:
        return self._binary("add", other, True)

    def __sub__(self, other: Any) -> GPUArray:
        return self._binary("subtract", other)

    def __rsub__(self, other: Any) -> GPUArray:
        return self._binary("subtract", other, True)

    def __mul__(self, other: Any) -> GPUArray:
        return self._binary("multiply", other)

    def __rmul__(self, other: Any) -> GPUArray:
        return self._binary("multiply", other, True)

    def _true_dtype(self, other: Any) -> np.dtype:
        dtype = _common_dtype(self, other)
        return dtype if dtype.kind in "fc" else np.dtype(np.float64)

    def __truediv__(self, other: Any) -> GPUArray:
        return self._binary("divide", other, dtype=self._true_dtype(other))

    def __rtruediv__(self, other: Any) -> GPUArray:
        return self._binary("divide", other, True, dtype=self._true_dtype(other))

    __div__, __rdiv__ = __truediv__, __rtruediv__

    def __pow__(self, other: Any) -> GPUArray:
        return self._binary("power", other)

    def __rpow__(self, other: Any) -> GPUArray:
        return self._binary("power", other, True)

    def __iadd__(self, other: Any) -> GPUArray:
        return self._inplace("add", other)

    def __isub__(self, other: Any) -> GPUArray:
        return self._inplace("subtract", other)

    def __imul__(self, other: Any) -> GPUArray:
        return self._inplace("multiply", other)

    def __itruediv__(self, other: Any) -> GPUArray:
        return self._inplace("divide", other)

    __idiv__ = __itruediv__

    def __ipow__(self, other: Any) -> GPUArray:
        return self._inplace("power", other)

    def __neg__(self) -> GPUArray:
        return _run("negative", self._new_like_me(), [self])

    def __pos__(self) -> GPUArray:
        return self

    def __abs__(self) -> GPUArray:
        dtype = np.empty(0, self.dtype).real.dtype if self.dtype.kind == "c" else self.dtype
        return _run("absolute", self._new_like_me(dtype), [self])

    def __eq__(self, other: Any) -> Any:  # type: ignore[override]
        return self._binary("equal", other)

    def __ne__(self, other: Any) -> Any:  # type: ignore[override]
        return self._binary("not_equal", other)

    def __lt__(self, other: Any) -> GPUArray:
        return self._binary("less", other)

    def __le__(self, other: Any) -> GPUArray:
        return self._binary("less_equal", other)

    def __gt__(self, other: Any) -> GPUArray:
        return self._binary("greater", other)

    def __ge__(self, other: Any) -> GPUArray:
        return self._binary("greater_equal", other)

    def mul_add(self, selffac: Any, other: GPUArray, otherfac: Any, add_timer: Any = None,
                stream: Any = None, out: GPUArray | None = None) -> GPUArray:
        if out is None:
            out = self._new_like_me(_common_dtype(self, other))
        return _run("axpbyz", out, [self, other], stream, a=_scalar(selffac),
                    b=_scalar(otherfac))

    def fill(self, value: Any, stream: Any = None) -> GPUArray:
        if self.dtype.names is not None:
            return self._fill_structured(value, stream)
        return _run("fill", self, [_scalar(value)], stream)

    def _fill_structured(self, value: Any, stream: Any) -> GPUArray:
        """fill() of a structured array (``gpuarray.vec``): its value is no wire scalar. A
        value whose bytes repeat one 32-bit word (zeros, most fills) is a memset on the agent;
        any other goes up as the array's bytes."""
        if not self.flags.forc:
            raise RuntimeError("only contiguous arrays may be used as arguments to this "
                               "operation")
        item = np.full((), value, self.dtype)
        if not self.size:
            return self
        words = np.frombuffer(item.tobytes(), np.uint32) if self.itemsize % 4 == 0 else None
        if words is not None and (words == words[0]).all():
            drv._memset(self.gpudata, int(words[0]), 4, self.nbytes // 4, stream)
        elif not item.tobytes().strip(b"\0"):
            drv._memset(self.gpudata, 0, 1, self.nbytes, stream)
        else:
            self.set(np.full(self.shape, item, self.dtype), async_=stream is not None,
                     stream=stream)
        return self

    def astype(self, dtype: Any, stream: Any = None) -> GPUArray:
        return _run("copy", self._new_like_me(dtype), [self], stream)

    def reverse(self, stream: Any = None) -> GPUArray:
        return _run("reverse", self._new_like_me(), [self], stream)

    def conj(self, out: GPUArray | None = None) -> GPUArray:
        if self.dtype.kind != "c":
            return self  # pycuda: real arrays are their own conjugate (out is not written)
        if not self.flags.forc:
            raise RuntimeError("only contiguous arrays may be used as arguments to this "
                               "operation")
        return _run("conj", self._new_like_me() if out is None else out, [self])

    conjugate = conj

    @property
    def real(self) -> GPUArray:
        if self.dtype.kind != "c":
            return self
        return _run("real", self._new_like_me(np.empty(0, self.dtype).real.dtype), [self])

    @property
    def imag(self) -> GPUArray:
        dtype = np.empty(0, self.dtype).real.dtype
        if self.dtype.kind != "c":
            return zeros_like(self)
        return _run("imag", self._new_like_me(dtype), [self])

    def any(self, stream: Any = None, allocator: Any = None) -> GPUArray:
        return _run("any", self._new_like_me(np.bool_, ()), [self], stream)

    def all(self, stream: Any = None, allocator: Any = None) -> GPUArray:
        return _run("all", self._new_like_me(np.bool_, ()), [self], stream)

    # }}}

    # {{{ views

    def _view(self, shape: tuple[int, ...], strides: tuple[int, ...], offset: int = 0,
              dtype: Any = None) -> GPUArray:
        gpudata = self.gpudata
        if offset:
            gpudata = _Offset(self.gpudata, offset)
        return GPUArray(shape, self.dtype if dtype is None else dtype, allocator=self.allocator,
                        base=self, gpudata=gpudata, strides=strides)

    def reshape(self, *shape: Any, order: str = "C") -> GPUArray:
        """pycuda's reshape: a view of the same memory laid out in ``order`` (the array itself
        when shape and layout are unchanged); only contiguous arrays."""
        if not self.flags.forc:
            raise RuntimeError("only contiguous arrays may be used as arguments to this "
                               "operation")
        if len(shape) == 1 and not isinstance(shape[0], numbers.Integral):
            shape = tuple(shape[0])
        shape = tuple(int(n) for n in shape)
        same_layout = self.flags.c_contiguous if order == "C" else self.flags.f_contiguous
        if shape == self.shape and same_layout:
            return self
        if shape.count(-1) > 1:
            raise ValueError("can only specify one unknown dimension")
        if -1 in shape:
            known = int(np.prod([n for n in shape if n != -1], dtype=np.int64))
            shape = tuple(self.size // known if n == -1 else n for n in shape)
        if int(np.prod(shape, dtype=np.int64)) != self.size:
            raise ValueError("total size of new array must be unchanged")
        return self._view(shape, _contiguous_strides(shape, self.dtype.itemsize, order))

    def ravel(self, order: str = "C") -> GPUArray:
        return self.reshape(self.size, order=order)

    def view(self, dtype: Any = None) -> GPUArray:
        if dtype is None:
            return self._view(self.shape, self.strides)
        dtype = np.dtype(dtype)
        if not self.flags.c_contiguous:
            raise ValueError("view with another dtype needs a C-contiguous array")
        last = self.shape[-1] * self.dtype.itemsize // dtype.itemsize if self.shape else 1
        shape = (*self.shape[:-1], last) if self.shape else ()
        return self._view(shape, _contiguous_strides(shape, dtype.itemsize, "C"), dtype=dtype)

    def squeeze(self) -> GPUArray:
        if 1 not in self.shape:
            return self
        keep = [i for i, n in enumerate(self.shape) if n != 1]
        return self._view(tuple(self.shape[i] for i in keep),
                          tuple(self.strides[i] for i in keep))

    def transpose(self, axes: Sequence[int] | None = None) -> GPUArray:
        axes = tuple(reversed(range(self.ndim))) if axes is None else tuple(axes)
        return self._view(tuple(self.shape[i] for i in axes), tuple(self.strides[i] for i in axes))

    @property
    def T(self) -> GPUArray:
        return self.transpose()

    def __getitem__(self, index: Any) -> GPUArray:
        if not isinstance(index, tuple):
            index = (index,)
        if builtins.any(i is Ellipsis for i in index):
            at = index.index(Ellipsis)
            fill = self.ndim - (len(index) - 1 - index.count(None))
            index = index[:at] + (slice(None),) * fill + index[at + 1:]
        shape: list[int] = []
        strides: list[int] = []
        offset = 0
        axis = 0
        for item in index:
            if item is None:
                shape.append(1)
                strides.append(0)
                continue
            if axis >= self.ndim:
                raise IndexError("too many indices for array")
            n, s = self.shape[axis], self.strides[axis]
            if isinstance(item, slice):
                start, stop, step = item.indices(n)
                length = len(range(start, stop, step))
                offset += start * s
                shape.append(length)
                strides.append(s * step)
            elif isinstance(item, numbers.Integral):
                i = int(item) + n if item < 0 else int(item)
                if not 0 <= i < n:
                    raise IndexError(f"index {item} is out of bounds for axis {axis} "
                                     f"with size {n}")
                offset += i * s
            else:
                raise IndexError(f"unsupported index {item!r} (GPUArray supports basic "
                                 "slicing; use take() for index arrays)")
            axis += 1
        shape += self.shape[axis:]
        strides += self.strides[axis:]
        return self._view(tuple(shape), tuple(strides), offset)

    def __setitem__(self, index: Any, value: Any) -> None:
        target = self[index]
        if isinstance(value, GPUArray):
            if value.size != target.size:
                raise ValueError("shapes of source and destination do not match")
            _run("copy", target, [value._contiguous().reshape(target.shape)
                                  if value.shape != target.shape else value])
        elif _is_scalar(value):
            target.fill(value)
        else:
            host = np.broadcast_to(np.asarray(value, target.dtype), target.shape)
            _run("copy", target, [to_gpu(np.ascontiguousarray(host))])

    # }}}


class _Offset:
    """A pointer into the middle of an allocation (keeps the allocation alive)."""

    __slots__ = ("_address", "base")

    def __init__(self, base: Any, offset: int) -> None:
        self.base = base
        self._address = int(base) + offset

    def __int__(self) -> int:
        return self._address

    __index__ = __int__


# a GPUArray passed to a kernel is its pointer (what its __cuda_array_interface__ says)
_kernel_args.register_pointer_type(GPUArray, lambda array: array.ptr)


# {{{ creation


@user_facing
def to_gpu(ary: Any, allocator: Callable[[int], Any] | None = None) -> GPUArray:
    ary = np.asarray(ary)
    order = "F" if ary.flags.f_contiguous and not ary.flags.c_contiguous else "C"
    result = GPUArray(ary.shape, ary.dtype, allocator, order=order)
    result.set(ary)
    return result


def to_gpu_async(ary: Any, allocator: Any = None, stream: Any = None) -> GPUArray:
    ary = np.asarray(ary)
    result = GPUArray(ary.shape, ary.dtype, allocator)
    result.set_async(np.ascontiguousarray(ary), stream)
    return result


def empty(shape: Any, dtype: Any, allocator: Any = None, order: str = "C") -> GPUArray:
    return GPUArray(shape, dtype, allocator, order=order)


def zeros(shape: Any, dtype: Any = np.float64, allocator: Any = None,
          order: str = "C") -> GPUArray:
    return empty(shape, dtype, allocator, order).fill(0)


def ones(shape: Any, dtype: Any = np.float64, allocator: Any = None,
         order: str = "C") -> GPUArray:
    return empty(shape, dtype, allocator, order).fill(1)


def _like(other: GPUArray, dtype: Any, order: str) -> GPUArray:
    """An array shaped like ``other`` in ``order`` as NumPy's *_like functions choose it."""
    dtype = other.dtype if dtype is None else np.dtype(dtype)
    flags = other.flags
    strides = None
    if order == "A":
        order = "F" if flags.f_contiguous and not flags.c_contiguous else "C"
    elif order == "K":
        if flags.c_contiguous or other.ndim <= 1:
            order = "C"
        elif flags.f_contiguous:
            order = "F"
        else:  # the input's axis order, compacted
            order = "C"
            by_stride = sorted(range(other.ndim), key=lambda axis: -builtins.abs(
                other.strides[axis]))
            compact = _contiguous_strides(tuple(other.shape[a] for a in by_stride),
                                          dtype.itemsize, "C")
            permuted = [0] * other.ndim
            for position, axis in enumerate(by_stride):
                permuted[axis] = compact[position]
            strides = tuple(permuted)
    elif order not in ("C", "F"):
        raise ValueError(f"Unsupported order: {order!r}")
    return GPUArray(other.shape, dtype, other.allocator, strides=strides, order=order)


def empty_like(other: GPUArray, dtype: Any = None, order: str = "K") -> GPUArray:
    return _like(other, dtype, order)


def zeros_like(other: GPUArray, dtype: Any = None, order: str = "K") -> GPUArray:
    return _like(other, dtype, order).fill(0)


def ones_like(other: GPUArray, dtype: Any = None, order: str = "K") -> GPUArray:
    return _like(other, dtype, order).fill(1)


def arange(*args: Any, dtype: Any = None, allocator: Any = None) -> GPUArray:
    start, stop, step = 0, None, 1
    if len(args) == 1:
        stop = args[0]
    elif len(args) == 2:
        start, stop = args
    elif len(args) == 3:
        start, stop, step = args
    else:
        raise TypeError("arange takes 1 to 3 positional arguments")
    if dtype is None:
        dtype = np.array([start, stop, step]).dtype
    n = builtins.max(int(np.ceil((stop - start) / step)), 0)
    return _run("arange", GPUArray((n,), dtype, allocator), [], start=_scalar(start),
                step=_scalar(step))


# }}}

# {{{ functions


def take(a: GPUArray, indices: GPUArray, out: GPUArray | None = None,
         stream: Any = None) -> GPUArray:
    out = out if out is not None else GPUArray(indices.shape, a.dtype, a.allocator)
    return _run("take", out, [a, indices], stream)


def where(criterion: GPUArray, then_: Any, else_: Any, out: GPUArray | None = None,
          stream: Any = None) -> GPUArray:
    dtype = _common_dtype(then_, else_)
    out = out if out is not None else GPUArray(criterion.shape, dtype, criterion.allocator)
    return _run("where", out, [criterion, then_, else_], stream)


def if_positive(criterion: GPUArray, then_: Any, else_: Any, out: GPUArray | None = None,
                stream: Any = None) -> GPUArray:
    """then_ where criterion > 0, else_ elsewhere (``where`` tests for nonzero)."""
    return where(criterion > 0, then_, else_, out, stream)


def _minmax(function: str) -> Callable[..., GPUArray]:
    def pairwise(a: Any, b: Any, out: GPUArray | None = None, stream: Any = None) -> GPUArray:
        like = a if isinstance(a, GPUArray) else b
        out = out if out is not None else GPUArray(like.shape, _common_dtype(a, b),
                                                   like.allocator)
        return _run(function, out, [a, b], stream)

    pairwise.__name__ = function
    return pairwise


minimum = _minmax("minimum")
maximum = _minmax("maximum")


def _reduction(function: str) -> Callable[..., GPUArray]:
    def reduce(a: GPUArray, dtype: Any = None, stream: Any = None,
               allocator: Any = None) -> GPUArray:
        if function == "sum":
            result_dtype = np.dtype(dtype) if dtype is not None else a.dtype
        else:
            result_dtype = a.dtype
        return _run(function, GPUArray((), result_dtype, allocator or a.allocator), [a], stream)

    reduce.__name__ = function
    return reduce


sum = _reduction("sum")
max = _reduction("max")
min = _reduction("min")


def dot(a: GPUArray, b: GPUArray, dtype: Any = None, stream: Any = None,
        allocator: Any = None) -> GPUArray:
    result_dtype = np.dtype(dtype) if dtype is not None else _common_dtype(a, b)
    return _run("dot", GPUArray((), result_dtype, allocator or a.allocator), [a, b], stream)


def subset_dot(subset: GPUArray, a: GPUArray, b: GPUArray, dtype: Any = None,
               stream: Any = None, allocator: Any = None) -> GPUArray:
    return dot(take(a, subset), take(b, subset), dtype, stream, allocator)


def subset_min(subset: GPUArray, a: GPUArray, stream: Any = None) -> GPUArray:
    return min(take(a, subset, stream=stream), stream=stream)


def subset_max(subset: GPUArray, a: GPUArray, stream: Any = None) -> GPUArray:
    return max(take(a, subset, stream=stream), stream=stream)


def subset_sum(subset: GPUArray, a: GPUArray, dtype: Any = None, stream: Any = None,
               allocator: Any = None) -> GPUArray:
    return sum(take(a, subset), dtype, stream, allocator)


def any(a: GPUArray, stream: Any = None, allocator: Any = None) -> GPUArray:
    return a.any(stream)


def all(a: GPUArray, stream: Any = None, allocator: Any = None) -> GPUArray:
    return a.all(stream)


def logical_and(a: Any, b: Any, out: GPUArray | None = None) -> GPUArray:
    like = a if isinstance(a, GPUArray) else b
    return _run("logical_and", out or GPUArray(like.shape, like.dtype, like.allocator), [a, b])


def logical_or(a: Any, b: Any, out: GPUArray | None = None) -> GPUArray:
    like = a if isinstance(a, GPUArray) else b
    return _run("logical_or", out or GPUArray(like.shape, like.dtype, like.allocator), [a, b])


def logical_not(a: GPUArray, out: GPUArray | None = None) -> GPUArray:
    return _run("logical_not", out or a._new_like_me(), [a])


def concatenate(arrays: Sequence[GPUArray], axis: int = 0, allocator: Any = None) -> GPUArray:
    host_shapes = [np.empty(a.shape, np.uint8) for a in arrays]
    shape = np.concatenate(host_shapes, axis=axis).shape
    dtype = np.result_type(*[a.dtype for a in arrays])
    out = GPUArray(shape, dtype, allocator or arrays[0].allocator)
    return _run("concatenate", out, list(arrays), axis=axis)


def stack(arrays: Sequence[GPUArray], axis: int = 0, allocator: Any = None) -> GPUArray:
    shape = np.stack([np.empty(a.shape, np.uint8) for a in arrays], axis=axis).shape
    dtype = np.result_type(*[a.dtype for a in arrays])
    # pycuda's layout: C when stacking along the first axis, F otherwise
    out = GPUArray(shape, dtype, allocator or arrays[0].allocator,
                   order="C" if axis == 0 else "F")
    return _run("stack", out, list(arrays), axis=axis)


def transpose(a: GPUArray, axes: Sequence[int] | None = None) -> GPUArray:
    return a.transpose(axes)


def reshape(a: GPUArray, shape: Any) -> GPUArray:
    return a.reshape(shape)


# }}}


# {{{ launch shapes and vector types, as pycuda has them


def splay(n: int, dev: Any = None) -> tuple[tuple[int, int], tuple[int, int, int]]:
    """pycuda's (grid, block) for an elementwise kernel over ``n`` items on ``dev``: one warp
    per block up to 4 blocks per possible resident block, then wider blocks up to 128 threads.
    Array operations here never launch with it; pycuda.curandom.rand's numbers depend on it."""
    from harp_jupyter.shim.pycuda.tools import DeviceData

    if dev is None:
        dev = drv.Context.get_current()._device if drv.Context.get_current() else drv.Device(0)
    data = DeviceData(dev)
    warp, widest = data.warp_size, 128
    most_blocks = 4 * data.thread_blocks_per_mp * dev.get_attribute(
        drv.device_attribute.MULTIPROCESSOR_COUNT)
    if n < warp:
        blocks, threads = 1, warp
    elif n < most_blocks * warp:
        blocks, threads = (n + warp - 1) // warp, warp
    elif n < most_blocks * widest:
        warps = (n + warp - 1) // warp
        blocks, threads = most_blocks, (warps + most_blocks - 1) // most_blocks * warp
    else:
        blocks, threads = most_blocks, widest
    return (blocks, 1), (threads, 1, 1)


class vec:
    """CUDA's vector types as NumPy structured dtypes (``vec.float4``) and their constructors
    (``vec.make_float4(x, y, z, w)``), registered under their C names."""


def _make_vector_types() -> None:
    from harp_jupyter.shim.pycuda.tools import get_or_register_dtype, mark_builtin_dtypes

    fields = "xyzw"
    for base, scalar, counts in (
            ("char", np.int8, 4), ("uchar", np.uint8, 4), ("short", np.int16, 4),
            ("ushort", np.uint16, 4), ("int", np.int32, 4), ("uint", np.uint32, 4),
            ("long", np.int64, 4), ("ulong", np.uint64, 4), ("longlong", np.int64, 2),
            ("ulonglong", np.uint64, 2), ("float", np.float32, 4), ("double", np.float64, 2)):
        for count in range(1, counts + 1):
            name = f"{base}{count}"
            dtype = np.dtype([(fields[i], scalar) for i in range(count)])
            get_or_register_dtype(name, dtype)
            setattr(vec, name, dtype)

            def make(*components: Any, _dtype: np.dtype = dtype) -> np.ndarray:
                return np.array(tuple(components), dtype=_dtype)

            make.__name__ = f"make_{name}"
            setattr(vec, make.__name__, staticmethod(make))
    mark_builtin_dtypes()


_make_vector_types()


def multi_take(arrays: Sequence[GPUArray], indices: GPUArray, out: Any = None,
               stream: Any = None) -> list[GPUArray]:
    outs = out if out is not None else [None] * len(arrays)
    return [take(a, indices, o, stream) for a, o in zip(arrays, outs, strict=True)]


def multi_take_put(arrays: Sequence[GPUArray], dest_indices: GPUArray, src_indices: GPUArray,
                   dest_shape: Any = None, out: Any = None, stream: Any = None,
                   src_offsets: Any = None) -> list[GPUArray]:
    raise NotImplementedError("multi_take_put is not forwarded by HARP's shim")


def multi_put(arrays: Sequence[GPUArray], dest_indices: GPUArray, dest_shape: Any = None,
              out: Any = None, stream: Any = None) -> list[GPUArray]:
    raise NotImplementedError("multi_put is not forwarded by HARP's shim")


# }}}
