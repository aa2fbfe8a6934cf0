"""Runs on the notebook image as an Elastic GPU client would: pycuda code, forwarded to the pool."""

import numpy as np
import pycuda.autoinit  # noqa: F401
import pycuda.gpuarray as gpuarray

host = np.arange(1_000_000, dtype=np.float32)
total = float(gpuarray.sum(gpuarray.to_gpu(host) * 2 + 1).get())
expected = float((host.astype(np.float64) * 2 + 1).sum())
if abs(total - expected) > 1e-4 * expected:
    raise SystemExit(f"harp smoke test: wrong sum {total}, expected {expected}")
print(f"harp smoke test: OK ({total:.0f} computed on the GPU side)")
