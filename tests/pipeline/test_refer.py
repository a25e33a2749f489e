"""The refer-layout readers (RefCOCO, RefCOCO+, RefCOCOg, gRefCOCO) and the plain-data unpickler, no Ray:
task counts per split and split-by, masks equal to pycocotools' own decoding, every planted fault
quarantined, malicious pickles refused without running, shards written by build_shard read back."""

from __future__ import annotations

import dataclasses
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest
from pycocotools import mask as coco_mask

from jobs import prepare as prepare_cli
from pipeline import manifest as mf
from pipeline import shards
from pipeline.listing import Listing
from pipeline.phrasecut import load_image_record
from pipeline.prepare import PrepareConfig, ShardJob, build_shard, open_listing, plan_listing
from pipeline.refer import (
    DATASETS,
    default_image_root,
    iter_split_items,
    list_refer_images,
    load_instances,
    refer_listing,
)
from pipeline.safe_pickle import UnsafePickleError, load_plain_pickle
from pipeline.validate import coco_polygon_error
from segvlm.masks import decode_rles, encode_rle, rasterize_polygons
from tests.fixtures_refer import write_malicious_pickle, write_py2_pickle

ROOT = Path(__file__).resolve().parents[2]
CASES = [
    ("refcoco", "unc"),
    ("refcoco", "google"),
    ("refcoco+", "unc"),
    ("refcocog", "umd"),
    ("refcocog", "google"),
    ("grefcoco", "unc"),
]


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    from tests.fixtures_refer import make_refer_fixture

    return make_refer_fixture(tmp_path_factory.mktemp("refer"))


def _load(fx, dataset, split, split_by=None, **kwargs):
    """(records, quarantine rows) of one split, read in this process the way a shard task reads them."""
    records, quarantine = [], []
    for entry in list_refer_images(fx["roots"][dataset], split, dataset, split_by=split_by):
        record, jpg, bad, stats = load_image_record("/unused", entry, source=dataset, **kwargs)
        assert stats["tasks"] == stats["tasks_ok"] + stats["quarantined"]
        quarantine += bad
        if record is not None:
            assert jpg is not None
            records.append(record)
    return records, quarantine


def _coco_mask(instances: dict, ann_ids: list[int], height: int, width: int) -> np.ndarray:
    """The ground truth as the refer/COCO toolkits make it (annToRLE + decode), one union over ann_ids."""
    anns = {a["id"]: a for a in instances["annotations"]}
    out = np.zeros((height, width), dtype=np.uint8)
    for ann_id in ann_ids:
        seg = anns[ann_id]["segmentation"]
        if isinstance(seg, list):
            rle = coco_mask.merge(coco_mask.frPyObjects(seg, height, width))
        elif isinstance(seg["counts"], list):
            rle = coco_mask.frPyObjects(seg, height, width)
        else:
            rle = {"size": seg["size"], "counts": seg["counts"].encode()}
        out |= coco_mask.decode(rle)
    return out


@pytest.mark.parametrize(("dataset", "split_by"), CASES)
def test_each_split_yields_one_task_per_good_sentence_and_quarantines_the_rest(fx, dataset, split_by):
    expect = fx["expect"][(dataset, split_by)]
    assert set(expect["good"]) == set(expect["bad"])  # every split of the file is checked
    for split, good in expect["good"].items():
        records, quarantine = _load(fx, dataset, split, split_by)
        tasks = {t.task_id: (r, t) for r in records for t in r.tasks}
        assert sorted(tasks) == sorted(good), (dataset, split_by, split)
        got = sorted((q.record, q.reason, q.source_file) for q in quarantine)
        assert got == expect["bad"][split], (dataset, split_by, split)
        for task_id, (image_id, ann_ids, phrase) in good.items():
            record, task = tasks[task_id]
            assert (record.source, record.image_id, record.split) == (dataset, image_id, split)
            assert record.key == f"{dataset}_{image_id}".replace("+", "-")
            assert task.phrase == phrase and task.kind == "original"
            assert task.num_instances == len(ann_ids) and task.polygons == []


