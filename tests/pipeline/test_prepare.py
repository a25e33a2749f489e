"""The sharding job end to end on a local Ray instance (2 CPUs): round trip, quarantine, resume, URIs."""

from __future__ import annotations

import os
import pathlib
import shutil

import numpy as np
import pyarrow.fs as pafs
import pytest

from pipeline import manifest as mf
from pipeline import shards
from pipeline.phrasecut import iter_records
from pipeline.prepare import PrepareConfig, run_prepare
from pipeline.prompts import DEFAULT_RATES
from pipeline.quarantine import read_quarantine
from segvlm.masks import rasterize_polygons
from tests.faults import crash_shards
from tests.fixtures_phrasecut import make_phrasecut_fixture

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        from ray.data import DataContext

        ctx = DataContext.get_current()
        ctx.enable_progress_bars = False
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def fixture_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("phrasecut")
    return make_phrasecut_fixture(root)


@pytest.fixture(scope="module")
def scenes_root(tmp_path_factory):
    from pipeline.scenes import write_scenes

    root = tmp_path_factory.mktemp("scenes")
    write_scenes(str(root), 40, 7, size=96, splits={"train": 1.0})
    return str(root)


def _orig_masks(record) -> dict[str, np.ndarray]:
    """Every task's mask rasterised at the original size (polygons mapped back from the stored size)."""
    sx, sy = record.orig_width / record.width, record.orig_height / record.height
    return {
        t.task_id: rasterize_polygons(
            t.polygons, record.orig_width, record.orig_height, scale_x=sx, scale_y=sy
        )
        for t in record.tasks
    }


def _no_temp_files(out: str) -> bool:
    return not [name for _, _, files in os.walk(out) for name in files if shards.TMP_MARK in name]


