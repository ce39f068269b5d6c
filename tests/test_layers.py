"""The packages of ragft import one way: the layering the architecture page draws, checked over the source.

Each `ragft.<package>` (or top-level module) is a unit; every import counts, including those inside functions and
relative ones, and `from ragft import x` counts as an import of x. A unit may import what sits on a row above its
own, or to its left on its own row; train, eval, serve and export are siblings that never import one another.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import ragft

ROOT = Path(ragft.__file__).resolve().parent

# Lower to higher. Within a row, a unit may import those to its left.
LAYERS: list[tuple[str, ...]] = [
    ("<root>", "conf", "errors", "jsonl", "net", "signals", "cluster", "registry", "checkpoints"),  # basics
    ("config",),  # schema, compose, the shared validation helpers
    ("kernels", "model"),
    ("data",),
    ("index",),
    ("rag",),
    ("generate",),  # the engines
    # siblings (see SIBLINGS); export reads checkpoints and builds models like eval and serve, and needs none of them
    ("train", "eval", "serve", "export"),
    ("raft", "sample", "demo", "sweep"),
    ("exit_codes", "cli", "__main__"),
]
SIBLINGS = {"train", "eval", "serve", "export"}
RANK = {unit: (row, col) for row, units in enumerate(LAYERS) for col, unit in enumerate(units)}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit_of(module: str) -> str:
    """`ragft.train.spec` → train; `ragft` → <root>."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "<root>"


def imported_modules(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """The ragft modules one import statement names (relative imports resolved against `module`)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:
        package = module.split(".") if is_package else module.split(".")[:-1]
        anchor = package[: len(package) - (node.level - 1)]
        base = ".".join(anchor + ([base] if base else []))
    if base == "ragft":  # `from ragft import train` imports the unit train
        return [f"ragft.{a.name}" for a in node.names]
    return [base]


def package_imports() -> list[tuple[str, str, str, int]]:
    """(importing unit, imported unit, file, line) for every import of one ragft unit by another."""
    edges = []
    for path in sorted(ROOT.rglob("*.py")):
        module = module_name(path)
        source = unit_of(module)
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            for name in imported_modules(node, module, path.name == "__init__.py"):
                if name != "ragft" and not name.startswith("ragft."):
                    continue
                target = unit_of(name)
                if target != source:
                    edges.append((source, target, str(path.relative_to(ROOT.parent)), node.lineno))
    return edges


def against_the_order(source: str, target: str) -> bool:
    (row, col), (target_row, target_col) = RANK[source], RANK[target]
    if row != target_row:
        return target_row > row
    return source in SIBLINGS or target_col > col


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one unit (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(set(graph) | {w for ws in graph.values() for w in ws}):
        if v not in index:
            visit(v)
    return found


def test_every_unit_has_a_place_in_the_layering():
    units = {unit_of(module_name(p)) for p in ROOT.rglob("*.py")}
    assert not units - set(RANK), f"place these in LAYERS (tests/test_layers.py): {sorted(units - set(RANK))}"


def test_no_import_goes_against_the_layering():
    wrong = [f"{file}:{line}: {source} imports {target}" for source, target, file, line in package_imports()
             if source in RANK and target in RANK and against_the_order(source, target)]
    assert not wrong, f"{len(wrong)} import(s) against the layering:\n" + "\n".join(wrong)


def test_exit_codes_imports_only_errors():
    wrong = [f"{file}:{line}: exit_codes imports {target}" for source, target, file, line in package_imports()
             if source == "exit_codes" and target != "errors"]
    assert not wrong, "\n".join(wrong)


def test_no_cycle_between_packages():
    graph: dict[str, set[str]] = defaultdict(set)
    for source, target, _, _ in package_imports():
        graph[source].add(target)
    assert not cycles(graph), f"packages that import each other in a circle: {cycles(graph)}"


def test_the_checker_sees_function_level_and_from_ragft_imports():
    tree = ast.parse("def f():\n    from ragft import train\n    from .. import serve\n    from .spec import x\n")
    names = [n for node in ast.walk(tree) for n in imported_modules(node, "ragft.config.compose", False)]
    assert names == ["ragft.train", "ragft.serve", "ragft.config.spec"]
    assert against_the_order("config", "train") and against_the_order("eval", "serve")
    assert not against_the_order("train", "config") and not against_the_order("model", "kernels")
    assert cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