@pytest.mark.parametrize(("dataset", "split_by"), CASES)
def test_masks_equal_pycocotools_decoding_of_the_annotations(fx, dataset, split_by):
    expect = fx["expect"][(dataset, split_by)]
    checked = 0
    for split, good in expect["good"].items():
        records, _ = _load(fx, dataset, split, split_by)
        for record in records:
            h, w = record.orig_height, record.orig_width
            for task in record.tasks:
                _, ann_ids, _ = good[task.task_id]
                want = _coco_mask(fx["instances"], ann_ids, h, w)
                got = rasterize_polygons(task.polygons, w, h) | decode_rles(task.rles, h, w)
                assert np.array_equal(got, want), task.task_id
                assert want.any() == bool(ann_ids)  # only a no-target expression is empty
                # one box per instance, the mask's own (pycocotools.toBbox)
                for rle, box in zip(task.rles, task.boxes, strict=True):
                    bbox = coco_mask.toBbox({"size": rle["size"], "counts": rle["counts"].encode()})
                    assert box == [float(v) for v in bbox]
                checked += 1
    assert checked == sum(len(g) for g in expect["good"].values())


def test_polygon_crowd_and_compressed_annotations_all_become_rles(fx):
    records, _ = _load(fx, "refcoco", "train")
    tasks = {t.task_id: t for r in records for t in r.tasks}
    anns = {a["id"]: a for a in fx["instances"]["annotations"]}
    assert isinstance(anns[103]["segmentation"]["counts"], list)  # crowd: uncompressed counts
    assert isinstance(anns[104]["segmentation"]["counts"], str)  # compressed
    assert len(anns[102]["segmentation"]) == 2  # one object in two polygons
    sizes = {t.task_id: [r.orig_height, r.orig_width] for r in records for t in r.tasks}
    for task_id in ("1001", "1003", "1004", "1005"):
        (rle,) = tasks[task_id].rles
        assert rle["size"] == sizes[task_id]
        assert isinstance(rle["counts"], str) and rle["counts"].isascii()
    # the compressed string passes through as it is
    assert tasks["1005"].rles[0]["counts"] == anns[104]["segmentation"]["counts"]
    # a Python 2 str (1002) and a unicode object (1006) both come out as text
    assert tasks["1006"].phrase == "caf\u00e9 bleu" and tasks["1002"].phrase == "blob on the left"


def test_grefcoco_multi_target_and_no_target_expressions(fx):
    records, _ = _load(fx, "grefcoco", "train")
    tasks = {t.task_id: (r, t) for r in records for t in r.tasks}
    record, both = tasks["9001"]
    assert both.num_instances == 2 and len(both.boxes) == 2 and both.has_target
    _, nothing = tasks["9002"]
    assert nothing.kind == "original" and not nothing.has_target
    assert (nothing.polygons, nothing.rles, nothing.boxes) == ([], [], [])
    rows = {row["task_id"]: row for row in mf.manifest_rows(record, "train-000000")}
    assert rows["9002"]["mask_area"] == 0.0 and rows["9002"]["size"] == rows["9002"]["instances"] == "none"
    assert rows["9001"]["instances"] == "multiple" and rows["9001"]["num_instances"] == 2
    want = _coco_mask(fx["instances"], [106, 107], record.orig_height, record.orig_width)
    assert rows["9001"]["mask_area"] == pytest.approx(want.mean())
    # the same no-target task under a source that has no such expressions is quarantined, not kept
    entry = next(
        e for e in list_refer_images(fx["roots"]["grefcoco"], "train", "grefcoco") if e.image_id == 4
    )
    _, _, bad, _ = load_image_record("/unused", dataclasses.replace(entry, issues=[]), source="refcoco")
    assert [(q.record, q.reason) for q in bad] == [("9002", "no_usable_polygons")]
    assert "only grefcoco allows" in bad[0].detail


def test_max_side_scales_the_image_and_boxes_but_keeps_rles_at_the_original_size(fx):
    (full,), _ = _load(fx, "refcocog", "val", "umd")
    (small,), _ = _load(fx, "refcocog", "val", "umd", max_side=40)
    assert (full.width, full.height) == (80, 60) and (small.width, small.height) == (40, 30)
    assert (small.orig_width, small.orig_height) == (80, 60)
    (a,), (b,) = full.tasks, small.tasks
    assert b.rles == a.rles and b.rles[0]["size"] == [60, 80]
    assert b.boxes == [[v / 2 for v in box] for box in a.boxes]
    rows = mf.manifest_rows(small, "val-000000")
    assert rows[0]["mask_area"] == mf.manifest_rows(full, "val-000000")[0]["mask_area"] > 0


