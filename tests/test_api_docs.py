"""Every workspace member documents and types its public API: at least 90% of its public functions, methods and
classes have a docstring, and at least 90% of its public functions and methods have full type hints."""

from __future__ import annotations

import ast
import pathlib
from typing import NamedTuple

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
MEMBERS = {
    "ttt": ROOT / "packages" / "ponderttt-ttt" / "src" / "ponderttt" / "ttt",
    "models": ROOT / "packages" / "ponderttt-models" / "src" / "ponderttt" / "models",
    "gating": ROOT / "packages" / "ponderttt-gating" / "src" / "ponderttt" / "gating",
    "data": ROOT / "packages" / "ponderttt-data" / "src" / "ponderttt" / "data",
    "eval": ROOT / "packages" / "ponderttt-eval" / "src" / "ponderttt" / "eval",
    "train": ROOT / "apps" / "train" / "src" / "ponderttt" / "train",
}
THRESHOLD = 0.9


class Item(NamedTuple):
    where: str  # module path:qualified name
    documented: bool
    typed: bool | None  # None for classes (their methods are counted)


def _public(name: str) -> bool:
    return not name.startswith("_") or name == "__call__"


def _typed(fn: ast.FunctionDef | ast.AsyncFunctionDef, method: bool) -> bool:
    args = fn.args
    params = args.posonlyargs + args.args + args.kwonlyargs
    if method and params and params[0].arg in ("self", "cls") and not any(
        isinstance(d, ast.Name) and d.id == "staticmethod" for d in fn.decorator_list
    ):
        params = params[1:]
    extra = [a for a in (args.vararg, args.kwarg) if a is not None]
    annotated = all(p.annotation is not None for p in params + extra)
    return annotated and (fn.returns is not None or fn.name == "__init__")


def public_api(folder: pathlib.Path) -> list[Item]:
    """The public functions, methods (of public classes) and classes of the modules in `folder` (recursively;
    private modules, nested functions and overloads excluded)."""
    items = []
    for path in sorted(folder.rglob("*.py")):
        if path.name.startswith("_") and path.name != "__init__.py":
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        module = str(path.relative_to(folder))
        for node in tree.body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and _public(node.name):
                items.append(Item(f"{module}:{node.name}", bool(ast.get_docstring(node)), _typed(node, False)))
            elif isinstance(node, ast.ClassDef) and _public(node.name):
                items.append(Item(f"{module}:{node.name}", bool(ast.get_docstring(node)), None))
                for member in node.body:
                    if isinstance(member, ast.FunctionDef | ast.AsyncFunctionDef) and _public(member.name):
                        if any(isinstance(d, ast.Name) and d.id == "overload" for d in member.decorator_list):
                            continue
                        items.append(Item(f"{module}:{node.name}.{member.name}", bool(ast.get_docstring(member)),
                                          _typed(member, True)))
    return items


def coverage(items: list[Item]) -> tuple[float, float]:
    """(share documented, share of functions and methods fully typed)."""
    typed = [i.typed for i in items if i.typed is not None]
    return sum(i.documented for i in items) / len(items), sum(typed) / len(typed)


@pytest.mark.parametrize("member", sorted(MEMBERS))
def test_public_api_has_docstrings_and_type_hints(member):
    items = public_api(MEMBERS[member])
    assert len(items) >= 20, f"{member}: only {len(items)} public items found; is the path right?"
    documented, typed = coverage(items)
    missing_doc = [i.where for i in items if not i.documented]
    missing_types = [i.where for i in items if i.typed is False]
    assert documented >= THRESHOLD, f"{member}: {documented:.0%} documented; undocumented: {missing_doc}"
    assert typed >= THRESHOLD, f"{member}: {typed:.0%} fully typed; missing hints: {missing_types}"


def test_the_counter_sees_what_is_missing(tmp_path):
    (tmp_path / "mod.py").write_text(
        'def good(x: int) -> int:\n    """Doc."""\n    return x\n\n'
        "def bare(x):\n    return x\n\n"
        'class Thing:\n    """Doc."""\n\n    def method(self, y: int) -> None:\n        """Doc."""\n\n'
        "    def _private(self, y):\n        pass\n\n"
        "    def __call__(self, z):\n        return z\n"
    )
    (tmp_path / "_hidden.py").write_text("def skipped(x):\n    return x\n")
    items = {i.where: i for i in public_api(tmp_path)}
    assert sorted(items) == ["mod.py:Thing", "mod.py:Thing.__call__", "mod.py:Thing.method", "mod.py:bare",
                             "mod.py:good"]
    assert coverage(list(items.values())) == (3 / 5, 2 / 4)
