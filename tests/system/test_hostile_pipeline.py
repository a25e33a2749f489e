"""The hostile fixture through ``segvlm prepare``, training and evaluation on a local Ray instance (slow).

Exit 0; every good record in the shards exactly once; every hostile one in the quarantine with its reason;
the canaries outside the dataset never in any output; nothing written outside the output folders; and
evaluation refuses a shard whose task id would name a file outside ``--official-dir``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline import manifest as mf
from pipeline import shards
from pipeline.quarantine import read_quarantine
from tests.fixtures_hostile import CANARY, make_hostile_fixture
from tests.fixtures_train import IMAGE_SIZE, tiny_experiment

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _files(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` (symlinks not followed) with its size and mtime."""
    out = {}
    for dirpath, _, names in os.walk(folder):
        for name in names:
            info = os.lstat(os.path.join(dirpath, name))
            out[os.path.relpath(os.path.join(dirpath, name), folder)] = (info.st_size, info.st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def prepared(ray_local, tmp_path_factory):
    from jobs.prepare import main as prepare_main

    base = tmp_path_factory.mktemp("hostile-pipeline")
    fixture = make_hostile_fixture(base / "input")
    before = _files(base)
    summaries = {}
    for split in ("train", "val"):
        args = ["--source", "phrasecut", "--root", fixture["root"], "--split", split]
        args += ["--out", str(base / "shards" / split), "--shard-samples", "3", "--progress-every", "60"]
        if split == "train":
            args += ["--synthetic-prompts"]  # the prompt generator sees only what the reader let through
        assert prepare_main(args) == 0
        summaries[split] = mf.load_summary(base / "shards" / split)
    after = _files(base)
    # the input folder (and the canaries beside it) untouched; everything new is under the output folders
    assert {k: v for k, v in after.items() if not k.startswith("shards/")} == before
    return base, fixture, summaries


@pytest.mark.parametrize("split", ["train", "val"])
def test_prepare_shards_every_good_record_once_and_quarantines_every_hostile_one(prepared, split):
    base, fixture, summaries = prepared
    out = base / "shards" / split
    assert mf.is_complete(out)
    originals = [
        t.task_id for r, _ in shards.iter_shard_set(out, split) for t in r.tasks if t.kind == "original"
    ]
    assert sorted(originals) == fixture["good_task_ids"][split]  # each exactly once
    rows = read_quarantine(out)
    assert sorted((r["record"], r["reason"]) for r in rows) == fixture["expected_quarantine"][split]
    summary = summaries[split]
    assert summary["accounting"] == {
        "inputs": fixture["inputs"][split],
        "written": len(fixture["good_task_ids"][split]),
        "quarantined": len(fixture["expected_quarantine"][split]),
    }
    # no byte of a canary in any output file
    for path in out.rglob("*"):
        if path.is_file():
            assert CANARY not in path.read_bytes(), path


def test_train_and_eval_on_the_hostile_shards(prepared, tmp_path):
    import torch

    from jobs.eval import run_eval
    from jobs.train import run_training
    from segvlm.backbone import make_tiny_clip
    from segvlm.tokenizer import DEFAULT_TINY_WORDS

    base, fixture, _ = prepared
    root = base / "shards"
    clip = make_tiny_clip(tmp_path / "clip", words=sorted(set(fixture["words"]) | set(DEFAULT_TINY_WORDS)))
    before = _files(base)
    cfg = tiny_experiment(root, clip, tmp_path / "work", "train.steps=3", "train.log_every=1")
    out = run_training(cfg)
    assert out["steps"] == 3
    pngs = tmp_path / "pngs"
    report = run_eval(
        out["best_checkpoint"], str(root / "val"), out=str(tmp_path / "eval"), split="val",
        official_dir=str(pngs), num_workers=2, batch_size=4,
    )  # fmt: skip
    assert report["official/count"] == len(fixture["good_task_ids"]["val"])
    assert sorted(p.stem for p in pngs.iterdir()) == fixture["good_task_ids"]["val"]
    assert _files(base) == before  # training and evaluation wrote only under tmp_path

    # a shard written by something else, with a task id that would escape the PNG folder
    from jobs.evaluation import evaluate
    from pipeline.loader import make_eval_loader
    from pipeline.schema import ImageRecord, Task
    from pipeline.validate import UnsafePathError
    from segvlm.checkpoint import load_checkpoint

    record, jpg = next(iter(shards.iter_shard_set(root / "val", "val")))
    evil = ImageRecord(
        source="x", image_id=1, split="val", width=record.width, height=record.height,
        tasks=[Task(task_id="../escape", phrase="red box", polygons=record.tasks[0].polygons)],
    )  # fmt: skip
    (tmp_path / "evil").mkdir()
    shards.write_shard([(evil, jpg)], *shards.resolve(str(tmp_path / "evil" / "val-000000.tar")))
    model, _, _ = load_checkpoint(out["best_checkpoint"])
    loader = make_eval_loader(
        tmp_path / "evil", split="val", batch_size=2, image_size=IMAGE_SIZE, tokenizer=model.backbone.tokenize
    )
    with torch.no_grad(), pytest.raises(UnsafePathError, match="escape"):
        evaluate(model, loader, official_dir=tmp_path / "evil-pngs" / "inner")
    assert not (tmp_path / "evil-pngs" / "escape.png").exists()
    assert list((tmp_path / "evil-pngs" / "inner").iterdir()) == []
