"""The layout of src/eplb: a small core under wings, imports that point down only, no import cycles,
short modules.

- core (``CORE``) imports only core;
- a wing (``planning``, ``runtime``, ``io``) imports core and itself; ``runtime`` may also import ``io``
  lazily (inside a function: the recorder writes its dumps with it) and ``planning`` (pure CPU code that
  never imports the runtime: the online rebalancer decides with ``eplb.planning.online``);
- a consumer package (``CONSUMERS``: ``integrations``, ``simulation``, ``report``) imports anything but the CLI;
- the CLI (``cli``, ``__main__``) and the package (``eplb/__init__.py``) import anything.

A new top-level module or package fails ``test_every_module_has_a_layer`` until it is given a layer here.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
CORE = {"errors", "cluster", "placement", "loads", "metrics", "traffic", "_version"}
WINGS = {"planning", "runtime", "io"}
CONSUMERS = {"integrations", "simulation", "report"}
CLI = {"cli", "__main__"}
MAX_LINES = 450



@dataclass(frozen=True)
class Import:
    target: str  # the eplb module imported (a submodule where the name is one, else the module named)
    line: int
    lazy: bool  # inside a function: runs on first call, not at import
    type_only: bool  # under ``if TYPE_CHECKING:``: never runs


def module_name(path: Path, root: Path = SRC) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> str:
    """``core``, a wing's name, a consumer's name, ``cli``, ``package`` (``eplb`` itself) or ``unknown``."""
    parts = module.split(".")
    if parts == ["eplb"]:
        return "package"
    if len(parts) == 2 and parts[1] in CLI:
        return "cli"
    if len(parts) == 2 and parts[1] in CORE:
        return "core"
    if parts[1] in WINGS | CONSUMERS:
        return parts[1]
    return "unknown"


def allowed(src: str, dst: str, lazy: bool) -> bool:
    """Whether a module of layer ``src`` may import one of layer ``dst``."""
    if src in ("package", "cli"):
        return True
    if src in CONSUMERS:
        return dst != "cli"
    if src == "core":
        return dst == "core"
    if src in WINGS:
        return dst in ("core", src) or (src == "runtime" and (dst == "planning" or (dst == "io" and lazy)))
    return False


def imports(source: str, module: str, is_package: bool, modules: set[str]) -> list[Import]:
    """Every import of an eplb module in ``source`` (the text of ``module``)."""
    package = module if is_package else module.rpartition(".")[0]
    found: list[Import] = []

    def resolve(node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        base = package.split(".")
        base = base[: len(base) - node.level + 1]
        return ".".join(base + ([node.module] if node.module else []))

    def visit(node: ast.AST, lazy: bool, type_only: bool) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "eplb":
                    found.append(Import(alias.name, node.lineno, lazy, type_only))
        elif isinstance(node, ast.ImportFrom):
            base = resolve(node)
            if base.split(".")[0] == "eplb":
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    found.append(Import(sub if sub in modules else base, node.lineno, lazy, type_only))
        lazy = lazy or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                visit(child, lazy, True)
            for child in node.orelse:
                visit(child, lazy, type_only)
            return
        for child in ast.iter_child_nodes(node):
            visit(child, lazy, type_only)

    visit(ast.parse(source), False, False)
    return found


def _tree() -> dict[str, tuple[Path, list[Import]]]:
    paths = sorted((SRC / "eplb").rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): (p, imports(p.read_text(), module_name(p), p.name == "__init__.py", modules))
            for p in paths}


TREE = _tree()


@pytest.mark.parametrize("module", list(TREE))
def test_imports_point_down(module: str) -> None:
    path, found = TREE[module]
    src = layer(module)
    if src == "unknown":
        pytest.skip(f"{module} has no layer yet (test_every_module_has_a_layer fails)")
    bad = sorted({f"{path.relative_to(SRC)}:{i.line} imports {i.target} ({src} -> {layer(i.target)})"
                  for i in found if not allowed(src, layer(i.target), i.lazy)})
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_every_module_has_a_layer() -> None:
    unknown = [m for m in TREE if layer(m) == "unknown"]
    assert not unknown, f"give these a layer in tests/test_layout.py: {unknown}"


def test_no_import_cycles() -> None:
    # Imports that run when a module is imported: not lazy ones, not TYPE_CHECKING ones.
    graph = {m: sorted({i.target for i in found if not i.lazy and not i.type_only and i.target != m})
             for m, (_, found) in TREE.items()}
    cycles = _cycles(graph)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def _cycles(graph: dict[str, list[str]]) -> list[list[str]]:
    """One cycle through each strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, []):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            connect(v)
    return out


@pytest.mark.parametrize("name", [str(path.relative_to(SRC)) for path, _ in TREE.values()])
def test_module_is_short(name: str) -> None:
    lines = len((SRC / name).read_text().splitlines())
    assert lines <= MAX_LINES, f"{name} has {lines} lines; split it by idea (limit {MAX_LINES})"


# The checker itself ----------------------------------------------------------------------------


def test_checker_flags_upward_cyclic_and_allows_lazy_io() -> None:
    modules = {"eplb", "eplb.metrics", "eplb.planning", "eplb.planning.planner", "eplb.io", "eplb.io.dumps",
               "eplb.runtime.recorder"}
    core = imports("from eplb.planning import planner\nimport eplb\n", "eplb.metrics", False, modules)
    assert [(i.target, layer(i.target)) for i in core] == [("eplb.planning.planner", "planning"), ("eplb", "package")]
    assert not any(allowed("core", layer(i.target), i.lazy) for i in core)
    runtime = imports("from eplb.io import dumps\ndef f():\n    from eplb.io import dumps\n",
                      "eplb.runtime.recorder", False, modules)
    assert [allowed("runtime", layer(i.target), i.lazy) for i in runtime] == [False, True]
    typed = imports("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .placement import Placement\n",
                    "eplb.metrics", False, modules)
    assert typed == [Import("eplb.placement", 3, False, True)]
    assert allowed("simulation", "runtime", False) and not allowed("simulation", "cli", False)
    assert not allowed("planning", "runtime", True) and not allowed("io", "planning", False)
    assert _cycles({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == [["a", "b", "c"]]
    assert _cycles({"a": ["b"], "b": []}) == []
