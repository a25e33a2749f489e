"""Hostile and broken records: nothing read outside the dataset, nothing lost, no job killed by one record.

The reader, the record accounting, the loaders' size caps and error budget, and the tracking relay's
argument checks, in one process (fast). ``test_hostile_pipeline.py`` runs the same fixture through
``prepare``, training and evaluation on Ray.
"""

from __future__ import annotations

import io
import json
import os
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from pipeline import phrasecut
from pipeline.loader import DataConfig, make_eval_loader, make_train_loader
from pipeline.phrasecut import iter_records, list_images, load_image_record
from pipeline.prepare import AccountingError, check_accounting
from pipeline.quarantine import REASONS, RECORD_ERROR, read_quarantine, write_quarantine
from pipeline.schema import ImageRecord, QuarantineRecord, Task
from pipeline.validate import (
    MAX_PHRASE_CHARS,
    TooLargeError,
    UnsafePathError,
    check_sample_sizes,
    id_error,
    read_file_inside,
    resolve_inside,
    safe_child,
    size_error,
    text_error,
)
from tests.fixtures_hostile import CANARY, make_hostile_fixture, png_bomb
from tests.fixtures_phrasecut import _image, _jpeg

HOSTILE_REASONS = {
    "bad_id",
    "unsafe_path",
    "bad_text",
    "bad_metadata",
    "image_too_large",
    "bad_polygons",
    "bad_schema",
    "duplicate_task_id",
    "empty_phrase",
}

_opened: list[str] | None = None  # paths opened while a test records them (audit hooks are forever)


def _audit(event: str, args: tuple) -> None:
    if _opened is not None and event == "open" and args and isinstance(args[0], str | bytes | os.PathLike):
        _opened.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    return make_hostile_fixture(tmp_path_factory.mktemp("hostile"))


def _read(root: str, split: str):
    records, quarantine, stats = [], [], []
    for record, jpg, bad, entry_stats in iter_records(root, split):
        quarantine += bad
        stats.append(entry_stats)
        if record is not None:
            records.append((record, jpg))
    return records, quarantine, stats


@pytest.mark.parametrize("split", ["train", "val"])
def test_every_hostile_record_is_quarantined_with_its_reason_and_every_good_one_kept(hostile, split):
    global _opened
    _opened = []
    try:
        records, quarantine, stats = _read(hostile["root"], split)
    finally:
        opened, _opened = _opened, None
    assert sorted((q.record, q.reason) for q in quarantine) == hostile["expected_quarantine"][split]
    assert sorted(t.task_id for r, _ in records for t in r.tasks) == hostile["good_task_ids"][split]
    # accounting: every input record exactly once, per image and in total
    assert all(s["tasks"] == s["tasks_ok"] + s["quarantined"] for s in stats)
    assert sum(s["tasks"] for s in stats) == hostile["inputs"][split]
    for q in quarantine:
        assert q.detail and q.source_file in q.detail, q  # names the file
        q.detail.encode("utf-8", "backslashreplace")  # printable in a log
    # nothing outside the root was opened, and no canary byte reached a sample
    base = os.path.realpath(hostile["base"])
    assert any("/dataset/images/" in p for p in opened)  # the hook does see the reader's opens
    outside = [p for p in opened if os.path.realpath(p).startswith(base) and "/dataset/" not in p]
    assert outside == []
    assert not any(CANARY in jpg for _, jpg in records)
    assert all(
        os.path.realpath(r.image_path).startswith(os.path.realpath(hostile["root"])) for r, _ in records
    )


def test_the_hostile_fixture_exercises_every_new_reason(hostile):
    seen = {reason for split in ("train", "val") for _, reason in hostile["expected_quarantine"][split]}
    assert seen == HOSTILE_REASONS
    assert HOSTILE_REASONS | {RECORD_ERROR} <= set(REASONS)


