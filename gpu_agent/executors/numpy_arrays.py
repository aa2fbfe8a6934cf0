"""protocol.ARRAY_FUNCTIONS on NumPy arrays (the emulated executor's array engine).

Operands arrive as NumPy views of session memory (or Python scalars); results are written into the
client-chosen ``out`` view, cast as needed, exactly as the client inferred its dtype and shape.
"""

from __future__ import annotations

import ast
from collections.abc import Callable
from typing import Any

import numpy as np

_BINARY: dict[str, Callable[..., Any]] = {
    "add": np.add, "subtract": np.subtract, "multiply": np.multiply, "divide": np.true_divide,
    "power": np.power, "equal": np.equal, "not_equal": np.not_equal, "less": np.less,
    "less_equal": np.less_equal, "greater": np.greater, "greater_equal": np.greater_equal,
    "minimum": np.minimum, "maximum": np.maximum, "fmod": np.fmod,
    "logical_and": np.logical_and, "logical_or": np.logical_or, "ldexp": np.ldexp,
}
_UNARY: dict[str, Callable[..., Any]] = {
    "negative": np.negative, "absolute": np.absolute, "sin": np.sin, "cos": np.cos,
    "tan": np.tan, "arcsin": np.arcsin, "arccos": np.arccos, "arctan": np.arctan,
    "sinh": np.sinh, "cosh": np.cosh, "tanh": np.tanh, "exp": np.exp, "log": np.log,
    "log10": np.log10, "sqrt": np.sqrt, "ceil": np.ceil, "floor": np.floor, "conj": np.conj,
    "real": np.real, "imag": np.imag, "logical_not": np.logical_not, "copy": np.asarray,
    "reverse": lambda a: a[::-1],
}
_REDUCTIONS: dict[str, Callable[..., Any]] = {
    "sum": np.sum, "max": np.max, "min": np.min, "any": np.any, "all": np.all,
}


class ArrayFunctionError(ValueError):
    """Bad operands for an array function (wrong count, shapes that do not broadcast)."""


class ArrayFunctionNeedsGPU(ArrayFunctionError):
    """An array function this NumPy engine cannot run (e.g. a scan of arbitrary CUDA C)."""


def _store(out: np.ndarray, value: Any) -> None:
    value = np.asarray(value)
    if np.iscomplexobj(value) and not np.iscomplexobj(out):
        value = value.real
    try:
        np.copyto(out, np.broadcast_to(value, out.shape), casting="unsafe")
    except ValueError as e:
        raise ArrayFunctionError(f"result of shape {value.shape} does not fit out "
                                 f"of shape {out.shape}: {e}") from None


def _need(operands: list[Any], n: int, function: str) -> None:
    if len(operands) != n:
        raise ArrayFunctionError(f"{function} takes {n} operands, got {len(operands)}")


def apply(function: str, out: np.ndarray | None, operands: list[Any],
          kwargs: dict[str, Any], view: Callable[[list[Any]], np.ndarray]) -> None:
    """Compute ``function`` into ``out``; ``view`` makes a view of a descriptor (``out2``)."""
    if out is None:
        raise ArrayFunctionError(f"{function} needs an out array")
    try:
        _apply(function, out, operands, kwargs, view)
    except (IndexError, TypeError, ValueError) as e:
        if isinstance(e, ArrayFunctionError):
            raise
        # NumPy refusing the user's operands is the user's error, not the agent's
        raise ArrayFunctionError(str(e)) from None


def _apply(function: str, out: np.ndarray, operands: list[Any], kwargs: dict[str, Any],
           view: Callable[[list[Any]], np.ndarray]) -> None:
    with np.errstate(all="ignore"):
        if function in _BINARY:
            _need(operands, 2, function)
            _store(out, _BINARY[function](*operands))
        elif function in _UNARY:
            _need(operands, 1, function)
            _store(out, _UNARY[function](operands[0]))
        elif function in _REDUCTIONS:
            _need(operands, 1, function)
            _store(out, _REDUCTIONS[function](operands[0]))
        elif function == "dot":
            _need(operands, 2, function)
            a, b = (np.asarray(x) for x in operands)
            _store(out, np.sum(a.ravel() * b.ravel()))
        elif function == "fill":
            _need(operands, 1, function)
            _store(out, operands[0])
        elif function == "arange":
            start, step = kwargs.get("start", 0), kwargs.get("step", 1)
            _store(out, start + step * np.arange(out.size).reshape(out.shape))
        elif function == "where":
            _need(operands, 3, function)
            _store(out, np.where(np.asarray(operands[0]) != 0, operands[1], operands[2]))
        elif function == "take":
            _need(operands, 2, function)
            source, indices = np.asarray(operands[0]), np.asarray(operands[1])
            _check_indices(indices, source.size)
            _store(out, np.take(source, indices.astype(np.intp)))
        elif function == "axpbyz":
            _need(operands, 2, function)
            _store(out, kwargs.get("a", 1) * operands[0] + kwargs.get("b", 1) * operands[1])
        elif function in ("frexp", "modf"):
            _need(operands, 1, function)
            first, second = (np.frexp if function == "frexp" else np.modf)(operands[0])
            _store(out, first)
            _store(view(kwargs["out2"]), second)
        elif function == "concatenate":
            _store(out, np.concatenate(operands, axis=kwargs.get("axis", 0)))
        elif function == "stack":
            _store(out, np.stack(operands, axis=kwargs.get("axis", 0)))
        elif function == "transpose":
            _need(operands, 1, function)
            _store(out, np.transpose(operands[0], kwargs.get("axes")))
        elif function == "rand_md5":
            _store(out, md5_uniform(out.size, out.dtype, kwargs["seed"], kwargs["grid"],
                                    kwargs["block"]).reshape(out.shape))
        elif function == "scan":
            _need(operands, 1, function)
            _store(out, _scan(np.asarray(operands[0]), out.dtype, kwargs))
        else:
            raise ArrayFunctionError(f"array function {function!r} is not implemented")


