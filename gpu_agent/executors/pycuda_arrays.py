"""protocol.ARRAY_FUNCTIONS executed by pycuda's gpuarray and cumath on the GPU.

Operands are GPUArray views of session memory. The common elementwise operations (arithmetic
with an array or a scalar on either side, cumath's functions) run pycuda's own kernel straight
into the client-chosen ``out`` where that kernel makes exactly out's dtype and shape
(``_into_out``). Every other function computes into scratch memory of the agent (a memory pool),
which is then copied device-to-device into ``out``: simple, never a host round trip, and correct
for every function pycuda offers.
"""

from __future__ import annotations

import operator
import types
from collections.abc import Callable
from typing import Any

import numpy as np
import pycuda.cumath as cumath
import pycuda.curandom as curandom
import pycuda.driver as cuda
import pycuda.gpuarray as gpuarray
from pycuda.elementwise import ElementwiseKernel
from pycuda.tools import dtype_to_ctype

from gpu_agent import nvcc_sandbox

GPUArray = gpuarray.GPUArray

_BINARY: dict[str, Callable[[Any, Any], Any]] = {
    "add": operator.add, "subtract": operator.sub, "multiply": operator.mul,
    "divide": operator.truediv, "power": operator.pow, "equal": operator.eq,
    "not_equal": operator.ne, "less": operator.lt, "less_equal": operator.le,
    "greater": operator.gt, "greater_equal": operator.ge,
}
_CUMATH = {
    "sin": "sin", "cos": "cos", "tan": "tan", "arcsin": "asin", "arccos": "acos",
    "arctan": "atan", "sinh": "sinh", "cosh": "cosh", "tanh": "tanh", "exp": "exp", "log": "log",
    "log10": "log10", "sqrt": "sqrt", "ceil": "ceil", "floor": "floor",
}


class ArrayFunctionError(ValueError):
    pass


class _SeededNumpy:
    """NumPy as pycuda.curandom sees it while ``rand`` runs for a client: its one
    ``np.random.randint`` draw returns the seed the client drew (as pycuda would have, in the
    user's process), so the agent runs pycuda's own generator with the user's seed."""

    def __init__(self, seed: int) -> None:
        self.random = types.SimpleNamespace(randint=lambda *args, **kwargs: seed)

    def __getattr__(self, name: str) -> Any:
        return getattr(np, name)


def _rand(out: GPUArray, seed: int, stream: Any) -> None:
    saved = curandom.np
    curandom.np = _SeededNumpy(seed)
    try:
        result = curandom.rand(out.shape, out.dtype, stream=stream)
    finally:
        curandom.np = saved
    store(out, result, stream)


_scan_kernels: dict[tuple[Any, ...], Any] = {}


def _scan(out: GPUArray, source: GPUArray, kwargs: dict[str, Any], stream: Any) -> None:
    from pycuda.scan import ExclusiveScanKernel, InclusiveScanKernel

    exclusive = bool(kwargs.get("exclusive"))
    key = (out.dtype, str(kwargs.get("expression", "a+b")), kwargs.get("neutral"), exclusive,
           str(kwargs.get("preamble", "")), tuple(kwargs.get("options") or ()))
    kernel = _scan_kernels.get(key)
    if kernel is None:
        cls = ExclusiveScanKernel if exclusive else InclusiveScanKernel
        with nvcc_sandbox.user_source():  # the expression and preamble are the client's C
            kernel = _scan_kernels[key] = cls(out.dtype, key[1], key[2],
                                              options=list(key[5]) or None, preamble=key[4])
    target = out if out.flags.c_contiguous else gpuarray.empty(out.shape, out.dtype,
                                                              allocator=source.allocator)
    if source.dtype != out.dtype:
        source = source.astype(out.dtype)
    kernel(source, target, stream=stream)
    if target is not out:
        store(out, target, stream)


def _check_indices(indices: GPUArray, size: int, stream: Any) -> None:
    """pycuda's take reads any index it is given; out of range is the user's error, said so."""
    if indices.dtype.kind not in "iu":
        raise ArrayFunctionError(f"take: indices must be integers, not {indices.dtype}")
    if not indices.size:
        return
    low = int(gpuarray.min(indices, stream=stream).get())
    high = int(gpuarray.max(indices, stream=stream).get())
    if low < 0 or high >= size:
        raise ArrayFunctionError(f"take: index {low if low < 0 else high} is out of bounds for "
                                 f"an array of size {size} (pycuda's take reads indices as "
                                 "given: 0 to size - 1)")


