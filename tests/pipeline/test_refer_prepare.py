"""``run_prepare`` on the refer-layout fixture, on a local Ray instance: RefCOCO and gRefCOCO shards read back
record for record, with the manifest, the quarantine and the accounting of every referring sentence."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline import manifest as mf
from pipeline import shards
from pipeline.phrasecut import load_image_record
from pipeline.prepare import PrepareConfig, run_prepare
from pipeline.quarantine import read_quarantine
from pipeline.refer import list_refer_images
from segvlm.masks import decode_rles
from tests.fixtures_refer import make_refer_fixture

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return make_refer_fixture(tmp_path_factory.mktemp("refer"))


@pytest.mark.parametrize(("dataset", "split"), [("refcoco", "train"), ("grefcoco", "train")])
def test_prepare_round_trip(ray_local, fx, tmp_path, dataset, split):
    out = tmp_path / "shards"
    config = PrepareConfig(dataset, fx["roots"][dataset], split, str(out), shard_samples=2)
    summary = run_prepare(config, log=lambda _: None)
    expect = fx["expect"][(dataset, "unc")]
    good, bad = expect["good"][split], expect["bad"][split]

    # what one process reads from the same listing is what the shards hold
    want = {}
    for entry in list_refer_images(fx["roots"][dataset], split, dataset):
        record, _, _, _ = load_image_record("/unused", entry, source=dataset)
        if record is not None:
            want[record.key] = record.to_json()
    back = list(shards.iter_shard_set(str(out), split))
    assert {r.key: r.to_json() for r, _ in back} == want
    assert sorted(t.task_id for r, _ in back for t in r.tasks) == sorted(good)
    for record, _ in back:
        for task in record.tasks:
            mask = decode_rles(task.rles, record.orig_height, record.orig_width)
            assert mask.any() == bool(good[task.task_id][1])

    assert mf.is_complete(str(out))
    table = mf.load_manifest(str(out)).to_pylist()
    assert sorted(row["task_id"] for row in table) == sorted(good)
    assert {row["source"] for row in table} == {dataset}
    assert all((row["mask_area"] > 0) == bool(good[row["task_id"]][1]) for row in table)
    quarantine = read_quarantine(str(out))
    assert sorted((q["record"], q["reason"], q["source_file"]) for q in quarantine) == bad
    assert summary["accounting"] == {
        "inputs": len(good) + len(bad),
        "written": len(good),
        "quarantined": len(bad),
    }
    assert summary["split_by"] == "unc" and summary["source"] == dataset
    if dataset == "grefcoco":
        empty = [row for row in table if row["num_instances"] == 0]
        assert [row["task_id"] for row in empty] == ["9002"] and empty[0]["size"] == "none"
    assert np.isfinite([row["mask_area"] for row in table]).all()
