"""Tiny RefCOCO / RefCOCO+ / RefCOCOg / gRefCOCO folders in the refer toolkit's exact layout, with planted
bad records, and what a correct reader must make of them.

``make_refer_fixture(base)`` writes::

    base/images/mscoco/images/train2014/COCO_train2014_%012d.jpg    tiny real JPEGs
    base/images/mscoco/images/secret.jpg                             a canary outside the image root
    base/refcoco/refs(unc).p, refs(google).p, instances.json
    base/refcoco+/refs(unc).p, instances.json
    base/refcocog/refs(umd).p, refs(google).p, instances.json
    base/grefcoco/grefs(unc).json, instances.json

The pickles are written as Python 2 wrote them (protocol 2, its ``str`` values as 8-bit strings: see
:class:`Py2Str`). ``instances.json`` holds polygons (one and two parts), a crowd RLE with uncompressed
counts (as COCO's crowd annotations have) and one with a compressed string, plus broken annotations. All
planted faults are in refcoco's unc train split (and one unreadable ref that every refcoco unc split
reports); gRefCOCO has a multi-target and a no-target expression.

:func:`write_malicious_pickle` writes a pickle whose unpickling would create a marker file.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
from typing import Any, ClassVar

import numpy as np

from segvlm.masks import encode_rle
from tests.fixtures_phrasecut import _image, _jpeg

IMAGE_DIR = os.path.join("images", "mscoco", "images", "train2014")
# image_id -> (width, height); 5 is named by an unsafe file_name, 6 is not in instances.json
SIZES = {1: (64, 48), 2: (80, 60), 3: (48, 64), 4: (56, 40), 5: (40, 30)}


class Py2Str(bytes):
    """A Python 2 ``str``: pickled as SHORT_BINSTRING/BINSTRING (8-bit text), as Python 2 wrote it."""


class _Py2Pickler(pickle._Pickler):  # the pure-Python pickler: its dispatch table can be extended
    dispatch: ClassVar[dict[type, Any]] = dict(pickle._Pickler.dispatch)

    def _save_py2str(self, obj: Py2Str) -> None:
        data = bytes(obj)
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[Py2Str] = _save_py2str


def py2(value: Any) -> Any:
    """``value`` with every ``str`` (dict keys included) made a Python 2 ``str`` of its UTF-8 bytes."""
    if isinstance(value, str):
        return Py2Str(value.encode("utf-8"))
    if isinstance(value, dict):
        return {py2(k): py2(v) for k, v in value.items()}
    if isinstance(value, list):
        return [py2(v) for v in value]
    return value


def write_py2_pickle(path: str, value: Any) -> None:
    with open(path, "wb") as f:
        _Py2Pickler(f, protocol=2).dump(value)


class _Touch:
    """Unpickling this runs ``os.system("touch MARKER")``."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


class _Exec:
    """Unpickling this runs ``exec`` of code that creates MARKER."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def write_malicious_pickle(path: str, marker: str, how: str = "system") -> None:
    """A refs-like pickle (protocol 2) whose unpickling creates ``marker`` (via os.system or exec)."""
    trap = _Touch(marker) if how == "system" else _Exec(marker)
    refs = [{"ref_id": 1, "split": "train", "sentences": [{"sent_id": 1, "sent": "x"}], "payload": trap}]
    with open(path, "wb") as f:
        pickle.dump(refs, f, protocol=2)


def _blob(width: int, height: int, cx: float, cy: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width]
    return (((xx - cx) ** 2 + (yy - cy) ** 2) <= r * r).astype(np.uint8)


def _uncompressed(mask: np.ndarray) -> dict[str, Any]:
    """COCO's uncompressed RLE (column-major runs, starting with zeros), as crowd annotations store it."""
    flat = mask.reshape(-1, order="F")
    runs, value, count = [], 0, 0
    for pixel in flat:
        if pixel != value:
            runs.append(count)
            value, count = pixel, 0
        count += 1
    runs.append(count)
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": [int(r) for r in runs]}


