"""Every public module of pycuda 2026.1 (pycuda.gl aside) through the shim, with pycuda's public
names: compared with tests/data/pycuda_public_names.json, which tests/data/make_pycuda_names.py
generated from the pycuda wheel's sources (pycuda cannot be imported here without CUDA)."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

NAMES = json.loads((Path(__file__).resolve().parents[1] / "data" / "pycuda_public_names.json")
                   .read_text())["modules"]

#: modules that connect at import (they make a context on the agent's device): their names are
#: checked without importing them
IMPORT_CONNECTS = {"pycuda.autoinit", "pycuda.autoprimaryctx"}

#: modules the shim does not have yet, and why (issue 12 is open until this is empty)
MISSING_MODULES = {
    "pycuda.compyte": "pycuda's shared array/dtype helpers (with pyopencl): not written yet",
    "pycuda.compyte.array": "as above",
    "pycuda.compyte.dtypes": "as above; its registry is in pycuda.tools already",
    "pycuda.debug": "a launcher (python -m pycuda.debug script.py) for cuda-gdb on a local GPU; "
                    "its module-level names are its argparse locals",
    "pycuda.sparse": "sparse matrix-vector products and CG built on SourceModule: not written",
    "pycuda.sparse.cg": "as above",
    "pycuda.sparse.coordinate": "as above",
    "pycuda.sparse.inner": "as above",
    "pycuda.sparse.operator": "as above",
    "pycuda.sparse.packeted": "as above",
    "pycuda.sparse.pkt_build": "as above",
}

#: names the shim's modules lack, and why
MISSING_NAMES: dict[str, set[str]] = {
    # texture/array/managed-memory helpers: CUDA arrays, texture references (gone in CUDA 13)
    # and managed memory live in the agent's process and are not forwarded
    "pycuda.driver": {
        "ManagedAllocationOrStub", "bind_array_to_texref", "dtype_to_array_format",
        "gpuarray_to_array", "make_multichannel_2d_array", "managed_empty_like",
        "managed_zeros", "managed_zeros_like", "matrix_to_array", "matrix_to_texref",
        "np_to_array"},
    # pycuda's kernel factories (get_*_kernel) return compiled local kernels; the shim forwards
    # array operations instead; not written yet
    "pycuda.elementwise": set(NAMES["pycuda.elementwise"]["names"]) - {"ElementwiseKernel"},
    "pycuda.reduction": set(NAMES["pycuda.reduction"]["names"]) - {"ReductionKernel"},
}


def _shim_module(name: str) -> str:
    return "harp_jupyter.shim.pycuda" + name[len("pycuda"):]


def test_the_generated_list_covers_pycudas_public_modules() -> None:
    assert "pycuda.gl" not in NAMES
    assert {"pycuda", "pycuda.driver", "pycuda.gpuarray", "pycuda.scan", "pycuda.tools",
            "pycuda.curandom", "pycuda.compiler", "pycuda.sparse.cg"} <= set(NAMES)
    assert set(MISSING_MODULES) <= set(NAMES) and set(MISSING_NAMES) <= set(NAMES)


@pytest.mark.parametrize("module_name", sorted(set(NAMES) - set(MISSING_MODULES)))
def test_module_has_pycudas_public_names(module_name: str) -> None:
    expected = set(NAMES[module_name]["names"])
    if module_name in IMPORT_CONNECTS:
        source = Path(importlib.util.find_spec(_shim_module(module_name)).origin).read_text()
        missing = {name for name in expected if name not in source}
    else:
        module = importlib.import_module(_shim_module(module_name))
        missing = {name for name in expected if not hasattr(module, name)}
    assert missing == MISSING_NAMES.get(module_name, set())


def test_missing_modules_are_still_missing() -> None:
    # when one is written, take it off MISSING_MODULES so that its names are checked
    for name in MISSING_MODULES:
        with pytest.raises(ModuleNotFoundError):
            importlib.import_module(_shim_module(name))