def test_an_unexpected_exception_quarantines_its_record_only(hostile, monkeypatch):
    """Any exception while handling one record is a quarantine row with its type and message."""
    real_clip = phrasecut._clip_polygons

    def clip(instances, width, height):
        if instances == [[[[4, 5], [30, 5], [30, 28], [4, 28]]]]:  # task 1 of every good train image
            raise ZeroDivisionError("planted")
        return real_clip(instances, width, height)

    monkeypatch.setattr(phrasecut, "_clip_polygons", clip)
    entries = {str(e.image_id): e for e in list_images(hostile["root"], "train")}
    record, _, bad, stats = load_image_record(hostile["root"], entries["502"])
    planted = [q for q in bad if q.reason == RECORD_ERROR]
    assert [q.record for q in planted] == ["502__1"]
    assert "ZeroDivisionError: planted" in planted[0].detail
    assert [t.task_id for t in record.tasks] == ["502__2"]  # the other task of the image survives
    assert stats["tasks"] == stats["tasks_ok"] + stats["quarantined"]

    # an exception outside the per-task loop takes the image's tasks, and only them
    root = Path(hostile["root"])
    monkeypatch.setattr(phrasecut, "read_file_inside", lambda *a: (_ for _ in ()).throw(KeyError("boom")))
    record, jpg, bad, stats = load_image_record(root, entries["503"])
    assert record is None and jpg is None
    assert {q.reason for q in bad} == {RECORD_ERROR, "bad_schema"}  # the listing's rows travel along
    assert all("KeyError" in q.detail for q in bad if q.reason == RECORD_ERROR)
    assert stats["tasks"] == stats["quarantined"] == len(entries["503"].tasks) + len(entries["503"].issues)


# ------------------------------------------------------------------------------------------- validate
@pytest.mark.parametrize(
    ("value", "ok"),
    [
        (2331519, True),
        ("2331519__2346548_2346549", True),
        ("scene-00012__3_4", True),
        ("a" * 200, True),
        ("a" * 201, False),
        ("../../x", False),
        ("a/b", False),
        ("/abs/path", False),
        ("..", False),
        ("a.b", False),
        (".hidden", False),
        ("", False),
        (-1, False),
        (True, False),
        (1.5, False),
        ("caf\u00e9", False),
        ("x\ud800", False),
        ("nul\x00", False),
    ],
)
def test_id_rule(value, ok):
    assert (id_error(value) is None) is ok


def test_safe_child_and_resolve_inside(tmp_path):
    assert safe_child(tmp_path, "2331519__1.png") == tmp_path.resolve() / "2331519__1.png"
    for name in ("../x.png", "a/b.png", "/abs.png", "..", "", "x\x00.png"):
        with pytest.raises(UnsafePathError):
            safe_child(tmp_path, name)
    (tmp_path / "root" / "images").mkdir(parents=True)
    (tmp_path / "outside.jpg").write_bytes(b"secret")
    (tmp_path / "root" / "images" / "in.jpg").write_bytes(b"x" * 10)
    os.symlink(tmp_path / "outside.jpg", tmp_path / "root" / "images" / "out.jpg")
    root = tmp_path / "root"
    assert resolve_inside(root, "images/in.jpg") == os.path.realpath(root / "images" / "in.jpg")
    for relative in ("images/out.jpg", "images/../../outside.jpg", "/etc/passwd", "."):
        with pytest.raises(UnsafePathError):
            resolve_inside(root, relative)
    assert read_file_inside(root, "images/in.jpg", 10)[1] == b"x" * 10
    with pytest.raises(TooLargeError):
        read_file_inside(root, "images/in.jpg", 9)
    with pytest.raises(FileNotFoundError):
        read_file_inside(root, "images", 100)  # a directory is no image


def test_text_rule():
    assert text_error("the red cup on the left") is None
    assert text_error("caf\u00e9 \u2014 \U0001f600") is None  # any valid Unicode that is not a control
    assert "surrogate" in text_error("a\ud800b")
    assert "control" in text_error("tab\there")
    assert "control" in text_error("\x7f")
    assert "512" in text_error("x" * (MAX_PHRASE_CHARS + 1))
    assert text_error("x" * MAX_PHRASE_CHARS) is None
    assert "not a string" in text_error(None)


def test_size_rule():
    assert size_error(640, 480, 36_000_000, "m") is None
    assert size_error(640.0, 480, 36_000_000, "m") is None
    assert "not integers" in size_error("640", 480, 36_000_000, "m")
    assert "not integers" in size_error(True, 480, 36_000_000, "m")
    assert "within" in size_error(0, 480, 36_000_000, "m")
    assert "within" in size_error(70_000, 1, None, "m")
    assert "over the limit" in size_error(6001, 6000, 36_000_000, "m")


def test_quarantine_file_holds_rows_that_quote_invalid_unicode(tmp_path):
    row = QuarantineRecord(
        source_file="refer_train.json", record="x\ud800", reason="bad_text", detail="\ud800"
    )
    write_quarantine(tmp_path, [row])
    back = read_quarantine(tmp_path)
    assert (
        back[0]["record"] == "x\\ud800" and back[0]["detail"] == "\\ud800" and back[0]["reason"] == "bad_text"
    )


