"""The project's boundaries, read from source and checked by running code.

- ``segvlm`` (the model library) is importable and usable without ray, mlflow or webdataset, and never
  imports ``pipeline`` or ``jobs``;
- ``pipeline`` (data) never imports ``jobs``, takes from ``segvlm`` only its data-side helpers, and imports
  and runs with ray and mlflow blocked (only the sharding job's Ray task loop needs ray, inside a function);
- no import cycles among segvlm, pipeline and jobs, counting imports inside functions.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.import_graph import (
    cycles,
    import_graph,
    imports,
    module_name,
    project_files,
    strongly_connected,
    targets,
)

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = ("ray", "mlflow", "webdataset")
# What pipeline/ may take from segvlm/: the data-side helpers (polygon rasterising, image preprocessing, the
# atomic file writer, the scene vocabulary and phrase types, the config error type). Never the model, its
# layers, losses or checkpoints: data loading does not need torch modules, and a change to the model must
# not reach the shards.
PIPELINE_MAY_IMPORT_FROM_SEGVLM = frozenset(
    {"segvlm.atomic", "segvlm.config", "segvlm.masks", "segvlm.preprocess", "segvlm.vocabulary"}
)
# The pipeline modules that may import ray, and only inside a function: prepare's Ray task loop
# (``_map_plans``). Everything else in pipeline/ is plain Python that a Ray worker or a test runs without it.
PIPELINE_MAY_IMPORT_RAY = frozenset({"pipeline.prepare"})
PIPELINE_BLOCKED = ("ray", "mlflow")
FILES = project_files(ROOT)


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize(
    "path", sorted((ROOT / "segvlm").rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT))
)
def test_segvlm_files_import_no_distributed_stack(path):
    assert not _imported_modules(path) & set(FORBIDDEN), f"{path} imports one of {FORBIDDEN}"


def _project_targets(package: str) -> dict[str, set[str]]:
    """``{module of package: the project modules it imports}`` (function-level imports included)."""
    return {
        module: {target for imp in imports(path, module) for target in targets(imp, FILES)}
        for module, path in FILES.items()
        if module.split(".")[0] == package
    }


def _third_party(package: str, names: tuple[str, ...]) -> dict[str, list[tuple[str, int, bool]]]:
    """``{module of package: [(imported name, line, top_level), ...]}`` for imports of ``names``."""
    found: dict[str, list[tuple[str, int, bool]]] = {}
    for module, path in FILES.items():
        if module.split(".")[0] != package:
            continue
        for imp in imports(path, module):
            if imp.module.split(".")[0] in names:
                found.setdefault(module, []).append((imp.module, imp.line, imp.top_level))
    return found


def test_segvlm_never_imports_pipeline_or_jobs():
    outside = {
        module: sorted(t for t in found if t.split(".")[0] != "segvlm")
        for module, found in _project_targets("segvlm").items()
    }
    assert not {m: t for m, t in outside.items() if t}, "segvlm imports pipeline/jobs"
    # function-level imports count: the distributed stack is absent from segvlm anywhere in a file
    assert _third_party("segvlm", FORBIDDEN) == {}


def test_pipeline_never_imports_jobs_and_takes_only_data_helpers_from_segvlm():
    found = _project_targets("pipeline")
    jobs = {m: sorted(t for t in ts if t.split(".")[0] == "jobs") for m, ts in found.items()}
    assert not {m: t for m, t in jobs.items() if t}, "pipeline imports jobs"
    segvlm = {t for ts in found.values() for t in ts if t.split(".")[0] == "segvlm"}
    assert segvlm <= PIPELINE_MAY_IMPORT_FROM_SEGVLM, sorted(segvlm - PIPELINE_MAY_IMPORT_FROM_SEGVLM)


def test_pipeline_imports_ray_only_where_allowed_and_never_at_module_level():
    ray = _third_party("pipeline", ("ray",))
    assert set(ray) <= PIPELINE_MAY_IMPORT_RAY, sorted(set(ray) - PIPELINE_MAY_IMPORT_RAY)
    top_level = {m: [line for _, line, top in hits if top] for m, hits in ray.items()}
    assert not {m: lines for m, lines in top_level.items() if lines}, "ray imported at module level"
    assert _third_party("pipeline", ("mlflow",)) == {}


def test_no_import_cycles_among_project_modules():
    found = cycles(import_graph(ROOT))
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(cycle) for cycle in found)


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def test_import_graph_resolves_submodules_relative_and_function_level_imports(tmp_path):
    _write(
        tmp_path,
        {
            "pkg/__init__.py": "from pkg import a\n",
            "pkg/a.py": "import os\nfrom pkg import b, CONSTANT\n",
            "pkg/b.py": "def f():\n    from .sub import c\n",
            "pkg/sub/__init__.py": "from . import c\n",
            "pkg/sub/c.py": "from ..a import thing\nimport pkg.sub.nothing\n",
            "other/__init__.py": "",
            "other/d.py": "import pkg.b as b\nfrom pkg.sub import c as c_module\nimport numpy\n",
        },
    )
    assert module_name(tmp_path / "pkg/sub/__init__.py", tmp_path) == "pkg.sub"
    graph = import_graph(tmp_path, ("pkg", "other"))
    assert graph == {
        "pkg": {"pkg.a"},
        "pkg.a": {"pkg.b", "pkg"},  # CONSTANT is no module: the edge goes to the package
        "pkg.b": {"pkg.sub.c"},  # function level, relative
        "pkg.sub": {"pkg.sub.c"},
        "pkg.sub.c": {"pkg.a", "pkg.sub"},  # pkg.sub.nothing does not exist: its deepest existing parent
        "other": set(),
        "other.d": {"pkg.b", "pkg.sub.c"},
    }
    # pkg -> pkg.a -> pkg; pkg.a -> pkg.b -> pkg.sub.c -> pkg.a (through a function-level import)
    assert cycles(graph) == [["pkg", "pkg.a", "pkg"]]
    strongly = [c for c in strongly_connected(graph) if len(c) > 1]
    assert strongly == [["pkg", "pkg.a", "pkg.b", "pkg.sub", "pkg.sub.c"]]


def test_import_graph_reports_each_cycle_once_with_its_path():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"e"}, "e": {"d"}, "f": {"a", "d"}}
    assert cycles(graph) == [["a", "b", "c", "a"], ["d", "e", "d"]]
    assert cycles({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_pipeline_runs_with_ray_and_mlflow_blocked(tmp_path):
    # Every pipeline module imports while `import ray` / `import mlflow` would fail, and the data path runs:
    # synthetic scenes -> the PhraseCut reader -> a shard -> read back, record for record.
    code = f"""