def _check_indices(indices: np.ndarray, size: int) -> None:
    if indices.dtype.kind not in "iu":
        raise ArrayFunctionError(f"take: indices must be integers, not {indices.dtype}")
    if indices.size and (int(indices.min()) < 0 or int(indices.max()) >= size):
        bad = indices[(indices < 0) | (indices >= size)].flat[0]
        raise ArrayFunctionError(f"take: index {int(bad)} is out of bounds for an array of "
                                 f"size {size} (pycuda's take reads indices as given: 0 to "
                                 f"size - 1)")


# {{{ pycuda.curandom.rand's generator: one MD5 block per thread and loop step


def _md5_constants() -> tuple[np.ndarray, list[int], list[tuple[int, ...]]]:
    sines = np.array([int(abs(np.sin(i + 1)) * 2**32) & 0xFFFFFFFF for i in range(64)],
                     np.uint64)
    shifts = [7, 12, 17, 22] * 4 + [5, 9, 14, 20] * 4 + [4, 11, 16, 23] * 4 + [
        6, 10, 15, 21] * 4
    word_orders = [tuple((first + step * i) % 16 for i in range(16))
                   for first, step in ((0, 1), (1, 5), (5, 3), (0, 7))]
    return sines, shifts, word_orders


_MD5_SINES, _MD5_SHIFTS, _MD5_WORD_ORDERS = _md5_constants()
_MASK32 = np.uint64(0xFFFFFFFF)


def md5_block(words: list[np.ndarray]) -> list[np.ndarray]:
    """The MD5 compression of one 16-word block from MD5's initial state, plus that state, for
    arrays of blocks (uint64 arrays holding 32-bit values): [a, b, c, d]."""
    initial = [np.uint64(0x67452301), np.uint64(0xEFCDAB89), np.uint64(0x98BADCFE),
               np.uint64(0x10325476)]
    a, b, c, d = (np.broadcast_to(v, words[0].shape).copy() for v in initial)
    for step in range(64):
        round_ = step // 16
        if round_ == 0:
            mixed = (b & c) | (~b & _MASK32 & d)
        elif round_ == 1:
            mixed = (b & d) | (c & ~d & _MASK32)
        elif round_ == 2:
            mixed = b ^ c ^ d
        else:
            mixed = c ^ (b | (~d & _MASK32))
        word = words[_MD5_WORD_ORDERS[round_][step % 16]]
        total = (a + mixed + word + _MD5_SINES[step]) & _MASK32
        shift = np.uint64(_MD5_SHIFTS[step])
        rotated = ((total << shift) | (total >> (np.uint64(32) - shift))) & _MASK32
        a, b, c, d = d, (b + rotated) & _MASK32, b, c
    return [(x + v) & _MASK32 for x, v in zip((a, b, c, d), initial, strict=True)]