# ------------------------------------------------------------------------------------------- accounting
def _sidecar(shard: str, inputs: int, written: list[str], quarantined: int) -> dict:
    return {
        "shard": shard,
        "inputs": inputs,
        "manifest": [{"task_id": t, "kind": "original"} for t in written]
        + [{"task_id": f"{t}__template0", "kind": "template"} for t in written],
        "quarantine": [{"reason": "bad_text"}] * quarantined,
    }


def test_accounting_proves_every_input_record_is_written_or_quarantined():
    sidecars = [_sidecar("train-000000.tar", 3, ["a", "b"], 1), _sidecar("train-000001.tar", 2, [], 2)]
    assert check_accounting(sidecars, 5) == {"inputs": 5, "written": 2, "quarantined": 3}
    with pytest.raises(AccountingError, match="6 input records, 2 written \\+ 3 quarantined"):
        check_accounting(sidecars, 6)
    lost = [_sidecar("train-000000.tar", 3, ["a"], 1)]
    with pytest.raises(AccountingError, match=r"train-000000\.tar: 3 input records"):
        check_accounting(lost, 3)
    twice = [_sidecar("train-000000.tar", 1, ["a"], 0), _sidecar("train-000001.tar", 1, ["a"], 0)]
    with pytest.raises(AccountingError, match="more than once"):
        check_accounting(twice, 2)


# ------------------------------------------------------------------------------------------- loaders
def fake_tokenize(phrases: list[str]) -> dict[str, torch.Tensor]:
    ids = torch.zeros(len(phrases), 4, dtype=torch.long)
    for i, phrase in enumerate(phrases):
        words = [zlib.crc32(w.encode()) % 1000 + 1 for w in phrase.split()][:4]
        ids[i, : len(words)] = torch.tensor(words)
    return {"input_ids": ids, "attention_mask": (ids > 0).long()}


def _record(key: int, width: int = 48, height: int = 40, **extra) -> ImageRecord:
    task = Task(task_id=f"{key}__1", phrase="red box", polygons=[[[[2, 2], [30, 2], [30, 30], [2, 30]]]])
    return ImageRecord(
        source="t", image_id=key, split="train", width=width, height=height, tasks=[task], **extra
    )


def _write_tar(path: Path, samples: list[tuple[str, bytes, bytes]]) -> None:
    with wds.TarWriter(str(path)) as sink:
        for key, jpg, js in samples:
            sink.write({"__key__": key, "jpg": jpg, "json": js})


def test_loaders_never_allocate_from_an_unchecked_size(tmp_path):
    good = _jpeg(_image(48, 40, 1))
    bomb_header = png_bomb(10_000, 10_000)
    samples = [
        ("t_1", good, _record(1).to_json()),
        ("t_2", good, _record(2, width=1_000_000, height=1_000_000).to_json()),  # would be a 1 TB mask
        ("t_3", good, _record(3, orig_width=200_000, orig_height=200_000).to_json()),
        ("t_4", bomb_header, _record(4).to_json()),  # header says 100 MP
    ]
    _write_tar(tmp_path / "train-000000.tar", samples)
    with pytest.raises(ValueError, match="size 1000000x1000000"):
        check_sample_sizes(_record(2, width=1_000_000, height=1_000_000), good)
    with pytest.raises(ValueError, match="image header size 10000x10000"):
        check_sample_sizes(_record(4), bomb_header)
    # evaluation: a bad sample is an error naming it (a skipped sample would change the metric silently)
    loader = make_eval_loader(tmp_path, split="train", batch_size=4, image_size=32, tokenizer=fake_tokenize)
    with pytest.raises(ValueError, match="t_2"):
        list(loader)
    # training: skipped, and only the good sample's tasks come out
    stream, _ = make_train_loader(
        DataConfig(train_shards=str(tmp_path), negative_rate=0.0, shuffle_buffer=1, num_workers=0),
        batch_size=4,
        image_size=32,
        tokenizer=fake_tokenize,
        steps_per_epoch=2,
        return_dataset=True,
    )
    batches = list(stream)
    assert len(batches) == 2 and {k for b in batches for k in b["key"]} == {"t_1"}