import sys, importlib, pkgutil
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {PIPELINE_BLOCKED!r}:
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
import pipeline
for info in pkgutil.walk_packages(pipeline.__path__, 'pipeline.'):
    importlib.import_module(info.name)
import pyarrow.fs as pafs
from pipeline.phrasecut import iter_records
from pipeline.scenes import write_scenes
from pipeline.shards import iter_shard, write_shard
root = {str(tmp_path / "scenes")!r}
write_scenes(root, 3, seed=0, size=64, splits={{"train": 1.0}})
samples, quarantined = [], 0
for record, jpg, rows, _ in iter_records(root, "train", source="scenes"):
    quarantined += len(rows)
    if record is not None:
        samples.append((record, jpg))
fs = pafs.LocalFileSystem()
write_shard(samples, fs, {str(tmp_path / "train-000000.tar")!r})
back = list(iter_shard(fs, {str(tmp_path / "train-000000.tar")!r}))
assert [(r.to_json(), j) for r, j in back] == sorted(
    ((r.to_json(), j) for r, j in samples), key=lambda x: x[0]), "shard round trip"
try:
    import ray
except ImportError:
    print('ray blocked')
print(len(samples), quarantined, sum(len(r.tasks) for r, _ in back) > 0)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-2:] == ["ray blocked", "3 0 True"]


def test_segvlm_runs_with_the_distributed_stack_blocked():
    # Every segvlm module imports and a tiny model runs forward while `import ray` (etc.) would fail.
    code = f"""
import sys, importlib, pkgutil
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {FORBIDDEN!r}:
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
import segvlm
for info in pkgutil.walk_packages(segvlm.__path__, 'segvlm.'):
    importlib.import_module(info.name)
import torch
from segvlm.registry import build_model, model_config
model = build_model(model_config('segvlm_tiny', ['backbone.image_size=64']))
tokens = model.backbone.tokenize(['the red circle'])
print(tuple(model(torch.zeros(1, 3, 64, 64), tokens['input_ids'], tokens['attention_mask']).shape))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("(1, 1, 64, 64)")


def test_cli_lists_every_command_and_rejects_unknown_ones(capsys):
    from jobs.cli import COMMANDS, main

    assert main([]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in COMMANDS)
    assert main(["no-such-command"]) == 2
    assert "unknown command" in capsys.readouterr().err
    # every advertised command has a module with main(argv)
    import importlib

    for module in COMMANDS.values():
        assert callable(importlib.import_module(module).main), module