def _stack(out: GPUArray, operands: list[GPUArray], axis: int, stream: Any) -> None:
    """out = stack(operands, axis): each operand copied into its slice of out, whatever the
    layouts (pycuda's own stack copies raw memory, right only when the layouts agree)."""
    if axis < 0:
        axis += out.ndim
    for i, operand in enumerate(operands):
        index = (slice(None),) * axis + (i,)
        store(out[index], operand, stream)


_COPY_SOURCE = """
typedef %(elem)s elem_t;
struct harp_layout { long long nd; long long shape[8]; long long dst[8]; long long src[8]; };
extern "C" __global__ void harp_strided_copy(char *dst, const char *src, long long n,
                                             struct harp_layout m)
{
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)blockDim.x * gridDim.x) {
        long long rest = i, d = 0, s = 0;
        for (int k = (int)m.nd - 1; k >= 0; --k) {
            long long index = rest %% m.shape[k];
            rest /= m.shape[k];
            d += index * m.dst[k];
            s += index * m.src[k];
        }
        *(elem_t *)(dst + d) = *(const elem_t *)(src + s);
    }
}
"""
_ELEMENT_TYPES = {1: "unsigned char", 2: "unsigned short", 4: "unsigned int",
                  8: "unsigned long long", 16: "struct { unsigned long long a, b; }"}
_copy_kernels: dict[int, Any] = {}
MAX_DIMS = 8