def test_training_error_budget_skips_corrupt_samples_but_stops_an_all_broken_stream(tmp_path, capsys):
    good = _jpeg(_image(48, 40, 1))
    broken = [(f"t_{i:03d}", b"not a jpeg", b"{not json") for i in range(10)]
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    _write_tar(mixed / "train-000000.tar", [*broken, ("t_999", good, _record(999).to_json())])
    stream, _ = make_train_loader(
        DataConfig(train_shards=str(mixed), negative_rate=0.0, shuffle_buffer=1, num_workers=0),
        batch_size=2,
        image_size=32,
        tokenizer=fake_tokenize,
        steps_per_epoch=3,
        return_dataset=True,
    )
    assert len(list(stream)) == 3  # 10 consecutive failures < the budget of 50: skipped
    assert "skipping after error" in capsys.readouterr().err
    dead = tmp_path / "dead"
    dead.mkdir()
    _write_tar(dead / "train-000000.tar", broken)
    stream, _ = make_train_loader(
        DataConfig(train_shards=str(dead), negative_rate=0.0, shuffle_buffer=1, num_workers=0),
        batch_size=2,
        image_size=32,
        tokenizer=fake_tokenize,
        steps_per_epoch=3,
        return_dataset=True,
    )
    with pytest.raises(RuntimeError, match="51 consecutive shard/sample errors"):
        list(stream)  # endless resampling over nothing but broken samples stops, it does not spin


# ------------------------------------------------------------------------------------------- relay
def test_tracking_accepts_only_its_logging_methods_and_paths_inside(tmp_path):
    from jobs.tracking_relay import TrackingRelay, check_call, unpack_folder

    relay = object.__new__(TrackingRelay)  # the actor's own method, without starting Ray
    relay.logger = None
    for method in ("open", "__init__", "_call", "__class__", "start", None):
        with pytest.raises(ValueError, match="not a logging method"):
            relay.call(method, (), {}, None)
    for method, args, kwargs in [
        ("log_text", ("hi", "../../etc/x.txt"), {}),
        ("log_dict", ({}, "/abs.json"), {}),
        ("log_dict", ({},), {"artifact_file": "a/../../b.json"}),
        ("log_artifacts", ("../up",), {}),
        ("log_image", (None, "../key", 1), {}),
    ]:
        with pytest.raises(ValueError, match="tracking relay"):
            check_call(method, args, kwargs, None)
    check_call("log_dict", ({}, "val/report_step0000010.json"), {}, None)
    check_call("log_artifacts", (None,), {}, ("figure", {"pr.png": b""}))
    for packed in [
        ("..", {"a": b""}),
        ("ok", {"../../escape": b"x"}),
        ("ok", {"/abs": b"x"}),
        ("ok", {"a/./b": b"x"}),
        ("a/b", {"x": b""}),
        ("ok", {"x": "not bytes"}),
    ]:
        with pytest.raises(ValueError, match="refused"):
            unpack_folder(packed, tmp_path / "tmp")
    assert not (tmp_path / "escape").exists() and not (tmp_path / "tmp").exists()
    root = unpack_folder(("ckpt", {"model.safetensors": b"w", "sub/meta.json": b"{}"}), tmp_path / "tmp")
    assert (root / "sub" / "meta.json").read_bytes() == b"{}"


def test_bomb_fixture_is_what_it_claims():
    data = png_bomb(3, 2)
    with Image.open(io.BytesIO(data)) as image:
        assert image.size == (3, 2) and np.asarray(image).tolist() == [[0, 0, 0], [0, 0, 0]]
    assert len(png_bomb(10_000, 10_000)) < 200_000  # 100 MP in well under 200 KB


# ------------------------------------------------------------------------------------------- prompts
def test_hostile_phrases_never_reach_the_negative_pool(hostile, tmp_path):
    from pipeline.prepare import PrepareConfig, negative_pool_for

    config = PrepareConfig(
        source="phrasecut", root=hostile["root"], split="train", out=str(tmp_path), synthetic_prompts=True
    )
    pool = negative_pool_for(list_images(hostile["root"], "train"), config)
    assert pool and all(text_error(name) is None and text_error(phrase) is None for name, phrase in pool)
    assert "clipped box" in {phrase for _, phrase in pool}  # clean phrases of kept tasks are there