def test_scenes_round_trip(ray_local, scenes_root, tmp_path):
    out = str(tmp_path / "out")
    summary = run_prepare(
        PrepareConfig(source="scenes", root=scenes_root, split="train", out=out, shard_samples=12),
        log=lambda _: None,
    )
    direct = {r.key: r for r, _, _, _ in iter_records(scenes_root, "train", source="scenes") if r is not None}
    read = {r.key: (r, jpg) for r, jpg in shards.iter_shard_set(out, split="train")}
    assert set(read) == set(direct) and len(read) == summary["images"] > 0
    for key, (record, jpg) in read.items():
        source = direct[key]
        assert jpg == pathlib.Path(source.image_path).read_bytes()  # passed through untouched
        assert [(t.task_id, t.phrase, t.polygons) for t in record.tasks] == [
            (t.task_id, t.phrase, t.polygons) for t in source.tasks
        ]
        got, want = _orig_masks(record), _orig_masks(source)
        assert all(np.array_equal(got[k], want[k]) for k in want)
    table = mf.load_manifest(out)
    assert table.num_rows == sum(len(r.tasks) for r in direct.values()) == summary["tasks"]
    assert sorted(table.column("task_id").to_pylist()) == sorted(
        t.task_id for r in direct.values() for t in r.tasks
    )
    sizes = mf.load_sizes(out)
    assert sum(sizes.values()) == len(direct) and len(sizes) == -(-len(direct) // 12)
    assert mf.is_complete(out) and _no_temp_files(out)


def test_planted_bad_records_are_quarantined(ray_local, fixture_root, tmp_path):
    out = str(tmp_path / "out")
    summary = run_prepare(
        PrepareConfig(source="phrasecut", root=fixture_root["root"], split="train", out=out, shard_samples=4),
        log=lambda _: None,
    )
    rows = read_quarantine(out)
    got = sorted((r["record"], r["reason"], r["source_file"]) for r in rows)
    assert got == sorted(fixture_root["expected_quarantine"])
    task_ids = [t.task_id for r, _ in shards.iter_shard_set(out) for t in r.tasks]
    assert sorted(task_ids) == sorted(fixture_root["good_task_ids"]["train"])
    assert sorted(mf.load_manifest(out).column("task_id").to_pylist()) == sorted(task_ids)
    on_disk = mf.load_summary(out)
    assert on_disk["quarantined"] == len(fixture_root["expected_quarantine"]) == summary["quarantined"]
    expected_reasons: dict[str, int] = {}
    for _, reason, _ in fixture_root["expected_quarantine"]:
        expected_reasons[reason] = expected_reasons.get(reason, 0) + 1
    assert on_disk["quarantined_per_reason"] == expected_reasons
    assert on_disk["tasks"] == len(task_ids) and on_disk["tasks_per_kind"] == {"original": len(task_ids)}
    assert on_disk["images"] == sum(mf.load_sizes(out).values())
    assert on_disk["reader_stats"]["converted_rgb"] >= 2


def test_interrupted_run_resumes_to_the_same_manifest(ray_local, fixture_root, tmp_path):
    root = fixture_root["root"]
    base = dict(source="phrasecut", root=root, split="train", shard_samples=2, max_side=100)
    clean, crashed = str(tmp_path / "clean"), str(tmp_path / "crashed")
    run_prepare(PrepareConfig(out=clean, **base), log=lambda _: None)

    with pytest.raises(Exception, match="simulated crash"):
        run_prepare(PrepareConfig(out=crashed, **base), log=lambda _: None, shard_hook=crash_shards(2))
    assert not mf.is_complete(crashed)
    assert not os.path.exists(os.path.join(crashed, mf.MANIFEST))
    assert not _no_temp_files(crashed)  # the crash left half a tar behind
    # States a crash can leave besides temp files, planted so the test does not depend on task timing:
    # a tar whose sidecar never got written, and a sidecar whose tar is not what it recorded.
    parts = os.path.join(crashed, "_parts")
    os.makedirs(parts, exist_ok=True)
    for name in ("train-000000.tar", "train-000001.tar"):
        shutil.copyfile(os.path.join(clean, name), os.path.join(crashed, name))
    if os.path.exists(os.path.join(parts, "train-000000.tar.json")):
        os.remove(os.path.join(parts, "train-000000.tar.json"))
    shutil.copyfile(
        os.path.join(clean, "_parts", "train-000001.tar.json"), os.path.join(parts, "train-000001.tar.json")
    )
    with open(os.path.join(crashed, "train-000001.tar"), "r+b") as f:
        f.truncate(1024)

    logs: list[str] = []
    summary = run_prepare(PrepareConfig(out=crashed, **base), log=logs.append)
    assert mf.is_complete(crashed) and _no_temp_files(crashed)
    assert any("removed" in line for line in logs)
    assert summary["shards_resumed"] >= 0
    assert mf.load_manifest(crashed).equals(mf.load_manifest(clean))
    assert mf.manifest_hash(crashed) == mf.manifest_hash(clean)
    assert mf.load_sizes(crashed) == mf.load_sizes(clean)
    for name in mf.load_sizes(clean):  # identical bytes, whichever run wrote them
        assert pathlib.Path(crashed, name).read_bytes() == pathlib.Path(clean, name).read_bytes()

    # a full rerun reuses every shard
    again = run_prepare(PrepareConfig(out=crashed, **base), log=lambda _: None)
    assert again["shards_resumed"] == len(os.listdir(os.path.join(crashed, "_parts")))
    assert mf.manifest_hash(crashed) == mf.manifest_hash(clean)


def test_non_default_filesystem(ray_local, fixture_root, tmp_path):
    """An fsspec filesystem behind pyarrow's PyFileSystem, rooted in a SubTree: the generic FS API only."""
    import fsspec

    fs = pafs.SubTreeFileSystem(
        str(tmp_path), pafs.PyFileSystem(pafs.FSSpecHandler(fsspec.filesystem("file")))
    )
    config = PrepareConfig(source="phrasecut", root=fixture_root["root"], split="val", out="bucket/val")
    summary = run_prepare(config, filesystem=fs, log=lambda _: None)
    assert summary["images"] == 1 and mf.is_complete("bucket/val", filesystem=fs)
    records = [r for r, _ in shards.iter_shard_set("bucket/val", filesystem=fs)]
    assert [t.task_id for r in records for t in r.tasks] == fixture_root["good_task_ids"]["val"]
    assert mf.load_manifest("bucket/val", filesystem=fs).num_rows == 1
    assert os.path.exists(tmp_path / "bucket" / "val" / "val-000000.tar")


def test_synthetic_prompts_are_seeded_and_indexed(ray_local, scenes_root, tmp_path):
    base = dict(
        source="scenes",
        root=scenes_root,
        split="train",
        shard_samples=16,
        synthetic_prompts=True,
        prompt_rates={"template": 1.0, "recomposed": 1.0, "relation_rewrite": 1.0, "negative": 0.5},
        seed=3,
    )
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    summary = run_prepare(PrepareConfig(out=a, **base), log=lambda _: None)
    run_prepare(PrepareConfig(out=b, **base), log=lambda _: None)
    assert mf.manifest_hash(a) == mf.manifest_hash(b)  # same seed, same prompts, whichever worker drew them
    kinds = summary["tasks_per_kind"]
    assert kinds["original"] > 0 and kinds.get("template", 0) > 0 and kinds.get("negative", 0) > 0
    tasks = {t.task_id: t for r, _ in shards.iter_shard_set(a) for t in r.tasks}
    table = mf.load_manifest(a)
    assert sorted(table.column("task_id").to_pylist()) == sorted(tasks) and table.num_rows == summary["tasks"]
    negatives = [row for row in table.to_pylist() if row["kind"] == "negative"]
    assert all(row["mask_area"] == 0.0 and not tasks[row["task_id"]].polygons for row in negatives)
    other_seed = str(tmp_path / "c")
    run_prepare(PrepareConfig(out=other_seed, **{**base, "seed": 4}), log=lambda _: None)
    assert mf.manifest_hash(other_seed) != mf.manifest_hash(a)

    # synthetic prompts without rates: the CLI's defaults (a library caller, such as the demo, got none)
    defaults = {k: v for k, v in base.items() if k != "prompt_rates"}
    config = PrepareConfig(out=str(tmp_path / "d"), **defaults)
    assert config.prompt_rates == DEFAULT_RATES
    kinds = run_prepare(config, log=lambda _: None)["tasks_per_kind"]
    assert kinds.get("template", 0) > 0.8 * kinds["original"] and kinds.get("negative", 0) > 0, kinds


def test_configured_pixel_limit_reaches_the_workers(ray_local, scenes_root, tmp_path):
    """``PrepareConfig.max_pixels`` is what each shard task checks: 96×96 scenes (9,216 pixels) under a
    limit of 9,000 are all quarantined as too large, with the limit in the detail."""
    out = str(tmp_path / "out")
    summary = run_prepare(
        PrepareConfig(
            source="scenes", root=scenes_root, split="train", out=out, shard_samples=12, max_pixels=9000
        ),
        log=lambda _: None,
    )
    rows = read_quarantine(os.path.join(out, mf.QUARANTINE))
    assert summary["images"] == 0 and rows
    assert {row["reason"] for row in rows} == {"image_too_large"}
    assert all("9000" in row["detail"] for row in rows)
