"""Shard and manifest I/O without Ray: determinism, atomicity, strict reads, URIs, progress."""

from __future__ import annotations

import io
import json
import os
import pickle
import tarfile
import uuid

import numpy as np
import pyarrow.fs as pafs
import pytest

from pipeline import manifest as mf
from pipeline import shards
from pipeline.prepare import ShardPlan, plan_shards
from pipeline.progress import Progress, format_seconds, format_table
from pipeline.schema import ImageRecord, Task
from segvlm.masks import mask_area_fraction, polygons_at_original_size


def _record(image_id: int, *, n_tasks: int = 2, width: int = 40, height: int = 30) -> ImageRecord:
    tasks = [
        Task(
            task_id=f"{image_id}__{k}",
            phrase=f"thing {k}",
            polygons=[[[[1.0 + k, 1.0], [20.5, 2.0], [10.0, 15.0 + k]]]],
            boxes=[[1.0, 1.0, 19.5, 14.0]],
            phrase_structure={"name": "thing", "attributes": [], "type": "name"},
        )
        for k in range(n_tasks)
    ]
    return ImageRecord(
        source="scenes", image_id=image_id, split="train", width=width, height=height, tasks=tasks
    )


def _samples(ids: list[int]) -> list[tuple[ImageRecord, bytes]]:
    return [(_record(i), f"jpeg-bytes-{i}".encode() * (i + 1)) for i in ids]


def test_write_shard_is_deterministic_and_round_trips(tmp_path):
    fs = pafs.LocalFileSystem()
    a = shards.write_shard(_samples([3, 1, 2]), fs, str(tmp_path / "a" / "train-000000.tar"))
    b = shards.write_shard(_samples([2, 3, 1]), fs, str(tmp_path / "b" / "train-000000.tar"))
    assert a.sha256 == b.sha256 and a.bytes == b.bytes == os.path.getsize(a.path)
    assert (tmp_path / "a" / "train-000000.tar").read_bytes() == (
        tmp_path / "b" / "train-000000.tar"
    ).read_bytes()
    assert a.keys == ("scenes_1", "scenes_2", "scenes_3") and a.samples == 3

    back = list(shards.iter_shard(fs, a.path))
    expected = sorted(_samples([1, 2, 3]), key=lambda s: s[0].key)
    assert [(r.to_json(), jpg) for r, jpg in back] == [(r.to_json(), jpg) for r, jpg in expected]
    # webdataset itself reads our tars (what the training loader will use)
    import webdataset as wds

    keys = [s["__key__"] for s in wds.WebDataset(a.path, shardshuffle=False)]
    assert keys == list(a.keys)
    assert os.listdir(tmp_path / "a") == ["train-000000.tar"]  # no temp file left


def test_fast_json_equals_to_json():
    record = _record(9, n_tasks=3)
    record.orig_width, record.image_path = 80, "/somewhere/9.jpg"
    record.tasks.append(
        Task(task_id="9__neg", phrase="a zebra", polygons=[], kind="negative", source_task_id="9__0")
    )
    assert shards.record_json(record) == record.to_json()
    assert ImageRecord.from_json(shards.record_json(record)).to_json() == record.to_json()


def test_failed_write_leaves_nothing(tmp_path):
    fs = pafs.LocalFileSystem()

    class Boom(bytes):
        def __len__(self) -> int:
            raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        shards.write_shard([(_record(1), Boom(b"x"))], fs, str(tmp_path / "train-000000.tar"))
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match="duplicate"):
        shards.write_shard([(_record(1), b"a"), (_record(1), b"b")], fs, str(tmp_path / "train-000001.tar"))
    assert os.listdir(tmp_path) == []


def _tar_with(path, members: list[tuple[str, bytes]], symlink: str | None = None) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if symlink:
            link = tarfile.TarInfo(symlink)
            link.type = tarfile.SYMTYPE
            link.linkname = "/etc/passwd"
            tar.addfile(link)