def strided_copy(dst: GPUArray, src: GPUArray, stream: Any) -> None:
    """dst[...] = src for any strides (same shape and dtype), in one kernel."""
    from pycuda.compiler import SourceModule

    if dst.ndim > MAX_DIMS:
        raise ArrayFunctionError(f"strided copies support up to {MAX_DIMS} dimensions")
    itemsize = dst.dtype.itemsize
    kernel = _copy_kernels.get(itemsize)
    if kernel is None:
        module = SourceModule(_COPY_SOURCE % {"elem": _ELEMENT_TYPES[itemsize]},
                              no_extern_c=True)
        kernel = _copy_kernels[itemsize] = module.get_function("harp_strided_copy")
    layout = np.zeros(1 + 3 * MAX_DIMS, np.int64)
    layout[0] = dst.ndim
    layout[1:1 + dst.ndim] = dst.shape
    layout[1 + MAX_DIMS:1 + MAX_DIMS + dst.ndim] = dst.strides
    layout[1 + 2 * MAX_DIMS:1 + 2 * MAX_DIMS + dst.ndim] = src.strides
    blob = np.frombuffer(layout.tobytes(), np.dtype((np.void, layout.nbytes)))[0]
    blocks = int(min(max((dst.size + 255) // 256, 1), 65535))
    kernel(np.uintp(int(dst.gpudata)), np.uintp(int(src.gpudata)), np.int64(dst.size), blob,
           block=(256, 1, 1), grid=(blocks, 1), stream=stream)


def _contiguous(a: Any) -> Any:
    if not isinstance(a, GPUArray) or a.flags.c_contiguous:
        return a
    result = gpuarray.empty(a.shape, a.dtype, allocator=a.allocator)
    strided_copy(result, a, None)
    return result


def _as_array(value: Any, like: GPUArray) -> GPUArray:
    if isinstance(value, GPUArray):
        return value
    result = gpuarray.empty(like.shape, like.dtype, allocator=like.allocator)
    result.fill(value)
    return result


_arange_kernels: dict[np.dtype, ElementwiseKernel] = {}
_gather_kernels: dict[tuple[np.dtype, np.dtype], ElementwiseKernel] = {}


def _gather_kernel(dtype: np.dtype, index_dtype: np.dtype) -> ElementwiseKernel:
    kernel = _gather_kernels.get((dtype, index_dtype))
    if kernel is None:
        ctype, itype = dtype_to_ctype(dtype), dtype_to_ctype(index_dtype)
        kernel = _gather_kernels[dtype, index_dtype] = ElementwiseKernel(
            f"{ctype} *out, {ctype} *a, {itype} *index", "out[i] = a[index[i]]", "harp_take")
    return kernel


def _arange(out: GPUArray, start: Any, step: Any, stream: Any) -> None:
    kernel = _arange_kernels.get(out.dtype)
    if kernel is None:
        ctype = dtype_to_ctype(out.dtype)
        kernel = _arange_kernels[out.dtype] = ElementwiseKernel(
            f"{ctype} *z, {ctype} start, {ctype} step", "z[i] = start + i * step", "harp_arange")
    kernel(out, out.dtype.type(start), out.dtype.type(step), stream=stream)


def store(out: GPUArray, value: Any, stream: Any) -> None:
    """Write ``value`` (a GPUArray or scalar) into ``out``, converted to out's dtype."""
    if not isinstance(value, GPUArray):
        out.fill(out.dtype.type(value.real if isinstance(value, complex) and out.dtype.kind != "c"
                                else value), stream=stream)
        return
    if value.dtype != out.dtype:
        if value.dtype.kind == "c" and out.dtype.kind != "c":
            value = value.real
        value = _contiguous(value).astype(out.dtype, stream=stream)
    if value.size != out.size:
        if value.size == 1:
            host = value.get()
            out.fill(host.reshape(()).item(), stream=stream)
            return
        raise ArrayFunctionError(f"result of shape {value.shape} does not fit out {out.shape}")
    if value.shape != out.shape:
        value = _contiguous(value).reshape(out.shape)
    if out.flags.c_contiguous and value.flags.c_contiguous:
        cuda.memcpy_dtod_async(out.gpudata, value.gpudata, out.nbytes, stream)
    else:
        strided_copy(out, value, stream)


def _into_out(function: str, out: GPUArray, ops: list[Any], stream: Any) -> bool:
    """Run ``function`` with pycuda's own kernel straight into ``out`` when that kernel would
    make exactly out's dtype and shape (one kernel where the general way launches it into
    scratch and copies); False, with nothing done, otherwise."""
    if not out.flags.c_contiguous or any(_partly_overlaps(out, x) for x in ops):
        return False
    if function in _CUMATH:
        (a,) = ops
        if not (isinstance(a, GPUArray) and a.dtype == out.dtype and a.shape == out.shape
                and a.strides == out.strides):
            return False
        getattr(cumath, _CUMATH[function])(a, stream=stream, out=out)
        return True
    if function not in _ARITHMETIC:
        return False
    a, b = ops
    array, other = (a, b) if isinstance(a, GPUArray) else (b, a)
    if (not isinstance(array, GPUArray) or array.shape != out.shape
            or not array.flags.c_contiguous
            or gpuarray._get_common_dtype(array, other) != out.dtype):
        return False
    if isinstance(other, GPUArray):
        if other.shape != out.shape or not other.flags.c_contiguous:
            return False
        if function in ("add", "subtract"):
            a._axpbyz(1, b, 1 if function == "add" else -1, out, stream=stream)
        elif function == "multiply":
            a._elwise_multiply(b, out, stream=stream)
        else:
            a._div(b, out, stream=stream)
        return True
    if not np.isscalar(other):
        return False
    if array is a:  # array op scalar, as pycuda's __add__, __sub__, __mul__, __truediv__
        if function == "add":
            a._axpbz(1, b, out, stream=stream)
        elif function == "subtract":
            a._axpbz(1, -b, out, stream=stream)
        elif function == "multiply":
            a._axpbz(b, 0, out, stream=stream)
        else:
            a._axpbz(1 / b, 0, out, stream=stream)
    elif function == "add":  # scalar op array, as pycuda's reflected operators
        b._axpbz(1, a, out, stream=stream)
    elif function == "subtract":
        b._axpbz(-1, a, out, stream=stream)
    elif function == "multiply":
        b._axpbz(a, 0, out, stream=stream)
    else:
        b._rdiv_scalar(a, out, stream=stream)
    return True


_ARITHMETIC = frozenset(("add", "subtract", "multiply", "divide"))


def _partly_overlaps(out: GPUArray, operand: Any) -> bool:
    """Whether an operand shares memory with ``out`` other than element for element (an
    elementwise kernel would then read what it already wrote: the general way's scratch
    avoids that); both are contiguous."""
    if not isinstance(operand, GPUArray):
        return False
    lo, other_lo = int(out.gpudata), int(operand.gpudata)
    if lo == other_lo and out.nbytes == operand.nbytes and out.dtype == operand.dtype:
        return False  # in place: each element read before it is written, by the same thread
    return lo < other_lo + operand.nbytes and other_lo < lo + out.nbytes


def apply(function: str, out: GPUArray | None, operands: list[Any], kwargs: dict[str, Any],
          stream: Any, view: Callable[[list[Any]], GPUArray]) -> None:
    if out is None:
        raise ArrayFunctionError(f"{function} needs an out array")
    ops = [_contiguous(x) for x in operands]
    if _into_out(function, out, ops, stream):
        return
    if function in _BINARY:
        a, b = ops
        if not isinstance(a, GPUArray):  # scalar op array: pycuda's reflected operators
            a, b = _as_array(a, b), b
        store(out, _BINARY[function](a, b), stream)
    elif function in ("minimum", "maximum", "fmod", "ldexp", "logical_and", "logical_or"):
        a, b = ops
        like = a if isinstance(a, GPUArray) else b
        a, b = _as_array(a, like), _as_array(b, like)
        fn = {"minimum": gpuarray.minimum, "maximum": gpuarray.maximum, "fmod": cumath.fmod,
              "ldexp": cumath.ldexp, "logical_and": gpuarray.logical_and,
              "logical_or": gpuarray.logical_or}[function]
        store(out, fn(a, b), stream)
    elif function in _CUMATH:
        store(out, getattr(cumath, _CUMATH[function])(ops[0], stream=stream), stream)
    elif function == "negative":
        store(out, -ops[0], stream)
    elif function == "absolute":
        store(out, abs(ops[0]), stream)
    elif function == "conj":
        store(out, ops[0].conj(), stream)
    elif function == "real":
        store(out, ops[0].real, stream)
    elif function == "imag":
        store(out, ops[0].imag, stream)
    elif function == "logical_not":
        store(out, gpuarray.logical_not(ops[0]), stream)
    elif function == "copy":
        store(out, ops[0], stream)
    elif function == "reverse":
        store(out, ops[0].reverse(stream=stream), stream)
    elif function in ("sum", "max", "min"):
        store(out, getattr(gpuarray, function)(ops[0], stream=stream), stream)
    elif function in ("any", "all"):
        store(out, getattr(ops[0], function)(stream=stream), stream)
    elif function == "dot":
        store(out, gpuarray.dot(ops[0], ops[1], stream=stream), stream)
    elif function == "fill":
        store(out, operands[0], stream)
    elif function == "arange":
        _arange(out, kwargs.get("start", 0), kwargs.get("step", 1), stream)
    elif function == "where":
        like = next(x for x in ops if isinstance(x, GPUArray))
        crit, a, b = (_as_array(x, like) for x in ops)
        store(out, gpuarray.if_positive(crit != 0, a, b, stream=stream), stream)
    elif function == "take":
        # pycuda's take() binds a texture; CUDA 13 removed texture references
        source, indices = ops
        _check_indices(indices, source.size, stream)
        target = out if out.flags.c_contiguous else gpuarray.empty(out.shape, out.dtype,
                                                                  allocator=source.allocator)
        source = source if source.dtype == out.dtype else source.astype(out.dtype)
        _gather_kernel(out.dtype, indices.dtype)(target, source, indices, stream=stream)
        if target is not out:
            store(out, target, stream)
    elif function == "axpbyz":
        a, b = ops
        store(out, a.mul_add(kwargs.get("a", 1), b, kwargs.get("b", 1), stream=stream), stream)
    elif function in ("frexp", "modf"):
        first, second = getattr(cumath, function)(ops[0], stream=stream)
        store(out, first, stream)
        store(view(kwargs["out2"]), second, stream)
    elif function == "concatenate":
        store(out, gpuarray.concatenate(ops, axis=kwargs.get("axis", 0)), stream)
    elif function == "stack":
        _stack(out, ops, int(kwargs.get("axis", 0)), stream)
    elif function == "transpose":
        store(out, gpuarray.transpose(ops[0], kwargs.get("axes")), stream)
    elif function == "rand_md5":
        _rand(out, int(kwargs["seed"]), stream)
    elif function == "scan":
        _scan(out, ops[0], kwargs, stream)
    else:
        raise ArrayFunctionError(f"array function {function!r} is not implemented")
