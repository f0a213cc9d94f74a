"""The import graph of ``tpblocks/``, read with ``ast``: no cycle among module-level imports, and ``parallel/``
never imports ``infer/`` (the data flow is models -> parallel -> train, and infer beside train).

A module-level ``from pkg import sub`` (``sub`` a module) is an edge to ``pkg.sub``; importing ``a.b.c`` is also an
edge to the packages ``a`` and ``a.b`` (Python runs their ``__init__`` first), except those that contain the
importing module (Python has already started them). Imports under
``if TYPE_CHECKING:`` and inside functions run later or never, so they cannot make an import-time cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _modules() -> dict[str, Path]:
    mods = {}
    for path in (ROOT / "tpblocks").rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return mods


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _top_level_imports(tree: ast.Module):
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node


def import_graph(every_import: bool = False) -> dict[str, set[str]]:
    """Module -> the tpblocks modules it imports (at module level, or anywhere with ``every_import``)."""
    mods = _modules()
    graph = {}
    for module, path in mods.items():
        tree = ast.parse(path.read_text())
        nodes = (
            [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
            if every_import
            else list(_top_level_imports(tree))
        )
        targets = set()
        for node in nodes:
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
                continue
            source = _absolute(module, path.name == "__init__.py", node)
            subs = [f"{source}.{alias.name}" for alias in node.names if f"{source}.{alias.name}" in mods]
            targets.update(subs if len(subs) == len(node.names) else [source, *subs])
        with_packages = {".".join(t.split(".")[:i]) for t in targets for i in range(1, t.count(".") + 2)}
        graph[module] = {t for t in with_packages if t in mods and t != module and not module.startswith(t + ".")}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
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

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_in_tpblocks():
    graph = import_graph()
    assert "tpblocks.parallel.parallelize" in graph["tpblocks.train.trainer"]  # the graph is really read
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_one():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_parallel_never_imports_infer():
    graph = import_graph(every_import=True)
    edges = [(m, t) for m, ts in graph.items() if m.startswith("tpblocks.parallel") for t in ts]
    assert edges and not [e for e in edges if e[1].startswith("tpblocks.infer")]


def test_no_cycle_among_the_parallel_modules_even_through_lazy_imports():
    """placement <-> schedule_placement imported each other through an import inside ``shard_model``; now
    ``sharding`` imports both. The package ``__init__`` is left out (every submodule's package)."""
    graph = import_graph(every_import=True)
    parallel = {m: {t for t in ts if t.startswith("tpblocks.parallel.")} for m, ts in graph.items()
                if m.startswith("tpblocks.parallel.")}  # fmt: skip
    assert "tpblocks.parallel.placement" in parallel["tpblocks.parallel.sharding"]
    assert _cycles(parallel) == []
