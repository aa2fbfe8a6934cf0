"""A pycuda gpuarray/cumath program, unchanged pycuda code: saves its results to argv[1] (.npz).

Run locally with pycuda, or through `harp run`; tests compare the results with NumPy and, on a
GPU machine, with local pycuda.
"""

import json
import sys

import numpy as np
import pycuda.autoinit  # noqa: F401
import pycuda.cumath as cumath
import pycuda.gpuarray as gpuarray

rng = np.random.default_rng(7)
x = rng.random(10_000).astype(np.float32) + 0.5
y = rng.random(10_000).astype(np.float32) + 0.5
m = np.arange(24, dtype=np.float64).reshape(4, 6)
idx = np.array([5, 0, 9, 3], dtype=np.int32)

gx, gy, gm = gpuarray.to_gpu(x), gpuarray.to_gpu(y), gpuarray.to_gpu(m)
results = {
    "add": lambda: gx + gy,
    "sub_scalar": lambda: gx - 2.5,
    "rsub": lambda: 1 - gx,
    "mul": lambda: gx * gy,
    "div": lambda: gx / gy,
    "rdiv": lambda: 2 / gx,
    "pow": lambda: gx ** 2,
    "neg": lambda: -gx,
    "abs": lambda: abs(gx - 1),
    "mul_add": lambda: gx.mul_add(2.0, gy, 3.0),
    "lt": lambda: gx < gy,
    "sum": lambda: gpuarray.sum(gx),
    "dot": lambda: gpuarray.dot(gx, gy),
    "max": lambda: gpuarray.max(gx),
    "min": lambda: gpuarray.min(gy),
    "sqrt": lambda: cumath.sqrt(gx),
    "exp": lambda: cumath.exp(gx),
    "log": lambda: cumath.log(gx),
    "sin": lambda: cumath.sin(gx),
    "floor": lambda: cumath.floor(gx * 10),
    "astype": lambda: gx.astype(np.float64),
    "strided": lambda: gx[1:2001:4] * 3,
    "transpose": lambda: gm.T.copy(),
    "row": lambda: gm[2] + 1,
    "col": lambda: gm[:, 3] * 2,
    "take": lambda: gpuarray.take(gx, gpuarray.to_gpu(idx)),
    "where": lambda: gpuarray.if_positive(gx - gy, gx, gy),
    "maximum": lambda: gpuarray.maximum(gx, gy),
    "arange": lambda: gpuarray.arange(0, 50, 2, dtype=np.float32),
    "zeros": lambda: gpuarray.zeros((3, 3), np.int32),
    "fill": lambda: gpuarray.empty(7, np.float32).fill(4.5),
    "concat": lambda: gpuarray.concatenate([gx[:3], gy[:4]]),
    "reverse": lambda: gx[:10].reverse(),
    "reshape": lambda: gm.reshape(6, 4) * 1,
}


def inplace():
    a = gpuarray.to_gpu(x.copy())
    a += gy
    a *= 2
    return a


def setitem():
    z = gpuarray.zeros(10, np.float32)
    z[2:5] = 7
    return z


results["inplace"] = inplace
results["setitem"] = setitem
values, errors = {}, {}
for name, compute in results.items():
    try:
        values[name] = compute().get()
    except Exception as e:  # recorded: local pycuda cannot do everything the shim can
        errors[name] = f"{type(e).__name__}: {e}"[:300]
np.savez(sys.argv[1], _errors=json.dumps(errors), **values)
print("saved", len(values), "results;", len(errors), "failed:", sorted(errors))
