"""The streamed listing (JSON stream + SQLite) against the in-memory listing it replaces; broken files;
the output lock; run-id temp names; the bounded negative pool. No Ray."""

from __future__ import annotations

import hashlib
import json
import os
import random
import time

import pyarrow.fs as pafs
import pytest

from pipeline import shards
from pipeline.jsonstream import JSONStreamError, iter_json_list
from pipeline.listing import Listing
from pipeline.phrasecut import list_images
from pipeline.phrasecut_format import ImageEntry, schema_error
from pipeline.prepare import PrepareConfig, negative_pool_for, plan_listing, plan_shards, run_prepare
from pipeline.quarantine import BAD_SCHEMA, DUPLICATE_TASK_ID
from pipeline.runlock import LOCK_NAME, OutputLocked, RunLock
from pipeline.schema import QuarantineRecord
from tests.fixtures_phrasecut import make_phrasecut_fixture


def reference_list_images(root: str, split: str) -> list[ImageEntry]:
    """The in-memory listing the job used before (json.load of both files, dict grouping), kept as the
    reference the streamed listing must reproduce exactly."""
    for name in ("image_data_split.json", "image_data_split3000.json"):
        if os.path.exists(os.path.join(root, name)):
            with open(os.path.join(root, name), encoding="utf-8") as f:
                metadata = {
                    str(r["image_id"]): r for r in json.load(f) if isinstance(r, dict) and "image_id" in r
                }
            break
    source_file = f"refer_{split}.json"
    with open(os.path.join(root, source_file), encoding="utf-8") as f:
        tasks = json.load(f)
    entries: dict[str, ImageEntry] = {}
    orphans = ImageEntry(image_id=None, split=split, meta=None, tasks=[], source_file=source_file)
    seen: set[str] = set()
    for index, task in enumerate(tasks):
        image_id = task.get("image_id") if isinstance(task, dict) else None
        groupable = isinstance(image_id, int | str) and not isinstance(image_id, bool)
        if groupable:
            entry = entries.setdefault(
                str(image_id), ImageEntry(image_id, split, metadata.get(str(image_id)), [], source_file)
            )
        else:
            entry = orphans
        task_id = task.get("task_id") if isinstance(task, dict) else None
        error = schema_error(task)
        if error is not None:
            entry.issues.append(QuarantineRecord(
                source_file, task_id if isinstance(task_id, str) and task_id else f"#{index}", BAD_SCHEMA,
                f"task #{index} in {source_file}: {error}", image_id if groupable else None,
                task_id if isinstance(task_id, str) else None,
            ))  # fmt: skip
        elif task_id in seen:
            entry.issues.append(QuarantineRecord(
                source_file, task_id, DUPLICATE_TASK_ID,
                f"task #{index} in {source_file} repeats task_id {task_id!r}; the first is kept", image_id, task_id,
            ))  # fmt: skip
        else:
            seen.add(task_id)
            entry.tasks.append(task)
    return list(entries.values()) + ([orphans] if orphans.issues or orphans.tasks else [])


@pytest.fixture()
def messy_root(tmp_path):
    """The fixture with its tasks shuffled (an image's tasks far apart), ids as int and as str, orphans,
    a duplicate metadata row (the last wins), unicode phrases."""
    fx = make_phrasecut_fixture(tmp_path)
    tasks = json.loads((tmp_path / "refer_train.json").read_text())
    tasks.append(
        {**tasks[0], "task_id": "101__77", "image_id": "101", "phrase": "caf\u00e9 \u65e5 \U0001f600"}
    )
    tasks += [
        {"task_id": "x", "phrase": "no image"},
        ["not", "a", "task"],
        {"image_id": True, "task_id": "b"},
    ]
    random.Random(3).shuffle(tasks)
    (tmp_path / "refer_train.json").write_text(json.dumps(tasks, ensure_ascii=False), encoding="utf-8")
    meta = json.loads((tmp_path / "image_data_split.json").read_text())
    meta.append({**meta[0], "url": "the last row wins"})
    (tmp_path / "image_data_split.json").write_text(json.dumps(meta))
    return fx


def _as_tuple(entry: ImageEntry) -> tuple:
    return (entry.image_id, entry.split, entry.meta, entry.tasks, entry.source_file, entry.issues)


