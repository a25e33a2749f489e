"""The library boundary: ``segvlm`` is importable and usable without ray, mlflow or webdataset."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = ("ray", "mlflow", "webdataset")


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