def _ann(ann_id: int, image_id: int, segmentation: Any, crowd: int = 0) -> dict[str, Any]:
    return {
        "id": ann_id,
        "image_id": image_id,
        "segmentation": segmentation,
        "bbox": [0.0, 0.0, 1.0, 1.0],
        "iscrowd": crowd,
        "area": 1.0,
        "category_id": 1,
    }


def _instances() -> dict[str, Any]:
    images = [
        {"id": i, "file_name": f"COCO_train2014_{i:012d}.jpg", "width": w, "height": h, "license": 1}
        for i, (w, h) in SIZES.items()
    ]
    images[-1]["file_name"] = "../secret.jpg"  # image 5: leaves the image root
    annotations = [
        _ann(101, 1, [[5.5, 4.2, 30.1, 6.0, 25.7, 30.3, 8.0, 26.9]]),
        _ann(102, 1, [[34, 5, 60, 5, 60, 20, 34, 20], [40, 25, 58, 25, 50, 44]]),  # two parts, one object
        _ann(103, 2, _uncompressed(_blob(80, 60, 20, 30, 12)), crowd=1),
        _ann(104, 2, encode_rle(_blob(80, 60, 60, 20, 9) | _blob(80, 60, 55, 45, 6)), crowd=1),
        _ann(105, 3, [[4, 10, 40, 12, 30, 60, 6, 50]]),
        _ann(106, 4, [[2, 2, 20, 2, 20, 18, 2, 18]]),
        _ann(107, 4, [[30, 10, 52, 12, 44, 36]]),
        # broken ones
        _ann(108, 2, {"size": [59, 80], "counts": _uncompressed(_blob(80, 59, 20, 30, 5))["counts"]}, 1),
        _ann(109, 2, {"size": [60, 80], "counts": "7"}, 1),  # runs cover 7 pixels, not 4800
        _ann(110, 1, [[5, 5, 1000, 5, 20, 30]]),  # a point far outside the 64x48 image
        _ann(111, 3, [[1, 1, 9, 1, 9, 9]]),  # image 3's, referred to by a ref of image 1
        _ann(112, 1, "not a segmentation"),
        _ann(113, 5, [[1, 1, 20, 1, 20, 20]]),
    ]
    return {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "thing"}]}


class _Refs:
    """Builds one refs file and the fate of each of its sentences, per split."""

    def __init__(self, refs_file: str) -> None:
        self.refs_file = refs_file
        self.refs: list[Any] = []
        self.good: dict[str, dict[str, tuple[int, list[int], str]]] = {}  # split -> id -> (image, anns, sent)
        self.bad: dict[str, list[tuple[str, str, str]]] = {}  # split -> [(record, reason, source_file)]
        self._ref_id = 0

    def ref(self, split: str, image_id: Any, ann_id: Any, sentences: list[Any], **extra: Any) -> dict:
        self._ref_id += 1
        ref = {
            "ref_id": self._ref_id,
            "ann_id": ann_id,
            "image_id": image_id,
            "split": split,
            "sentences": sentences,
            "sent_ids": [s.get("sent_id") for s in sentences if isinstance(s, dict)],
            "category_id": 1,
            "file_name": f"COCO_train2014_{image_id}_{self._ref_id}.jpg",  # the toolkit's, unused
            **extra,
        }
        self.refs.append(ref)
        self.good.setdefault(split, {})
        self.bad.setdefault(split, [])
        return ref

    def ok(
        self, split: str, image_id: int, ann_ids: list[int], *sents: tuple[int, str], **extra: Any
    ) -> None:
        ann = ann_ids if extra.pop("as_list", False) else ann_ids[0] if ann_ids else [-1]
        self.ref(split, image_id, ann, [_sent(i, s) for i, s in sents], **extra)
        for sent_id, text in sents:
            self.good[split][str(sent_id)] = (image_id, ann_ids, text)

    def fail(
        self, split: str, image_id: Any, ann_id: Any, sent_id: int, reason: str, source_file: str
    ) -> None:
        self.ref(split, image_id, ann_id, [_sent(sent_id, f"sentence {sent_id}")])
        self.bad[split].append((str(sent_id), reason, source_file))


