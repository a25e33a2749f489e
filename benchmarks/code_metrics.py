"""Code size and import structure: lines per Python file and per folder, and the project's import graph.

Run from the repository root (reads source only, imports nothing of the project)::

    .venv/bin/python benchmarks/code_metrics.py            # table, edge list, cycles
    .venv/bin/python benchmarks/code_metrics.py --json     # the same as one JSON object
    .venv/bin/python benchmarks/code_metrics.py --root /path/to/other/checkout --json

Lines are physical lines (``wc -l``) of the ``.py`` files under segvlm/, pipeline/, jobs/, tests/ and
benchmarks/. The graph covers the modules of segvlm, pipeline and jobs, counting imports inside functions
(``tests/import_graph.py`` defines the edges; ``tests/system/test_boundaries.py`` asserts the graph has no cycle).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable as a script from a checkout

from tests.import_graph import PACKAGES, cycles, import_graph

FOLDERS = ("segvlm", "pipeline", "jobs", "tests", "benchmarks")


def line_counts(root: Path) -> dict[str, int]:
    """``{relative path: physical lines}`` for every ``.py`` file of :data:`FOLDERS` under ``root``."""
    counts = {}
    for folder in FOLDERS:
        for path in sorted((root / folder).rglob("*.py")):
            if ".venv" in path.parts or "__pycache__" in path.parts:
                continue
            with path.open("rb") as f:
                counts[str(path.relative_to(root))] = sum(1 for _ in f)
    return counts


def commit(root: Path) -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip()


def metrics(root: Path) -> dict:
    files = line_counts(root)
    folders = {folder: 0 for folder in FOLDERS}
    for path, lines in files.items():
        folders[Path(path).parts[0]] += lines
    graph = import_graph(root, PACKAGES)
    return {
        "root": str(root),
        "commit": commit(root),
        "files": files,
        "folders": folders,
        "total_lines": sum(files.values()),
        "modules": len(graph),
        "edges": sorted([source, target] for source, children in graph.items() for target in children),
        "cycles": cycles(graph),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1], help="a checkout")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args(argv)
    result = metrics(args.root.resolve())
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"commit {result['commit']}")
    width = max(len(path) for path in result["files"])
    for path, lines in result["files"].items():
        print(f"{path:<{width}}  {lines:6d}")
    print()
    for folder, lines in result["folders"].items():
        print(f"{folder + '/':<{width}}  {lines:6d}")
    print(f"{'total':<{width}}  {result['total_lines']:6d}")
    print(f"\nimport graph: {result['modules']} modules, {len(result['edges'])} edges")
    for source, target in result["edges"]:
        print(f"{source} -> {target}")
    if result["cycles"]:
        print("cycles:")
        for cycle in result["cycles"]:
            print("  " + " -> ".join(cycle))
    else:
        print("cycles: none")
    return 0


if __name__ == "__main__":
    sys.exit(main())