def test_rles_are_checked_against_the_image_before_they_are_used(fx):
    entry = next(e for e in list_refer_images(fx["roots"]["refcoco"], "testB", "refcoco") if e.image_id == 2)
    good = entry.tasks[0]
    hostile = {
        "a": {"size": [48, 64], "counts": good["rles"][0]["counts"]},  # another image's size
        "b": {"size": [60, 80], "counts": "7"},  # runs cover 7 pixels (pycocotools would corrupt its heap)
        "c": {"size": [60, 80], "counts": good["rles"][0]["counts"] + "1"},  # one run too many
        "d": {"size": [60, 80], "counts": "\x00abc"},
    }
    entry = dataclasses.replace(
        entry, tasks=[{**good, "task_id": k, "rles": [rle]} for k, rle in hostile.items()], issues=[]
    )
    record, _, bad, _ = load_image_record("/unused", entry, source="refcoco")
    assert record is None and sorted((q.record, q.reason) for q in bad) == [(k, "bad_rle") for k in "abcd"]
    assert all("refs(unc).p" in q.detail and "rles[0]" in q.detail for q in bad)
    # an empty mask is no target for a source that needs one
    empty = {"size": [60, 80], "counts": encode_rle(np.zeros((60, 80), np.uint8))["counts"]}
    entry = dataclasses.replace(entry, tasks=[{**good, "task_id": "e", "rles": [empty]}])
    _, _, bad, _ = load_image_record("/unused", entry, source="grefcoco")
    assert [(q.record, q.reason) for q in bad] == [("e", "no_usable_polygons")]


def test_task_ids_are_sentence_ids_and_survive_a_build_shard_round_trip(fx, tmp_path):
    for dataset, split in (("refcoco", "train"), ("grefcoco", "train"), ("refcoco+", "val")):
        out = tmp_path / dataset.replace("+", "plus")
        config = PrepareConfig(dataset, fx["roots"][dataset], split, str(out), shard_samples=2)
        assert config.image_root == os.path.abspath(fx["image_root"])  # the toolkit's default folder
        with open_listing(config) as listing:
            plans = plan_listing(listing, config)
            job = ShardJob(
                root=config.root,
                source=dataset,
                max_side=None,
                fingerprint=config.fingerprint(),
                filesystem=pafs.LocalFileSystem(),
                base=str(out),
                split=split,
                source_file=listing.source_file,
                meta_file=listing.meta_file,
                image_root=listing.image_root,
            )
            sidecars = [
                build_shard(dataclasses.replace(p, entries=listing.packed(p.images)), job) for p in plans
            ]
        want, _ = _load(fx, dataset, split)
        back = {r.key: r for r, _ in shards.iter_shard_set(str(out), split)}
        assert {r.key: r.to_json() for r in want} == {k: r.to_json() for k, r in back.items()}
        originals = sorted(row["task_id"] for s in sidecars for row in s["manifest"])
        assert originals == sorted(fx["expect"][(dataset, config.split_by)]["good"][split])
        rows = sorted((q["record"], q["reason"], q["source_file"]) for s in sidecars for q in s["quarantine"])
        assert rows == fx["expect"][(dataset, config.split_by)]["bad"][split]


_opened: list[str] | None = None  # paths opened while a test records them (audit hooks are forever)


def _audit(event: str, args: tuple) -> None:
    if _opened is not None and event == "open" and args and isinstance(args[0], str | bytes | os.PathLike):
        _opened.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)


def test_the_image_path_never_leaves_the_image_root(fx):
    global _opened
    _opened = []
    try:
        _, quarantine = _load(fx, "refcoco", "train")
        opened = [os.path.realpath(p) for p in _opened]
    finally:
        _opened = None
    assert ("1018", "unsafe_path") in [(q.record, q.reason) for q in quarantine]
    assert os.path.realpath(os.path.join(fx["image_root"], "COCO_train2014_000000000001.jpg")) in opened
    assert os.path.realpath(fx["canary"]) not in opened