def test_a_record_whose_manifest_row_cannot_be_encoded_is_quarantined_not_fatal(hostile, tmp_path):
    """A generated negative with a lone surrogate (here from a hand-made pool) would have made the manifest
    write raise after every shard was written; now its image is quarantined and the shard still written."""
    import pyarrow.fs as pafs

    from pipeline.prepare import ShardJob, build_shard, plan_shards, sidecar_path

    entries = [e for e in list_images(hostile["root"], "train") if e.image_id in (504, 505)]
    (plan,) = plan_shards(entries, source="phrasecut", split="train", shard_samples=10)
    job = ShardJob(
        root=hostile["root"], source="phrasecut", max_side=None, fingerprint="f",
        filesystem=pafs.LocalFileSystem(), base=str(tmp_path), synthetic_prompts=True,
        prompt_rates={"negative": 0.9}, negative_pool=(("zebra\ud800", "a zebra\ud800"),),
    )  # fmt: skip
    sidecar = build_shard(plan, job)
    assert sidecar["samples"] == 0 and sidecar["manifest"] == []
    assert sorted(q["record"] for q in sidecar["quarantine"]) == ["504__1", "504__2", "505__1", "505__2"]
    assert all(
        q["reason"] == RECORD_ERROR and "not valid Unicode" in q["detail"] for q in sidecar["quarantine"]
    )
    assert check_accounting([sidecar], 4) == {"inputs": 4, "written": 0, "quarantined": 4}
    written = json.loads(Path(sidecar_path(str(tmp_path), plan.name)).read_text())
    assert written["quarantine"] == sidecar["quarantine"]  # the sidecar on disk says the same


def test_loaders_cap_what_a_tar_member_may_ask_for(tmp_path, monkeypatch):
    from pipeline import loader

    good = _jpeg(_image(48, 40, 1))
    big = _jpeg(_image(400, 300, 2))
    _write_tar(
        tmp_path / "train-000000.tar",
        [("t_1", good, _record(1).to_json()), ("t_2", big, _record(2, width=400, height=300).to_json())],
    )
    monkeypatch.setattr(loader, "MAX_MEMBER_BYTES", len(good) + 100)  # t_2's jpg is over it
    with pytest.raises(ValueError, match=r"t_2\.jpg .* bytes, over the"):
        list(make_eval_loader(tmp_path, split="train", batch_size=4, image_size=32, tokenizer=fake_tokenize))
    stream, _ = make_train_loader(
        DataConfig(train_shards=str(tmp_path), negative_rate=0.0, shuffle_buffer=1, num_workers=0),
        batch_size=2,
        image_size=32,
        tokenizer=fake_tokenize,
        steps_per_epoch=2,
        return_dataset=True,
    )
    assert {k for b in stream for k in b["key"]} == {"t_1"}  # t_2 skipped: it lacks its jpg member now
    monkeypatch.setattr(loader, "MAX_MEMBER_BYTES", len(big) + 100)
    keys = [k for b in make_eval_loader(tmp_path, split="train", batch_size=4, image_size=32,
                                        tokenizer=fake_tokenize) for k in b["key"]]  # fmt: skip
    assert keys == ["t_1", "t_2"]


def test_quarantine_detail_is_bounded(tmp_path):
    row = QuarantineRecord(
        source_file="refer_train.json", record="1__1", reason="record_error", detail="x" * 10**6
    )
    write_quarantine(tmp_path, [row])
    (back,) = read_quarantine(tmp_path)
    assert len(back["detail"]) <= 2000 and back["detail"].endswith("(1000000 chars)")


def test_relay_allowlist_is_exactly_what_the_relayed_logger_forwards():
    """A logging method added to RelayedLogger without the relay's allowlist would be refused on a cluster."""
    import inspect
    import re

    from jobs.tracking_relay import RELAYED_METHODS, RelayedLogger

    forwarded = set(re.findall(r'self\._call\(\s*"(\w+)"', inspect.getsource(RelayedLogger)))
    assert forwarded == set(RELAYED_METHODS)


def test_shard_bytes_estimate_never_stats_outside_the_root(tmp_path):
    from pipeline.prepare import image_file_size

    root, outside = tmp_path / "root", tmp_path / "outside.jpg"
    (root / "images").mkdir(parents=True)
    (root / "images" / "inside.jpg").write_bytes(b"x" * 5)
    outside.write_bytes(b"y" * 100)
    (root / "images" / "link.jpg").symlink_to(outside)
    assert image_file_size(str(root), "images/inside.jpg") == 5
    assert image_file_size(str(root), "images/link.jpg") == 0
    assert image_file_size(str(root), "images/../../outside.jpg") == 0
    assert image_file_size(str(root), "images/missing.jpg") == 0
