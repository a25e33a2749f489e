"""PhraseCut reader: planted bad records land in quarantine, good tasks come out unchanged."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.phrasecut import iter_records, list_images, load_image_record, merge_stats
from pipeline.quarantine import REASONS, count_by_reason, read_quarantine, write_quarantine
from pipeline.schema import ImageRecord, QuarantineRecord
from segvlm.masks import rasterize_polygons
from tests.fixtures_phrasecut import make_phrasecut_fixture


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
    return make_phrasecut_fixture(tmp_path_factory.mktemp("phrasecut"))


def _read_all(root, split, **kwargs):
    records, images, quarantine, stats = [], {}, [], []
    for record, jpg, bad, st in iter_records(root, split, **kwargs):
        quarantine += bad
        stats.append(st)
        if record is not None:
            records.append(record)
            images[record.image_id] = jpg
    return records, images, quarantine, merge_stats(*stats)


@pytest.fixture(scope="module")
def result(fixture):
    return _read_all(fixture["root"], "train")


def test_every_planted_bad_record_is_quarantined_with_reason_and_file(fixture, result):
    _, _, quarantine, stats = result
    got = sorted((q.record, q.reason, q.source_file) for q in quarantine)
    assert got == sorted(fixture["expected_quarantine"])
    # every reason code of ordinary flawed data (tests/pipeline/test_hostile_data.py exercises the others)
    assert {q.reason for q in quarantine} == set(list(REASONS)[:8])
    for q in quarantine:
        assert q.reason in REASONS
        assert q.source_file in q.detail, q  # the message names the file
        assert q.detail
    # image-level faults carry the image id, and the file named is the image
    missing = [q for q in quarantine if q.reason == "missing_image"]
    assert len(missing) == 2 and all(q.image_id == 201 and "images/201.jpg" in q.detail for q in missing)
    assert stats["quarantined"] == len(fixture["expected_quarantine"])


def test_good_tasks_come_out_with_identical_phrase_and_polygons(fixture, result):
    records, _, _, stats = result
    tasks = {t.task_id: (r, t) for r in records for t in r.tasks}
    assert sorted(tasks) == sorted(fixture["good_task_ids"]["train"])
    for task_id, raw in fixture["good_tasks"].items():
        record, task = tasks[task_id]
        assert task.phrase == raw["phrase"]
        assert task.phrase_structure == raw["phrase_structure"]
        assert task.kind == "original"
        assert record.image_id == raw["image_id"] and record.split == "train"
        if task_id not in fixture["clipped"]:
            assert task.polygons == raw["Polygons"]
            assert task.boxes == raw["instance_boxes"]
    assert stats["tasks_ok"] == len(fixture["good_tasks"])


def test_records_round_trip_through_json(result):
    records, _, _, _ = result
    for record in records:
        back = ImageRecord.from_json(record.to_json())
        assert back.to_json() == record.to_json()
        assert back.key == f"phrasecut_{record.image_id}"


def test_points_outside_are_clipped_and_counted(fixture, result):
    records, _, _, stats = result
    assert stats["clipped_points"] == sum(fixture["clipped"].values())
    tasks = {t.task_id: (r, t) for r in records for t in r.tasks}
    for task_id in fixture["clipped"]:
        record, task = tasks[task_id]
        for polygon in task.polygons[0]:
            for x, y in polygon:
                assert 0 <= x <= record.width and 0 <= y <= record.height
        x, y, w, h = task.boxes[0]
        assert x >= 0 and y >= 0 and x + w <= record.width and y + h <= record.height


def test_non_rgb_images_are_converted_and_rgb_jpegs_pass_through(fixture, result):
    records, images, _, stats = result
    assert stats["converted_rgb"] == len(fixture["converted_rgb"])
    assert stats["converted_format"] == 1  # the palette PNG
    for record in records:
        jpg = images[record.image_id]
        decoded = Image.open(io.BytesIO(jpg))
        assert decoded.format == "JPEG" and decoded.mode == "RGB"
        assert decoded.size == (record.width, record.height)
        original = Path(record.image_path).read_bytes()
        if record.image_id in fixture["converted_rgb"]:
            assert jpg != original
        else:
            assert jpg == original  # untouched bytes


def test_max_side_scales_polygons_and_keeps_original_size(fixture):
    image_id, task_id, w, h = fixture["resizable"]
    entry = next(e for e in list_images(fixture["root"], "train") if e.image_id == image_id)
    original, _, _, _ = load_image_record(fixture["root"], entry)
    record, jpg, quarantine, stats = load_image_record(fixture["root"], entry, max_side=60)
    assert not quarantine and stats["resized"] == 1
    assert (record.width, record.height) == (60, 40)
    assert (record.orig_width, record.orig_height) == (w, h)
    assert Image.open(io.BytesIO(jpg)).size == (60, 40)
    task = next(t for t in record.tasks if t.task_id == task_id)
    task0 = next(t for t in original.tasks if t.task_id == task_id)
    small = rasterize_polygons(task.polygons, 60, 40)
    big = rasterize_polygons(task0.polygons, w, h)
    downscaled = np.asarray(Image.fromarray(big * 255).resize((60, 40), Image.Resampling.BILINEAR)) >= 128
    inter = np.logical_and(small, downscaled).sum()
    union = np.logical_or(small, downscaled).sum()
    assert inter / union >= 0.95
    assert task.boxes[0][2] == pytest.approx(task0.boxes[0][2] * 0.5)
    # small images are not touched by max_side
    small_entry = next(e for e in list_images(fixture["root"], "train") if e.image_id == 101)
    rec, data, _, st = load_image_record(fixture["root"], small_entry, max_side=64)
    assert st["resized"] == 0 and data == Path(rec.image_path).read_bytes()


def test_alternative_metadata_name_is_accepted(tmp_path):
    fx = make_phrasecut_fixture(tmp_path, with_bad=False, metadata_name="image_data_split3000.json")
    records, _, quarantine, _ = _read_all(tmp_path, "train")
    assert not quarantine
    assert sorted(t.task_id for r in records for t in r.tasks) == sorted(fx["good_task_ids"]["train"])
    val, _, _, _ = _read_all(tmp_path, "val")
    assert [t.task_id for r in val for t in r.tasks] == fx["good_task_ids"]["val"]
    assert all(r.split == "val" for r in val)


def test_list_images_is_cheap_and_picklable(fixture):
    import pickle

    entries = list_images(fixture["root"], "train")
    assert len({e.image_id for e in entries}) == len(entries)
    restored = pickle.loads(pickle.dumps(entries))
    assert [e.image_id for e in restored] == [e.image_id for e in entries]
    # the listing already knows about schema errors and repeated ids
    issues = [q.reason for e in entries for q in e.issues]
    assert sorted(issues) == ["bad_schema", "duplicate_task_id"]


def test_orphan_tasks_without_image_id_are_quarantined(tmp_path):
    make_phrasecut_fixture(tmp_path, with_bad=False)
    tasks = json.loads((tmp_path / "refer_val.json").read_text())
    tasks.append({"task_id": "x", "phrase": "no image"})
    tasks.append(["not", "a", "task"])
    (tmp_path / "refer_val.json").write_text(json.dumps(tasks))
    _, _, quarantine, _ = _read_all(tmp_path, "val")
    assert [(q.record, q.reason) for q in quarantine] == [("x", "bad_schema"), ("#2", "bad_schema")]
    assert "missing field(s) image_id" in quarantine[0].detail


def test_quarantine_parquet_round_trip(tmp_path, result):
    _, _, quarantine, _ = result
    path = write_quarantine(tmp_path / "out", quarantine)
    assert path.endswith("quarantine.parquet")
    rows = read_quarantine(tmp_path / "out")
    assert rows == [
        {**q.to_dict(), "image_id": None if q.image_id is None else str(q.image_id)} for q in quarantine
    ]
    assert count_by_reason(rows) == count_by_reason(quarantine)
    assert count_by_reason(quarantine)["missing_image"] == 2
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["quarantine.parquet"]  # no temp left
    # an empty quarantine is still a file (a finished job with nothing set aside)
    write_quarantine(tmp_path / "empty", [])
    assert read_quarantine(tmp_path / "empty") == []


def test_quarantine_through_a_pyarrow_filesystem(tmp_path):
    from pyarrow import fs

    local = fs.SubTreeFileSystem(str(tmp_path), fs.LocalFileSystem())
    records = [QuarantineRecord("refer_val.json", "1__2", "empty_phrase", "blank", 1, "1__2")]
    write_quarantine("job/quarantine.parquet", records, filesystem=local)
    assert read_quarantine("job", filesystem=local)[0]["image_id"] == "1"
    assert sorted(p.name for p in (tmp_path / "job").iterdir()) == ["quarantine.parquet"]