# ------------------------------------------------------------------------------------ errors, options


def test_unknown_split_and_split_by_are_clear_errors(fx):
    with pytest.raises(
        ValueError, match=r"no ref of split 'testC'; the splits present are testA, testB, train, val"
    ):
        refer_listing(fx["roots"]["refcoco"], "testC", "refcoco")
    with pytest.raises(ValueError, match=r"the splits present are test, train, val"):
        refer_listing(fx["roots"]["refcocog"], "testA", "refcocog")  # umd has no testA
    with pytest.raises(ValueError, match=r"refcoco\+ is split by unc only"):
        refer_listing(fx["roots"]["refcoco+"], "train", "refcoco+", split_by="google")
    with pytest.raises(ValueError, match=r"refcocog is split by umd, google only"):
        PrepareConfig("refcocog", fx["roots"]["refcocog"], "val", "out", split_by="unc")
    with pytest.raises(ValueError, match=r"--split-by and --image-root are for"):
        PrepareConfig("phrasecut", "root", "train", "out", split_by="unc")
    with pytest.raises(FileNotFoundError, match=r"refs\(google\).p does not exist"):
        refer_listing(fx["roots"]["refcoco+"], "train", "refcoco", split_by="google")
    with pytest.raises(FileNotFoundError, match=r"image folder .*nowhere does not exist"):
        refer_listing(fx["roots"]["refcoco"], "train", "refcoco", image_root=Path(fx["base"]) / "nowhere")
    assert {name: d.split_bys[0] for name, d in DATASETS.items()} == {
        "refcoco": "unc",
        "refcoco+": "unc",
        "refcocog": "umd",
        "grefcoco": "unc",
    }


def test_cli_parses_split_by_and_image_root_and_reports_bad_options(fx, tmp_path, capsys):
    args = prepare_cli.parse_args(
        ["--source", "refcocog", "--root", fx["roots"]["refcocog"], "--split", "val", "--out", str(tmp_path),
         "--split-by", "google", "--image-root", fx["image_root"]]
    )  # fmt: skip
    config = prepare_cli.config_from_args(args)
    assert (config.split_by, config.image_root) == ("google", os.path.abspath(fx["image_root"]))
    default = PrepareConfig("refcocog", fx["roots"]["refcocog"], "val", str(tmp_path))
    assert default.split_by == "umd" and default.image_root == default_image_root(fx["roots"]["refcocog"])
    # the settings that change what is read change the fingerprint; PhraseCut's does not move
    assert len({default.fingerprint(), config.fingerprint()}) == 2
    phrasecut = PrepareConfig("phrasecut", "root", "train", "out")
    assert phrasecut.fingerprint() == PrepareConfig("phrasecut", "elsewhere", "train", "o2").fingerprint()
    argv = [
        "--source",
        "refcoco+",
        "--root",
        "r",
        "--split",
        "train",
        "--out",
        str(tmp_path / "o"),
        "--split-by",
        "umd",
    ]
    assert prepare_cli.main(argv) == 2
    assert "refcoco+ is split by unc only" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the help names every layout
        prepare_cli.parse_args(["--help"])
    out = capsys.readouterr().out
    assert all(
        word in out for word in ("refs({split_by}).p", "grefs(unc).json", "instances.json", "--image-root")
    )
    assert "every node sees" in out


def test_broken_files_are_errors_naming_the_file(fx, tmp_path):
    root = tmp_path / "refcoco"
    root.mkdir()
    (root / "instances.json").write_text('{"images": [], "annotations": [')
    write_py2_pickle(str(root / "refs(unc).p"), [])
    with pytest.raises(ValueError, match=r"instances.json: invalid JSON at line 1"):
        refer_listing(root, "train", "refcoco", image_root=fx["image_root"])
    (root / "instances.json").write_text('{"images": {}}')
    with pytest.raises(ValueError, match=r"instances.json: not a COCO object"):
        load_instances(root / "instances.json")
    (root / "instances.json").write_text('{"images": [], "annotations": []}')
    with pytest.raises(ValueError, match=r"no ref of split 'train'; the splits present are none"):
        refer_listing(root, "train", "refcoco", image_root=fx["image_root"])
    write_py2_pickle(str(root / "refs(unc).p"), {"refs": []})
    with pytest.raises(ValueError, match=r"refs\(unc\).p: the pickle holds a dict, not a list of refs"):
        refer_listing(root, "train", "refcoco", image_root=fx["image_root"])