def test_streaming_listing_equals_the_in_memory_listing(messy_root):
    root = messy_root["root"]
    want = reference_list_images(root, "train")
    got = list_images(root, "train")
    assert [_as_tuple(e) for e in got] == [_as_tuple(e) for e in want]
    assert got[-1].image_id is None and len(got[-1].issues) == 3  # the orphans, last
    assert next(e for e in got if e.image_id == 101).meta["url"] == "the last row wins"
    assert any("\U0001f600" in t["phrase"] for e in got for t in e.tasks)
    # key order (what the job plans by) is the same set of entries, sorted by key, orphans last
    with Listing(root, "train") as listing:
        by_key = list(listing.entries(order="key"))
        assert len(listing) == len(want)
        plans = plan_listing(listing, PrepareConfig("phrasecut", root, "train", "unused", shard_samples=3))
    assert sorted(map(_as_tuple, by_key), key=repr) == sorted(map(_as_tuple, want), key=repr)
    old_plans = plan_shards(want, source="phrasecut", split="train", shard_samples=3)
    assert [(p.name, p.keys) for p in plans] == [(p.name, p.keys) for p in old_plans]


def test_streaming_parser_handles_every_chunk_boundary(tmp_path):
    items = [
        {"a": [1.5, -2e-3, 10**20], "s": '\u00e9\u65e5\U0001f600 \\" x'},
        12345,
        1e5,
        "t",
        [],
        None,
        True,
    ]
    path = tmp_path / "list.json"
    path.write_text(" \n" + json.dumps(items, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    for chunk in (1, 2, 3, 5, 8, 64, 1 << 20):
        assert list(iter_json_list(path, chunk_chars=chunk)) == items
    texts = [text for _, text in iter_json_list(path, with_text=True, chunk_chars=4)]
    assert [json.loads(t) for t in texts] == items  # the exact text of each item


def _error(path, **kwargs) -> JSONStreamError:
    with pytest.raises(JSONStreamError) as info:
        list(iter_json_list(path, **kwargs))
    return info.value


def test_invalid_utf8_and_broken_json_name_the_file_and_byte_offset(tmp_path):
    make_phrasecut_fixture(tmp_path, with_bad=False)
    refer = tmp_path / "refer_train.json"
    data = refer.read_bytes()
    offset = data.index(b"green box") + 3
    refer.write_bytes(data[:offset] + b"\xff" + data[offset:])
    with pytest.raises(ValueError) as info:
        list_images(tmp_path, "train")
    assert str(refer) in str(info.value) and f"byte {offset}" in str(info.value)
    assert "invalid UTF-8" in str(info.value) and info.value.offset == offset
    for chunk in (1, 7, offset, offset + 1):  # wherever the chunks split, the offset is exact
        assert _error(refer, chunk_chars=chunk).offset == offset

    # a character cut in half at the end of the file
    cut = tmp_path / "cut.json"
    cut.write_bytes(b'["ab\xe6\x97')
    assert _error(cut).offset == 4 and "invalid UTF-8" in _error(cut).reason

    # truncated: the error says so and points into the last item
    refer.write_bytes(data[:-30])
    err = _error(refer)
    assert "truncated" in err.reason and str(refer) in str(err) and err.offset <= len(data) - 30
    # a syntax error: byte offset, line and column of the fault
    bad = tmp_path / "bad.json"
    bad.write_bytes(b'[{"a": 1},\n {"b": tru}]')
    err = _error(bad)
    assert (err.offset, err.line, err.column) == (18, 2, 8) and "invalid JSON" in err.reason
    for text, where in ((b"", 0), (b"{}", 0), (b"[1,]", 3), (b"[1] x", 4), (b"[1 2]", 3)):
        bad.write_bytes(text)
        assert _error(bad).offset == where, text
    bad.write_bytes(b"[" + b'"' + b"x" * 5000)
    assert "larger than" in _error(bad, max_item_bytes=1000, chunk_chars=64).reason


def _bottom_k(entries, seed: int, k: int) -> tuple:
    def rank(e):
        return int.from_bytes(hashlib.sha256(f"{seed}\x00{e[0]}\x00{e[1]}".encode()).digest()[:8], "big")

    return tuple(sorted(set(entries), key=lambda e: (rank(e), e))[:k])


def test_negative_pool_is_a_bounded_order_free_sample_of_distinct_phrases(messy_root):
    root = messy_root["root"]
    config = PrepareConfig("phrasecut", root, "train", "unused", synthetic_prompts=True, seed=5)
    entries = list_images(root, "train")
    distinct = [
        (t["phrase_structure"]["name"] or t["phrase"].strip(), t["phrase"].strip())
        for e in entries
        if e.image_id is not None
        for t in e.tasks
        if t["phrase"].strip()
    ]
    assert len(set(distinct)) > 6
    full = negative_pool_for(entries, config)
    assert full == _bottom_k(distinct, 5, 10_000) and len(full) == len(set(distinct))
    small = negative_pool_for(entries, config, max_size=4)
    assert small == _bottom_k(distinct, 5, 4) == full[:4]
    assert negative_pool_for(entries[::-1], config, max_size=4) == small  # independent of order
    other = PrepareConfig("phrasecut", root, "train", "unused", synthetic_prompts=True, seed=6)
    assert negative_pool_for(entries, other, max_size=4) == _bottom_k(distinct, 6, 4) != small


# -------------------------------------------------------------------------------------------- locks


def test_a_second_run_on_the_same_local_output_is_refused(tmp_path):
    fs, out = pafs.LocalFileSystem(), str(tmp_path / "out")
    os.makedirs(out)
    (tmp_path / "out" / "manifest.parquet").write_bytes(b"earlier run")
    first = RunLock(fs, out, "aaaaaaaaaaaa").acquire()
    config = PrepareConfig("phrasecut", str(tmp_path), "train", out)
    with pytest.raises(OutputLocked, match="aaaaaaaaaaaa"):
        run_prepare(config, log=lambda _: None)  # refused before it touches anything
    assert (tmp_path / "out" / "manifest.parquet").read_bytes() == b"earlier run"
    with pytest.raises(OutputLocked, match=f"pid {os.getpid()}"):
        RunLock(fs, out, "bbbbbbbbbbbb").acquire()
    from jobs.prepare import main

    args = ["--source", "phrasecut", "--root", str(tmp_path), "--split", "train", "--out", out]
    assert main(args) == 3  # the CLI refuses before starting Ray
    first.release("failed")
    with RunLock(fs, out, "cccccccccccc") as third:  # the kernel lock is free again
        assert third.previous["run_id"] == "aaaaaaaaaaaa" and third.previous["state"] == "failed"
        assert json.loads((tmp_path / "out" / LOCK_NAME).read_text())["run_id"] == "cccccccccccc"


def test_object_store_lock_refuses_takes_over_stale_and_notices_a_takeover():
    import fsspec

    memory = fsspec.filesystem("memory")
    fs = pafs.PyFileSystem(pafs.FSSpecHandler(memory))  # not the local disk: the object-store protocol
    base = f"/lock-test-{os.getpid()}-{time.time_ns()}"
    a = RunLock(fs, base, "aaaaaaaaaaaa", settle=0.0, heartbeat=3600).acquire()  # renewed by hand
    try:
        with pytest.raises(OutputLocked, match="aaaaaaaaaaaa"):
            RunLock(fs, base, "bbbbbbbbbbbb", settle=0.0).acquire()
        assert a.refresh()
        a.check()  # still ours
        # a run that finds the heartbeat stale (here: stale_after 0) takes over; A notices and stops
        b = RunLock(fs, base, "bbbbbbbbbbbb", settle=0.0, stale_after=0.0).acquire()
        assert b.previous["run_id"] == "aaaaaaaaaaaa"
        assert not a.refresh()
        with pytest.raises(OutputLocked, match="lost the output lock"):
            a.check()
        b.release()
        c = RunLock(fs, base, "cccccccccccc", settle=0.0).acquire()  # released: free at once
        assert c.previous["state"] == "released"
        with pytest.raises(OutputLocked):
            RunLock(fs, base, "dddddddddddd", settle=0.0).acquire()
        d = RunLock(fs, base, "dddddddddddd", settle=0.0, break_lock=True).acquire()
        assert d.previous["run_id"] == "cccccccccccc"
        d.release()
        c._stop.set()
    finally:
        a._stop.set()
        memory.rm(base, recursive=True)


def test_cleanup_removes_only_the_given_runs_temp_files(tmp_path):
    fs = pafs.LocalFileSystem()
    dead, alive = "0123456789ab", "ba9876543210"
    names = [
        shards.temp_path(str(tmp_path / "train-000000.tar"), dead),
        shards.temp_path(str(tmp_path / "_parts" / "train-000000.tar.json"), dead),
        shards.temp_path(str(tmp_path / "train-000001.tar"), alive),
        str(tmp_path / "notes.tmp-by-hand"),
    ]
    for name in names:
        os.makedirs(os.path.dirname(name), exist_ok=True)
        with open(name, "wb") as f:
            f.write(b"x")
    assert [shards.temp_owner(os.path.basename(n)) for n in names] == [dead, dead, alive, None]
    assert shards.remove_temp_files(fs, str(tmp_path), run_ids=[dead]) == sorted(names[:2])
    assert shards.temp_files(fs, str(tmp_path)) == sorted(names[2:])
    with pytest.raises(ValueError):
        shards.temp_path("x", "not-hex")