def _sent(sent_id: int, text: Any) -> dict[str, Any]:
    raw = text if isinstance(text, str) else "?"
    return {"sent_id": sent_id, "sent": text, "raw": raw, "tokens": raw.split()}


def _set_sentence(refs: list[Any], sent_id: int, text: Any) -> None:
    """Replace the text of sentence ``sent_id`` in Python 2 refs (whose keys are 8-bit strings)."""
    for ref in refs:
        for sentence in ref[b"sentences"] if isinstance(ref, dict) else []:
            if sentence.get(b"sent_id") == sent_id:
                sentence[b"sent"] = text
                return
    raise KeyError(sent_id)


def make_refer_fixture(base: str | os.PathLike[str]) -> dict[str, Any]:
    """Write the fixture under ``base``; return what a correct reader yields.

    Returned: ``base``, ``image_root``, ``canary`` (a file the reader must never open), ``roots``
    ({dataset: folder}), ``instances`` (the COCO dict), and ``expect``: {(dataset, split_by): {"good":
    {split: {task_id: (image_id, ann_ids, phrase)}}, "bad": {split: sorted [(record, reason, source_file)]},
    "refs_file": name}}.
    """
    base = os.fspath(base)
    image_root = os.path.join(base, IMAGE_DIR)
    os.makedirs(image_root, exist_ok=True)
    for image_id, (w, h) in SIZES.items():
        with open(os.path.join(image_root, f"COCO_train2014_{image_id:012d}.jpg"), "wb") as f:
            f.write(_jpeg(_image(w, h, image_id)))
    canary = os.path.join(os.path.dirname(image_root), "secret.jpg")
    with open(canary, "wb") as f:
        f.write(_jpeg(_image(*SIZES[5], 99)))
    instances = _instances()
    expect: dict[tuple[str, str], dict[str, Any]] = {}

    # refcoco, unc: every planted fault is in train
    unc = _Refs("refs(unc).p")
    unc.ok("train", 1, [101], (1001, "left shape"), (1002, "blob on the left"))
    unc.ok("train", 1, [102], (1003, "two parts"))
    unc.ok("train", 2, [103], (1004, "crowd of things"))
    unc.ok("train", 2, [104], (1005, "compressed blob"), (1006, "caf\u00e9 bleu"))
    unc.ok("train", 3, [105], (1007, "tall thing"))
    dup = unc.ref("train", 1, 101, [_sent(1001, "the same id again")])
    unc.bad["train"].append(("1001", "duplicate_task_id", "refs(unc).p"))
    assert dup["sentences"][0]["sent_id"] == 1001
    unc.fail("train", 2, 108, 1008, "bad_rle", "instances.json")  # RLE of another size
    unc.fail("train", 2, 109, 1009, "bad_rle", "instances.json")  # counts that do not cover the image
    unc.fail("train", 1, 110, 1010, "bad_polygons", "instances.json")
    unc.fail("train", 1, 111, 1011, "missing_metadata", "refs(unc).p")  # annotation of another image
    unc.fail("train", 1, 999, 1012, "missing_metadata", "refs(unc).p")  # no such annotation
    unc.fail("train", 6, 101, 1013, "missing_metadata", "refs(unc).p")  # no such image
    unc.fail("train", 1, 112, 1014, "bad_schema", "instances.json")  # segmentation is a string
    unc.fail("train", 1, "101", 1015, "bad_schema", "refs(unc).p")  # ann_id is a string
    unc.fail("train", 1, [-1], 1019, "bad_schema", "refs(unc).p")  # no-target: only gRefCOCO has them
    unc.fail("train", 5, 113, 1018, "unsafe_path", "../secret.jpg")
    # a Python 2 str that is not UTF-8, a blank sentence, a sentence without an id
    unc.ref("train", 1, 101, [_sent(1016, "latin-1 bytes"), _sent(1017, "   "), {"sent": "no id"}])
    unc.bad["train"] += [
        ("1016", "bad_text", "refs(unc).p"),
        ("1017", "empty_phrase", "refs(unc).p"),
        (f"#{len(unc.refs) - 1}.2", "bad_schema", "refs(unc).p"),
    ]
    unc.ok("val", 3, [105], (2001, "tall thing in val"), (2002, "the tall one"))
    unc.ok("testA", 1, [101], (3001, "person left"))
    unc.ok("testB", 2, [104], (4001, "thing on the right"))
    # a ref too broken to have a split: every split of the file reports it
    garbage_index = len(unc.refs)
    unc.refs.append("not a ref")
    for split in unc.bad:
        unc.bad[split].append((f"#{garbage_index}", "bad_schema", "refs(unc).p"))

    google = _Refs("refs(google).p")
    google.ok("train", 1, [101], (5001, "google left shape"))
    google.ok("train", 2, [103], (5002, "google crowd"))
    google.ok("val", 3, [105], (5003, "google tall"))

    plus = _Refs("refs(unc).p")
    plus.ok("train", 1, [102], (6001, "two boxes no location words"))
    plus.ok("val", 2, [104], (6002, "round things"))
    plus.ok("testA", 3, [105], (6003, "tall"))
    plus.ok("testB", 1, [101], (6004, "quad"))

    umd = _Refs("refs(umd).p")
    umd.ok("train", 1, [101], (7001, "a four sided shape on the left of the image"))
    umd.ok("train", 4, [106], (7002, "the square in the corner"))
    umd.ok("val", 2, [104], (7003, "two round blobs"))
    umd.ok("test", 3, [105], (7004, "a tall quadrilateral"))
    g_google = _Refs("refs(google).p")
    g_google.ok("train", 4, [107], (8001, "the triangle"))
    g_google.ok("val", 1, [102], (8002, "the two part object"))

    gref = _Refs("grefs(unc).json")
    gref.ok("train", 4, [106, 107], (9001, "both shapes"), as_list=True, no_target=False)
    gref.ok("train", 4, [], (9002, "the blue elephant"), no_target=True)  # no target: ann_id [-1]
    gref.ok("train", 3, [105], (9003, "tall one"), as_list=True, no_target=False)
    gref.ok("train", 2, [104], (9004, "a plain int ann_id"), no_target=False)
    gref.ref("train", 4, [106], [_sent(9005, "says no target but lists one")], no_target=True)
    gref.bad["train"].append(("9005", "bad_schema", "grefs(unc).json"))
    gref.ok("val", 1, [101, 102], (9101, "everything"), as_list=True, no_target=False)
    gref.ok("testA", 1, [], (9201, "nothing here"), no_target=True)
    gref.ok("testB", 2, [103], (9301, "crowd"), as_list=True, no_target=False)

    layouts = [
        ("refcoco", "unc", unc, True),
        ("refcoco", "google", google, True),
        ("refcoco+", "unc", plus, True),
        ("refcocog", "umd", umd, True),
        ("refcocog", "google", g_google, True),
        ("grefcoco", "unc", gref, False),
    ]
    roots: dict[str, str] = {}
    for dataset, split_by, refs, pickled in layouts:
        root = roots.setdefault(dataset, os.path.join(base, dataset))
        os.makedirs(root, exist_ok=True)
        with open(os.path.join(root, "instances.json"), "w", encoding="utf-8") as f:
            json.dump(instances, f)
        path = os.path.join(root, refs.refs_file)
        if pickled:
            # as Python 2 wrote it: 8-bit strings (keys included), except one unicode sentence
            data = py2(refs.refs)
            if refs is unc:
                _set_sentence(data, 1006, "caf\u00e9 bleu")  # a unicode object, as Python 2 also wrote
                _set_sentence(data, 1016, Py2Str(b"caf\xe9"))  # latin-1 bytes, not UTF-8
            write_py2_pickle(path, data)
        else:
            with open(path, "w", encoding="utf-8") as f:
                json.dump(refs.refs, f)
        expect[(dataset, split_by)] = {
            "good": refs.good,
            "bad": {split: sorted(rows) for split, rows in refs.bad.items()},
            "refs_file": refs.refs_file,
        }
    return {
        "base": base,
        "image_root": image_root,
        "canary": canary,
        "roots": roots,
        "instances": instances,
        "expect": expect,
    }
