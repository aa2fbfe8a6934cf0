"""A pycuda gpuarray/cumath program, unchanged pycuda code: saves its results to argv[1] (.npz).

Run locally with pycuda, or through `harp run`; tests compare the results with NumPy and, on a
GPU machine, with local pycuda.
"""

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
    "add": gx + gy,
    "sub_scalar": gx - 2.5,
    "rsub": 1 - gx,
    "mul": gx * gy,
    "div": gx / gy,
    "rdiv": 2 / gx,
    "pow": gx ** 2,
    "neg": -gx,
    "abs": abs(gx - 1),
    "mul_add": gx.mul_add(2.0, gy, 3.0),
    "lt": gx < gy,
    "sum": gpuarray.sum(gx),
    "dot": gpuarray.dot(gx, gy),
    "max": gpuarray.max(gx),
    "min": gpuarray.min(gy),
    "sqrt": cumath.sqrt(gx),
    "exp": cumath.exp(gx),
    "log": cumath.log(gx),
    "sin": cumath.sin(gx),
    "floor": cumath.floor(gx * 10),
    "astype": gx.astype(np.float64),
    "strided": gx[1:2001:4] * 3,
    "transpose": gm.T.copy(),
    "row": gm[2] + 1,
    "col": gm[:, 3] * 2,
    "take": gpuarray.take(gx, gpuarray.to_gpu(idx)),
    "where": gpuarray.if_positive(gx - gy, gx, gy),
    "maximum": gpuarray.maximum(gx, gy),
    "arange": gpuarray.arange(0, 50, 2, dtype=np.float32),
    "zeros": gpuarray.zeros((3, 3), np.int32),
    "fill": gpuarray.empty(7, np.float32).fill(4.5),
    "concat": gpuarray.concatenate([gx[:3], gy[:4]]),
    "reverse": gx[:10].reverse(),
    "reshape": gm.reshape(6, 4) * 1,
}
inplace = gpuarray.to_gpu(x.copy())
inplace += gy
inplace *= 2
results["inplace"] = inplace
z = gpuarray.zeros(10, np.float32)
z[2:5] = 7
results["setitem"] = z
np.savez(sys.argv[1], **{name: value.get() for name, value in results.items()})
print("saved", len(results), "results")
