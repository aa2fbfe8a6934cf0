"""protocol.ARRAY_FUNCTIONS on NumPy arrays (the emulated executor's array engine).

Operands arrive as NumPy views of session memory (or Python scalars); results are written into the
client-chosen ``out`` view, cast as needed, exactly as the client inferred its dtype and shape.
"""

from __future__ import annotations

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
            _store(out, np.take(operands[0], np.asarray(operands[1]).astype(np.intp)))
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
        else:
            raise ArrayFunctionError(f"array function {function!r} is not implemented")