def md5_uniform(n: int, dtype: np.dtype, seed: int, grid: list[int],
                block: list[int]) -> np.ndarray:
    """The ``n`` numbers pycuda.curandom.rand makes with ``seed`` when launched on ``grid`` x
    ``block`` (1-d): each thread hashes (its thread and block index, seed, its loop index i, n,
    the launch's dimensions) and writes the hash's words to elements i, i + T, ... (T threads),
    four per float32/int32 step and two per float64 step (words a, b and c, d combined)."""
    dtype = np.dtype(dtype)
    threads_per_block, blocks = int(block[0]), int(grid[0])
    total_threads = threads_per_block * blocks
    per_step = 2 if dtype == np.float64 else 4
    k = np.arange(n, dtype=np.uint64)
    thread = k % np.uint64(total_threads)
    word = (k // np.uint64(total_threads)) % np.uint64(per_step)
    loop_index = k - word * np.uint64(total_threads)
    zero = np.zeros(n, np.uint64)

    def const(value: int) -> np.ndarray:
        return np.full(n, value & 0xFFFFFFFF, np.uint64)

    words = [thread % np.uint64(threads_per_block), zero, zero,
             thread // np.uint64(threads_per_block), zero, zero, const(seed),
             loop_index & _MASK32, const(n), const(threads_per_block), const(1), const(1),
             const(blocks), const(1), const(1), zero]
    hashed = md5_block(words)
    if dtype == np.float64:
        high = np.where(word == 0, hashed[0], hashed[2]).astype(np.float64)
        low = np.where(word == 0, hashed[1], hashed[3]).astype(np.float64)
        return high * 2.0**-32 + low * 2.0**-64
    chosen = np.choose(word.astype(np.intp), hashed)
    if dtype == np.float32:
        return chosen.astype(np.float32) * np.float32(2.0**-32)
    if dtype in (np.dtype(np.int32), np.dtype(np.uint32)):
        return chosen.astype(np.uint32).view(dtype)
    raise ArrayFunctionError(f"rand: dtype {dtype} is not supported (pycuda's rand makes "
                             "float32, float64, int32 and uint32)")


# }}}

# {{{ pycuda.scan's kernels on NumPy: expressions of a and b


_SCAN_OPERATORS: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: lambda x, y: x + y, ast.Sub: lambda x, y: x - y, ast.Mult: lambda x, y: x * y,
    ast.BitAnd: lambda x, y: x & y, ast.BitOr: lambda x, y: x | y,
    ast.BitXor: lambda x, y: x ^ y,
}
_SCAN_FUNCTIONS: dict[str, Callable[[Any, Any], Any]] = {"max": max, "min": min}


def _scan_function(expression: str) -> Callable[[Any, Any], Any]:
    """``expression`` (CUDA C in ``a`` and ``b``) as a Python function, for the expressions
    that read the same in both languages (+ - * & | ^, max, min, integer constants)."""
    try:
        tree = ast.parse(expression.strip(), mode="eval").body
    except SyntaxError:
        tree = None

    def build(node: ast.AST | None) -> Callable[[Any, Any], Any]:
        if isinstance(node, ast.Name) and node.id in ("a", "b"):
            return (lambda x, y: x) if node.id == "a" else (lambda x, y: y)
        if isinstance(node, ast.Constant) and type(node.value) is int:
            value = node.value
            return lambda x, y: value
        if isinstance(node, ast.BinOp) and type(node.op) in _SCAN_OPERATORS:
            op, left, right = _SCAN_OPERATORS[type(node.op)], build(node.left), build(node.right)
            return lambda x, y: op(left(x, y), right(x, y))
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id in _SCAN_FUNCTIONS and len(node.args) == 2
                and not node.keywords):
            fn, first, second = (_SCAN_FUNCTIONS[node.func.id], build(node.args[0]),
                                 build(node.args[1]))
            return lambda x, y: fn(first(x, y), second(x, y))
        raise ArrayFunctionNeedsGPU(
            f"scan expression {expression!r} needs a GPU agent (the emulated executor runs "
            "scans of + - * & | ^, max and min of a and b)")

    return build(tree)


def _scan(values: np.ndarray, dtype: np.dtype, kwargs: dict[str, Any]) -> np.ndarray:
    expression = str(kwargs.get("expression", "a+b"))
    flat = values.reshape(-1).astype(dtype)
    if expression.replace(" ", "") == "a+b":
        inclusive = np.cumsum(flat, dtype=dtype)
    else:
        combine = _scan_function(expression)
        results = np.empty(flat.size, dtype)
        total = None
        mask = (1 << (8 * dtype.itemsize)) - 1 if dtype.kind in "iu" else None
        for i, value in enumerate(flat.tolist()):
            total = value if total is None else combine(total, value)
            if mask is not None:  # C's integer arithmetic wraps at the type's width
                total = np.array(total & mask, np.uint64).astype(dtype).item()
            results[i] = total
        inclusive = results
    if not kwargs.get("exclusive"):
        return inclusive.reshape(values.shape)
    neutral = kwargs.get("neutral")
    if neutral is None:
        raise ArrayFunctionError("an exclusive scan needs a neutral element")
    exclusive = np.empty_like(inclusive)
    exclusive[0:1] = dtype.type(ast.literal_eval(str(neutral).strip()))
    exclusive[1:] = inclusive[:-1]
    return exclusive.reshape(values.shape)


# }}}
