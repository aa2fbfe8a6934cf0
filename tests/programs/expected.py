"""NumPy's answers for gpuarray_program.py (same inputs, same order of operations)."""

import numpy as np


def expected() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    x = rng.random(10_000).astype(np.float32) + 0.5
    y = rng.random(10_000).astype(np.float32) + 0.5
    m = np.arange(24, dtype=np.float64).reshape(4, 6)
    idx = np.array([5, 0, 9, 3], dtype=np.int32)
    inplace = (x + y) * 2
    z = np.zeros(10, np.float32)
    z[2:5] = 7
    return {
        "add": x + y, "sub_scalar": x - np.float32(2.5), "rsub": 1 - x, "mul": x * y,
        "div": x / y, "rdiv": 2 / x, "pow": x ** 2, "neg": -x, "abs": abs(x - 1),
        "mul_add": 2 * x + 3 * y, "lt": (x < y).astype(np.float32), "sum": x.sum(),
        "dot": np.dot(x, y), "max": x.max(), "min": y.min(), "sqrt": np.sqrt(x),
        "exp": np.exp(x), "log": np.log(x), "sin": np.sin(x), "floor": np.floor(x * 10),
        "astype": x.astype(np.float64), "strided": x[1:2001:4] * 3, "transpose": m.T,
        "row": m[2] + 1, "col": m[:, 3] * 2, "take": x[idx], "where": np.where(x - y > 0, x, y),
        "maximum": np.maximum(x, y), "arange": np.arange(0, 50, 2, dtype=np.float32),
        "zeros": np.zeros((3, 3), np.int32), "fill": np.full(7, 4.5, np.float32),
        "concat": np.concatenate([x[:3], y[:4]]), "reverse": x[:10][::-1],
        "reshape": m.reshape(6, 4), "inplace": inplace, "setitem": z,
    }
