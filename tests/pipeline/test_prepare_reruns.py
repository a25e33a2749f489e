"""Reruns of the sharding job on a local Ray instance: stale completion markers, other runs' temp files,
shards whose bytes changed at the same size."""

from __future__ import annotations

import json
import os
import pathlib

import pytest

from pipeline import manifest as mf
from pipeline import shards
from pipeline.prepare import PrepareConfig, run_prepare
from pipeline.runlock import LOCK_NAME
from tests.faults import crash_shards
from tests.fixtures_phrasecut import make_phrasecut_fixture

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_phrasecut_fixture(tmp_path_factory.mktemp("phrasecut"))["root"]


def _config(root: str, out: str, **kwargs) -> PrepareConfig:
    return PrepareConfig(source="phrasecut", root=root, split="train", out=out, shard_samples=2, **kwargs)


def test_a_crashed_rerun_never_leaves_the_old_markers_and_spares_foreign_temp_files(
    ray_local, root, tmp_path
):
    out = str(tmp_path / "out")
    run_prepare(_config(root, out), log=lambda _: None)
    assert mf.is_complete(out)
    before = mf.load_manifest(out)

    # a rerun with other settings (every shard is rewritten) that dies halfway: the earlier run's
    # markers must not make the folder read as finished
    with pytest.raises(Exception, match="simulated crash"):
        run_prepare(_config(root, out, max_side=50), log=lambda _: None, shard_hook=crash_shards(1))
    assert not mf.is_complete(out)
    for name in (mf.MANIFEST, mf.SIZES, mf.SUMMARY, mf.QUARANTINE):
        assert not os.path.exists(os.path.join(out, name)), name
    crashed = json.loads(pathlib.Path(out, LOCK_NAME).read_text())
    assert crashed["state"] == "failed"
    own = shards.temp_files(shards.resolve(out)[0], out)
    assert own and all(shards.temp_owner(os.path.basename(p)) == crashed["run_id"] for p in own)

    # another writer's temp file (a run id this job never held the lock as) must survive the cleanup
    foreign = shards.temp_path(os.path.join(out, "train-000000.tar"), "f0f0f0f0f0f0")
    pathlib.Path(foreign).write_bytes(b"someone else's upload in progress")
    logs: list[str] = []
    run_prepare(_config(root, out), log=logs.append)
    assert mf.is_complete(out) and mf.load_manifest(out).equals(before)
    assert shards.temp_files(shards.resolve(out)[0], out) == [foreign]
    assert any(f"left by run {crashed['run_id']}" in line for line in logs)
    assert any("left 1 temp file(s) of other writers" in line for line in logs)


def test_a_shard_corrupted_at_the_same_size_is_rewritten_on_resume(ray_local, root, tmp_path):
    out = str(tmp_path / "out")
    first = run_prepare(_config(root, out), log=lambda _: None)
    names = sorted(mf.load_sizes(out))
    assert len(names) >= 3
    victim = pathlib.Path(out, names[1])
    good = victim.read_bytes()
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0xFF  # inside the payload: same size, different bytes
    victim.write_bytes(bytes(flipped))
    assert victim.stat().st_size == len(good)

    again = run_prepare(_config(root, out), log=lambda _: None)
    assert victim.read_bytes() == good  # rebuilt (shards are deterministic), not kept
    assert again["shards_resumed"] == len(os.listdir(os.path.join(out, "_parts"))) - 1  # all but the victim
    assert again["images"] == first["images"]
    sidecar = json.loads(pathlib.Path(out, "_parts", f"{names[1]}.json").read_text())
    assert shards.file_sha256(shards.resolve(out)[0], str(victim)) == (sidecar["bytes"], sidecar["sha256"])
    assert mf.manifest_hash(out) == mf.table_hash(mf.load_manifest(out))


def test_a_smaller_rerun_removes_the_shards_it_no_longer_writes(ray_local, root, tmp_path):
    out = str(tmp_path / "out")
    run_prepare(_config(root, out), log=lambda _: None)
    many = set(shards.list_shards(out))
    run_prepare(PrepareConfig(source="phrasecut", root=root, split="train", out=out, shard_samples=100),
                log=lambda _: None)  # fmt: skip
    assert [os.path.basename(p) for p in shards.list_shards(out)] == ["train-000000.tar"] and len(many) > 1
    assert sorted(os.listdir(os.path.join(out, "_parts"))) == ["train-000000.tar.json"]
    assert mf.is_complete(out) and list(mf.load_sizes(out)) == ["train-000000.tar"]