class _Trap:
    """Unpickling this creates a marker file: proof that a reader unpickled a member."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_reader_ignores_unexpected_members(tmp_path):
    marker = tmp_path / "unpickled"
    record = _record(7)
    trap = pickle.dumps(_Trap(str(marker)))
    path = tmp_path / "train-000000.tar"
    _tar_with(
        path,
        [
            ("scenes_7.jpg", b"JPEG"),
            ("scenes_7.json", record.to_json()),
            ("scenes_7.pyd", trap),
            ("scenes_7.pickle", trap),
            ("scenes_7.cls", b"1"),
        ],
        symlink="scenes_7.json.link",
    )
    back = list(shards.iter_shard(pafs.LocalFileSystem(), str(path)))
    assert len(back) == 1 and back[0][1] == b"JPEG" and back[0][0].to_json() == record.to_json()
    assert not marker.exists()

    broken = tmp_path / "train-000001.tar"
    _tar_with(broken, [("scenes_8.json", _record(8).to_json())])  # no jpg
    with pytest.raises(ValueError, match="lacks"):
        list(shards.iter_shard(pafs.LocalFileSystem(), str(broken)))


def test_manifest_rows_measure_at_original_size_and_tag():
    record = _record(5, n_tasks=1, width=20, height=15)  # stored at half the original size
    record.orig_width, record.orig_height = 40, 30
    big = [[[[0.0, 0.0], [20.0, 0.0], [20.0, 15.0], [0.0, 15.0]]]]  # whole stored image
    record.tasks.append(Task(task_id="5__big", phrase="everything", polygons=[big[0], big[0]]))
    record.tasks.append(Task(task_id="5__neg", phrase="a zebra", polygons=[], kind="negative"))
    rows = {r["task_id"]: r for r in mf.manifest_rows(record, "train-000000.tar")}
    at_orig = polygons_at_original_size(record.tasks[0].polygons, 20, 15, 40, 30)
    assert rows["5__0"]["mask_area"] == mask_area_fraction(at_orig, 40, 30) > 0
    assert rows["5__0"]["mask_area"] != mask_area_fraction(record.tasks[0].polygons, 40, 30)  # not unscaled
    assert rows["5__big"]["mask_area"] > 0.9 and rows["5__big"]["size"] == "large"
    assert rows["5__big"]["instances"] == "multiple" and rows["5__big"]["num_instances"] == 2
    assert rows["5__neg"]["mask_area"] == 0.0 and rows["5__neg"]["size"] == "none"
    assert rows["5__0"]["image_id"] == "5" and rows["5__0"]["source"] == "scenes"
    assert mf.size_tag(0.01, 1) == "small" and mf.size_tag(0.1, 1) == "medium"


def test_memory_uri_end_to_end_and_completion():
    uri = f"memory://segvlm-test-{uuid.uuid4().hex[:8]}/shards"
    fs, base = shards.resolve(uri)
    assert isinstance(fs, pafs.PyFileSystem)
    infos = [
        shards.write_shard(_samples(ids), fs, shards.join(base, shards.shard_name("train", n)))
        for n, ids in enumerate([[1, 2], [3]])
    ]
    assert not mf.is_complete(uri)  # shards alone: unfinished
    rows = [
        row
        for info in infos
        for r, _ in shards.iter_shard(fs, info.path)
        for row in mf.manifest_rows(r, info.name)
    ]
    mf.write_manifest(fs, base, rows, {i.name: i.samples for i in infos})
    assert mf.is_complete(uri)
    assert [r.key for r, _ in shards.iter_shard_set(uri, split="train")] == [
        "scenes_1",
        "scenes_2",
        "scenes_3",
    ]
    assert list(shards.iter_shard_set(uri, split="val")) == []
    table = mf.load_manifest(uri)
    assert table.num_rows == 6 and sum(mf.load_sizes(uri).values()) == 3
    # the hash is of the rows, not the row order or parquet bytes
    assert mf.manifest_hash(uri) == mf.table_hash(table.take(list(range(5, -1, -1))))
    assert shards.remove_temp_files(fs, base) == []
    fs.delete_file(shards.join(base, "train-000001.tar"))
    assert not mf.is_complete(uri)  # sizes.json names a shard that is gone


def test_plan_is_independent_of_listing_order(tmp_path):
    class Entry:
        def __init__(self, image_id):
            self.image_id = image_id

    entries = [Entry(i) for i in (5, 3, 9, 1, 7)]
    a = plan_shards(entries, source="scenes", split="train", shard_samples=2)
    b = plan_shards(entries[::-1], source="scenes", split="train", shard_samples=2)
    assert [(p.name, p.keys) for p in a] == [(p.name, p.keys) for p in b]
    assert [len(p.keys) for p in a] == [2, 2, 1] and a[0].keys == ("scenes_1", "scenes_3")
    by_bytes = plan_shards(entries, source="scenes", split="train", shard_bytes=10, sizes=[4, 4, 4, 4, 4])
    assert [len(p.keys) for p in by_bytes] == [3, 2] and all(isinstance(p, ShardPlan) for p in by_bytes)


def test_progress_throttles_and_estimates():
    now = [0.0]
    out = io.StringIO()
    progress = Progress(100, label="t", unit="images", every=5.0, stream=out, clock=lambda: now[0])
    printed = []
    for _ in range(10):
        now[0] += 1.0
        printed.append(progress.update(5))
    assert printed.count(True) == 2  # at t=5 and t=10 only
    assert progress.rate == pytest.approx(5.0) and progress.eta == pytest.approx(10.0)
    progress.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and "50/100 images" in lines[-1] and "ETA 0:00:10" in lines[-1]
    assert format_seconds(3725) == "1:02:05" and format_seconds(None) == "?"
    table = format_table([("images", 1234), ("seconds", 2.5)], title="x")
    assert "1,234" in table and "2.50" in table


def test_json_sidecars_are_atomic(tmp_path):
    fs = pafs.LocalFileSystem()
    shards.write_json_atomic(fs, str(tmp_path / "_parts" / "a.json"), {"b": np.int64(1).item()})
    assert json.loads((tmp_path / "_parts" / "a.json").read_text()) == {"b": 1}
    (tmp_path / "x.tar.tmp-abc").write_bytes(b"partial")
    (tmp_path / "_parts" / "y.json.tmp-abc").write_bytes(b"partial")
    removed = shards.remove_temp_files(fs, str(tmp_path))
    assert len(removed) == 2 and sorted(os.listdir(tmp_path)) == ["_parts"]