# ---------------------------------------------------------------------------------------------- pickles


def test_plain_data_pickles_load_as_python_2_wrote_them(fx):
    refs = load_plain_pickle(Path(fx["roots"]["refcoco"]) / "refs(unc).p")
    assert isinstance(refs, list) and isinstance(refs[0], dict)
    assert all(isinstance(k, str) for k in refs[0])  # Python 2 str keys become str
    sentences = {
        s["sent_id"]: s["sent"] for r in refs if isinstance(r, dict) for s in r["sentences"] if "sent_id" in s
    }
    assert sentences[1006] == "caf\u00e9 bleu"
    assert sentences[1016] == "caf\udce9"  # not UTF-8: kept, as a lone surrogate the text check refuses
    raw = (Path(fx["roots"]["refcoco"]) / "refs(unc).p").read_bytes()
    assert raw[:2] == b"\x80\x02" and pickle.SHORT_BINSTRING + b"\x04caf\xe9" in raw


def test_protocol_0_text_pickles_load_too(tmp_path):
    # Python 2's pickle.dump without a protocol writes protocol 0: text opcodes, 8-bit strings as S'...'
    path = tmp_path / "refs(unc).p"
    path.write_bytes(
        b"(lp0\n(dp1\nS'sent'\np2\nS'the man on the left'\np3\nsS'sent_id'\np4\nI42\n"
        b"sS'bad'\np5\nS'caf\\xe9'\np6\nsa."
    )
    assert load_plain_pickle(path) == [{"sent": "the man on the left", "sent_id": 42, "bad": "caf\udce9"}]


@pytest.mark.parametrize("how", ["system", "exec"])
def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path, how):
    path, marker = tmp_path / "refs(unc).p", tmp_path / f"pwned-{how}"
    write_malicious_pickle(str(path), str(marker), how)
    with pytest.raises(UnsafePickleError) as info:
        load_plain_pickle(path)
    message = str(info.value)
    assert str(path) in message and "only plain data" in message
    assert ("posix.system" if how == "system" else "__builtin__.exec") in message
    assert not marker.exists()
    # through the reader too: the whole file is refused before any record
    (tmp_path / "instances.json").write_text('{"images": [], "annotations": []}')
    (tmp_path / "images").mkdir()
    with pytest.raises(UnsafePickleError):
        refer_listing(tmp_path, "train", "refcoco", image_root=tmp_path / "images")
    assert not marker.exists()
    # the trap is live: an ordinary unpickler (in a child process) does run it
    code = f"import pickle; pickle.load(open({str(path)!r}, 'rb'))"
    subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, timeout=60)
    assert marker.exists()


def test_persistent_ids_oversized_truncated_and_trailing_pickles_are_refused(tmp_path):
    persistent = tmp_path / "persistent.p"
    persistent.write_bytes(b"\x80\x02]q\x00(X\x01\x00\x00\x00aq\x01P1\n" + b"e.")
    with pytest.raises(UnsafePickleError, match=r"persistent id"):
        load_plain_pickle(persistent)
    good = tmp_path / "good.p"
    write_py2_pickle(str(good), [{"a": 1}] * 50)
    assert load_plain_pickle(good) == [{"a": 1}] * 50
    with pytest.raises(UnsafePickleError, match=r"larger than the limit of 100 bytes"):
        load_plain_pickle(good, max_bytes=100)
    truncated = tmp_path / "cut.p"
    truncated.write_bytes(good.read_bytes()[:-5])
    with pytest.raises(pickle.UnpicklingError, match=re.escape(str(truncated))):
        load_plain_pickle(truncated)
    twice = tmp_path / "twice.p"
    twice.write_bytes(good.read_bytes() * 2)
    with pytest.raises(pickle.UnpicklingError, match=r"bytes follow the pickle's end"):
        load_plain_pickle(twice)


