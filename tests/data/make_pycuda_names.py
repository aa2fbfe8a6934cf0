"""Write tests/data/pycuda_public_names.json: the public top-level names of each public module of
a pycuda wheel, read from its sources with ``ast`` (pycuda cannot be imported without CUDA).

Usage: python tests/data/make_pycuda_names.py PATH/TO/pycuda-VERSION-....whl

A module's public names are ``__all__`` when it defines one; otherwise the names its top-level
code binds (functions, classes, assignments, including those inside module-level ``if``/``try``)
and the names it imports ``from pycuda...`` (pycuda's re-exports, e.g. ``tools.register_dtype``),
without leading underscores. Plain ``import x`` and imports from other packages (numpy, pytools)
are the module's implementation, not its API. A ``from M import *`` of a C extension module is
recorded under ``star_imports``: its names cannot be read from sources.
"""

from __future__ import annotations

import ast
import json
import sys
import zipfile
from pathlib import Path

OUT = Path(__file__).with_name("pycuda_public_names.json")


def _bound_names(target: ast.expr) -> list[str]:
    if isinstance(target, ast.Name):
        return [target.id]
    if isinstance(target, ast.Tuple | ast.List):
        return [name for element in target.elts for name in _bound_names(element)]
    return []


def _explicit_all(tree: ast.Module) -> list[str] | None:
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            return [ast.literal_eval(element) for element in node.value.elts]  # type: ignore
    return None


def module_names(source: str) -> tuple[list[str], list[str]]:
    """(public names, modules star-imported) of one module's source."""
    tree = ast.parse(source)
    explicit = _explicit_all(tree)
    names: set[str] = set()
    star_imports: list[str] = []

    def visit(statements: list[ast.stmt]) -> None:
        for node in statements:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.add(node.name)
            elif isinstance(node, ast.Assign):
                for target in node.targets:
                    names.update(_bound_names(target))
            elif isinstance(node, ast.AnnAssign | ast.AugAssign):
                names.update(_bound_names(node.target))
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pycuda"):
                for alias in node.names:
                    if alias.name == "*":
                        star_imports.append(node.module or "")
                    else:
                        names.add(alias.asname or alias.name)
            elif isinstance(node, ast.If):
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                for handler in node.handlers:
                    visit(handler.body)
                visit(node.orelse)
                visit(node.finalbody)
            elif isinstance(node, ast.With):
                visit(node.body)

    visit(tree.body)
    public = explicit if explicit is not None else sorted(
        n for n in names if not n.startswith("_"))
    return sorted(public), star_imports


def public_modules(wheel: Path) -> dict[str, str]:
    """{module name: source} of every public pycuda module in the wheel (pycuda.gl excluded:
    OpenGL interop needs a local GPU and display)."""
    modules: dict[str, str] = {}
    with zipfile.ZipFile(wheel) as archive:
        for path in archive.namelist():
            if not path.startswith("pycuda/") or not path.endswith(".py"):
                continue
            parts = path[:-3].split("/")
            if parts[-1] == "__init__":
                parts = parts[:-1]
            if any(part.startswith("_") for part in parts) or parts[:2] == ["pycuda", "gl"]:
                continue
            modules[".".join(parts)] = archive.read(path).decode()
    return modules


def main(wheel: Path) -> None:
    result: dict[str, dict[str, list[str]]] = {}
    for name, source in sorted(public_modules(wheel).items()):
        names, star_imports = module_names(source)
        result[name] = {"names": names, "star_imports": star_imports}
    document = {"source": wheel.name, "modules": result}
    OUT.write_text(json.dumps(document, indent=1, sort_keys=True) + "\n")
    print(f"{OUT}: {len(result)} modules")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
