"""pycuda.cumath, forwarded: each function is one array operation on the agent."""

from __future__ import annotations

from typing import Any

import numpy as np

from harp_jupyter.shim.pycuda.driver import Stream  # noqa: F401 - pycuda's name
from harp_jupyter.shim.pycuda.gpuarray import GPUArray, _run


def _float_dtype(array: GPUArray) -> np.dtype:
    return array.dtype if array.dtype.kind in "fc" else np.dtype(np.float64)


def _unary(function: str, pycuda_name: str) -> Any:
    def apply(array: GPUArray, stream_or_out: Any = None, **kwargs: Any) -> GPUArray:
        stream, out = kwargs.get("stream"), kwargs.get("out")
        if isinstance(stream_or_out, GPUArray):
            out = stream_or_out
        elif stream_or_out is not None:
            stream = stream_or_out
        out = out if out is not None else array._new_like_me(_float_dtype(array))
        return _run(function, out, [array], stream)

    apply.__name__ = pycuda_name
    return apply


fabs = _unary("absolute", "fabs")
ceil = _unary("ceil", "ceil")
floor = _unary("floor", "floor")
exp = _unary("exp", "exp")
log = _unary("log", "log")
log10 = _unary("log10", "log10")
sqrt = _unary("sqrt", "sqrt")
sin = _unary("sin", "sin")
cos = _unary("cos", "cos")
tan = _unary("tan", "tan")
asin = _unary("arcsin", "asin")
acos = _unary("arccos", "acos")
atan = _unary("arctan", "atan")
sinh = _unary("sinh", "sinh")
cosh = _unary("cosh", "cosh")
tanh = _unary("tanh", "tanh")


def fmod(arg: GPUArray, mod: GPUArray, stream: Any = None) -> GPUArray:
    return _run("fmod", arg._new_like_me(), [arg, mod], stream)


def ldexp(significand: GPUArray, exponent: GPUArray, stream: Any = None) -> GPUArray:
    return _run("ldexp", significand._new_like_me(), [significand, exponent], stream)


def frexp(arg: GPUArray, stream: Any = None) -> tuple[GPUArray, GPUArray]:
    significand, exponent = arg._new_like_me(), arg._new_like_me()
    _run("frexp", significand, [arg], stream, out2=exponent.descriptor)
    return significand, exponent


def modf(arg: GPUArray, stream: Any = None) -> tuple[GPUArray, GPUArray]:
    fractional, integral = arg._new_like_me(), arg._new_like_me()
    _run("modf", fractional, [arg], stream, out2=integral.descriptor)
    return fractional, integral  # pycuda order (numpy returns the same order)