def test_no_code_outside_safe_pickle_unpickles_data():
    pattern = re.compile(r"\bpickle\.(load|loads|Unpickler)\b|\bcloudpickle\.loads?\b|\bjoblib\.load\b")
    offenders = [
        f"{path.relative_to(ROOT)}:{n}"
        for package in ("pipeline", "segvlm", "jobs")
        for path in sorted((ROOT / package).rglob("*.py"))
        if path.name != "safe_pickle.py"
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if pattern.search(line)
    ]
    assert offenders == []


def test_coco_polygon_checks():
    assert coco_polygon_error([[1, 1, 9, 1, 9, 9]], 10, 10) is None
    assert "not a non-empty list" in coco_polygon_error([], 10, 10)
    assert "polygon 0" in coco_polygon_error([[1, 1, 9, 1]], 10, 10)  # 2 points: pycocotools' box form
    assert "polygon 1" in coco_polygon_error([[1, 1, 9, 1, 9, 9], [1, 2, 3]], 10, 10)
    assert "polygon 0" in coco_polygon_error([[1, 1, 9, 1, 9, float("nan")]], 10, 10)
    assert "far outside" in coco_polygon_error([[1, 1, 31, 1, 9, 9]], 10, 10)
    zigzag = [0, 0] + [20, 20, 0, 0] * 600
    assert "outline" in coco_polygon_error([zigzag], 10, 10)  # 1200 edges of 20 px > 100 x (10 + 10)


def test_deeply_nested_values_are_quarantined_not_a_crash(fx, tmp_path):
    # a pickle builds nesting of any depth without recursion; repr, str and json.dumps of it would recurse
    depth = 100_000
    nested = tmp_path / "nested.p"
    nested.write_bytes(b"\x80\x02" + b"]" * depth + b"a" * (depth - 1) + b".")
    value = load_plain_pickle(nested)
    for _ in range(depth - 1):
        (value,) = value
    assert value == []
    deep: list = []
    for _ in range(depth):
        deep = [deep]
    refs = [
        {
            "ref_id": deep,
            "split": "train",
            "image_id": 1,
            "ann_id": deep,
            "sentences": [{"sent_id": 1, "sent": "a"}],
        },
        {
            "ref_id": 2,
            "split": "train",
            "image_id": 1,
            "ann_id": 101,
            "sentences": [{"sent_id": 2, "sent": deep}],
        },
    ]
    instances = load_instances(Path(fx["roots"]["refcoco"]) / "instances.json")
    items = list(iter_split_items(refs, instances, dataset="refcoco", split="train", refs_file="refs(unc).p"))
    (row, _), (task, label) = items
    assert (row.record, row.reason) == ("1", "bad_schema") and "nested too deeply" in row.detail
    assert task["phrase"] is deep  # the listing's schema check refuses it (phrase is not a string)
    with Listing(tmp_path, "train", source="refcoco", feed=_feed(items)) as listing:
        (entry,) = listing.entries()
    assert entry.tasks == [] and sorted((q.record, q.reason) for q in entry.issues) == [
        ("1", "bad_schema"),
        ("2", "bad_schema"),
    ]
    assert "phrase is not a string" in entry.issues[1].detail and label in entry.issues[1].detail


def _feed(items):
    from pipeline.listing import Feed
    from pipeline.phrasecut_format import schema_error

    return Feed(
        items=items,
        metadata=[],
        source_file="refs(unc).p",
        meta_file="instances.json",
        image_root="/unused",
        schema=lambda task: schema_error(task, with_rles=True),
    )


def test_shard_bytes_plans_by_the_coco_file_sizes(fx):
    config = PrepareConfig("refcoco", fx["roots"]["refcoco"], "train", "unused", shard_bytes=1)
    with open_listing(config) as listing:
        plans = plan_listing(listing, config)
        paths = {image: listing.image_path(image) for plan in plans for image in plan.images if image}
    assert paths["1"] == (os.path.abspath(fx["image_root"]), "COCO_train2014_000000000001.jpg")
    assert paths["5"][1] == "../secret.jpg"  # sized 0 (outside the root: never even stat-ed), as image 6
    # a found file (over 1 byte) closes its shard; the unsafe, the unlisted image and the orphans share one
    assert [p.keys for p in plans] == [
        ("refcoco_1",),
        ("refcoco_2",),
        ("refcoco_3",),
        ("refcoco_5", "refcoco_6", "~orphans"),
    ]
