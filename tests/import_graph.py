"""The project's import graph, read from source (nothing is imported): used by ``test_boundaries`` and
``benchmarks/code_metrics.py``.

Every ``import``/``from ... import`` statement counts, wherever it is (module level, inside a function, under
``if TYPE_CHECKING:``): a function-level import is how a cycle hides, and it still runs. ``from x import y``
is an edge to ``x.y`` when ``x/y.py`` (or ``x/y/__init__.py``) exists, else to ``x``; ``import a.b.c`` is
an edge to the deepest of ``a.b.c``, ``a.b``, ``a`` that is a project module. Parent packages that Python
also runs on the way (``a/__init__.py``) are not edges: every submodule would otherwise sit in a cycle with
a package ``__init__`` that re-exports it.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("segvlm", "pipeline", "jobs")


@dataclass(frozen=True)
class Import:
    """One import statement's target, as written (absolute, dots resolved)."""

    module: str  # "ray.train", "pipeline.shards", ...
    names: tuple[str, ...]  # the names of a ``from`` import; () for ``import module``
    line: int
    top_level: bool  # False inside a function, class body or ``if``/``try`` block


def module_name(path: Path, root: Path = ROOT) -> str:
    """``segvlm/layers/se.py`` -> ``segvlm.layers.se``; ``segvlm/layers/__init__.py`` -> ``segvlm.layers``."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_files(root: Path = ROOT, packages: Iterable[str] = PACKAGES) -> dict[str, Path]:
    """``{module name: file}`` for every ``.py`` file of ``packages`` under ``root``."""
    files: dict[str, Path] = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            files[module_name(path, root)] = path
    return files


def imports(path: Path, module: str) -> list[Import]:
    """Every import statement of the file at ``path`` (module ``module``), relative ones made absolute."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    top = {id(node) for node in tree.body}
    found: list[Import] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend(Import(alias.name, (), node.lineno, id(node) in top) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                # ``from . import x`` in package p.q resolves against p.q itself; in module p.q.m against p.q.
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            names = tuple(alias.name for alias in node.names)
            found.append(Import(base, names, node.lineno, id(node) in top))
    return found


def targets(imp: Import, modules: Mapping[str, Path] | Iterable[str]) -> set[str]:
    """The project modules ``imp`` loads (see the module docstring); empty for third-party imports."""
    known = set(modules)
    hits: set[str] = set()
    if imp.names:
        for name in imp.names:
            if f"{imp.module}.{name}" in known:
                hits.add(f"{imp.module}.{name}")
            elif imp.module in known:
                hits.add(imp.module)
        return hits
    parts = imp.module.split(".")
    for depth in range(len(parts), 0, -1):
        candidate = ".".join(parts[:depth])
        if candidate in known:
            return {candidate}
    return hits


def import_graph(root: Path = ROOT, packages: Iterable[str] = PACKAGES) -> dict[str, set[str]]:
    """``{module: {project modules it imports}}`` for every module of ``packages`` (self-imports dropped)."""
    files = project_files(root, packages)
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        edges: set[str] = set()
        for imp in imports(path, module):
            edges |= targets(imp, files)
        edges.discard(module)
        graph[module] = edges
    return graph


def strongly_connected(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components (iterative), each sorted; the list sorted too."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
    return sorted(components)


def cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """One closed path per import cycle, e.g. ``["a", "b", "a"]``: per strongly connected component of more
    than one module, the shortest cycle through its first module (breadth-first inside the component)."""
    found = []
    for component in strongly_connected(graph):
        if len(component) < 2:
            continue
        members = set(component)
        start = component[0]
        previous: dict[str, str] = {}
        frontier = [start]
        closed: str | None = None
        while frontier and closed is None:
            following = []
            for node in frontier:
                for child in sorted(graph[node] & members):
                    if child == start:
                        closed = node
                        break
                    if child not in previous:
                        previous[child] = node
                        following.append(child)
                if closed is not None:
                    break
            frontier = following
        assert closed is not None  # a component of two or more modules always has a cycle through start
        path = [closed]
        while path[-1] != start:
            path.append(previous[path[-1]])
        found.append([*reversed(path), start])
    return found
