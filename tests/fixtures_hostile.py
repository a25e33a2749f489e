"""A PhraseCut-layout folder of hostile and broken records, beside a few good ones, and what must happen.

``make_hostile_fixture(base)`` writes ``base/dataset`` (the root handed to the reader) and, outside it,
``base/elsewhere`` with canary files the reader must never open: a traversal image id and a symlink in
``images/`` both point there. Every record's fate is returned: the good task ids per split, and for every
hostile task ``(record, reason)``.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from typing import Any

from tests.fixtures_phrasecut import _image, _jpeg, _rect, _task

CANARY = b"CANARY-must-never-be-read"


def png_bomb(width: int, height: int) -> bytes:
    """A valid 8-bit grayscale PNG of ``width × height`` zeros: ~100 KB on disk for 100 MP decoded.

    The rows are streamed through zlib, so making it never holds the decoded image either.
    """

    def chunk(tag: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(tag + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)

    compressor = zlib.compressobj(9)
    row = b"\x00" * (width + 1)  # filter byte 0 + one byte per pixel
    idat = b"".join([compressor.compress(row) for _ in range(height)] + [compressor.flush()])
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _meta(image_id: Any, width: Any, height: Any, split: str) -> dict[str, Any]:
    return {"image_id": image_id, "width": width, "height": height, "split": split, "url": ""}


def make_hostile_fixture(base: str | os.PathLike[str]) -> dict[str, Any]:
    """Write the fixture; return ``root``, ``canaries``, ``good_task_ids`` ({split: [ids]}),
    ``expected_quarantine`` ({split: sorted [(record, reason)]}) and ``words`` (of the good phrases)."""
    base = os.fspath(base)
    root = os.path.join(base, "dataset")
    elsewhere = os.path.join(base, "elsewhere")
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    os.makedirs(elsewhere, exist_ok=True)
    # canaries: a valid JPEG of the size the metadata claims (so only the path rules can stop it) + a text
    canary_jpg = _jpeg(_image(64, 48, 99), comment=CANARY)
    canaries = [os.path.join(elsewhere, "secret.jpg"), os.path.join(elsewhere, "canary.jpg")]
    for path in canaries:
        with open(path, "wb") as f:
            f.write(canary_jpg)

    metadata: list[dict[str, Any]] = []
    tasks: dict[str, list[Any]] = {"train": [], "val": []}
    good: dict[str, list[str]] = {"train": [], "val": []}
    expected: dict[str, list[tuple[str, str]]] = {"train": [], "val": []}

    def image(image_id: Any, split: str, w: int = 64, h: int = 48, data: bytes | None = None) -> None:
        metadata.append(_meta(image_id, w, h, split))
        with open(os.path.join(root, "images", f"{image_id}.jpg"), "wb") as f:
            f.write(data if data is not None else _jpeg(_image(w, h, int(str(image_id)[-2:]))))

    def ok(task: dict[str, Any], split: str = "train") -> None:
        tasks[split].append(task)
        good[split].append(task["task_id"])

    def bad(task: Any, reason: str, split: str = "train", record: str | None = None) -> None:
        # a task without a usable task_id is named by its position in the file, as the listing does
        if record == "#":
            record = f"#{len(tasks[split])}"
        expected[split].append((record or task["task_id"], reason))
        tasks[split].append(task)

    phrases = ["red box", "green square", "left block", "small patch", "blue thing", "dark box"]
    # good images: several tasks each, in both splits
    for n, image_id in enumerate((501, 502, 503, 504, 505, 506)):
        image(image_id, "train")
        ok(_task(image_id, [1], [[_rect(4, 5, 30, 28)]], phrases[n % 6]))
        ok(_task(image_id, [2], [[_rect(33, 10, 60, 40)]], phrases[(n + 1) % 6]))
    for image_id in (601, 602, 603):
        image(image_id, "val")
        ok(_task(image_id, [1], [[_rect(3, 3, 30, 30)]], "red box"), "val")
        ok(_task(image_id, [2], [[_rect(35, 5, 62, 44)]], "green square"), "val")
    # a symlink that stays inside the root is just another name for a good image
    metadata.append(_meta(507, 64, 48, "train"))
    os.symlink("501.jpg", os.path.join(root, "images", "507.jpg"))
    ok(_task(507, [1], [[_rect(4, 5, 30, 28)]], "red box"))

    # --- metadata rows: missing width, width as a word, zero or negative sizes, a size over the limit
    image(401, "train")
    metadata[-1].pop("width")
    bad(_task(401, [1], [[_rect(1, 1, 9, 9)]], "no width"), "bad_metadata")
    image(402, "train")
    metadata[-1]["width"] = "eighty"
    bad(_task(402, [1], [[_rect(1, 1, 9, 9)]], "word width"), "bad_metadata")
    bad(_task(402, [2], [[_rect(1, 1, 9, 9)]], "word width two"), "bad_metadata")
    image(403, "train")
    metadata[-1]["height"] = -48
    bad(_task(403, [1], [[_rect(1, 1, 9, 9)]], "negative height"), "bad_metadata")
    metadata.append(_meta(404, 60_000, 60_000, "train"))  # the metadata alone says too large
    bad(_task(404, [1], [[_rect(1, 1, 9, 9)]], "huge by metadata"), "image_too_large")

    # --- decompression bombs: a 100 MP PNG (Pillow would only warn and decode it: 100 MB) whose metadata
    # tells the truth, one whose metadata lies (caught from the header), one past Pillow's own refusal
    bomb = png_bomb(10_000, 10_000)
    image(410, "train", 10_000, 10_000, bomb)
    bad(_task(410, [1], [[_rect(1, 1, 9, 9)]], "bomb honest"), "image_too_large")
    image(411, "train", 64, 48, bomb)
    bad(_task(411, [1], [[_rect(1, 1, 9, 9)]], "bomb liar"), "image_too_large")
    image(412, "train", 64, 48, png_bomb(20_000, 10_000))
    bad(_task(412, [1], [[_rect(1, 1, 9, 9)]], "bomb huge"), "image_too_large")

    # --- ids: traversal and absolute image ids (their metadata rows exist, so only the id rule stops them)
    for image_id in ("../../elsewhere/secret", "/abs/path", "a.b", "-1"):
        metadata.append(_meta(image_id, 64, 48, "train"))
        bad(_task(image_id, [1], [[_rect(1, 1, 9, 9)]], "sneaky"), "bad_id")
    # a symlink in images/ that leads out of the root
    metadata.append(_meta(420, 64, 48, "train"))
    os.symlink(canaries[1], os.path.join(root, "images", "420.jpg"))
    bad(_task(420, [1], [[_rect(1, 1, 9, 9)]], "linked out"), "unsafe_path")
    # task ids that would name files outside an output folder, on a good image
    for n, task_id in enumerate(("a/b", "../../x", "/abs/path", "has space", "..", "x" * 201)):
        bad(_task(501, [10 + n], [[_rect(1, 1, 9, 9)]], "bad task id", task_id=task_id), "bad_id")
    # an empty task id or an image id of the wrong type are schema errors
    empty = _task(501, [20], [[_rect(1, 1, 9, 9)]], "empty id")
    empty["task_id"] = ""
    bad(empty, "bad_schema", record="#")
    bad(
        _task(501, [21], [[_rect(1, 1, 9, 9)]], "list id", task_id="501__21") | {"image_id": [501]},
        "bad_schema",
    )
    bad(["not", "a", "task"], "bad_schema", record="#")

    # --- text: a lone surrogate (valid JSON, invalid Unicode), control characters, an overlong phrase
    bad(_task(502, [10], [[_rect(1, 1, 9, 9)]], "red \ud800 box"), "bad_text")
    bad(_task(502, [11], [[_rect(1, 1, 9, 9)]], "red\x00box"), "bad_text")
    bad(_task(502, [12], [[_rect(1, 1, 9, 9)]], "red\x1b[31mbox"), "bad_text")
    bad(_task(502, [13], [[_rect(1, 1, 9, 9)]], "line\u2028break"), "bad_text")
    bad(_task(502, [14], [[_rect(1, 1, 9, 9)]], "very " * 120 + "long"), "bad_text")
    structure = _task(502, [15], [[_rect(1, 1, 9, 9)]], "box")
    structure["phrase_structure"]["name"] = "bo\udfffx"
    bad(structure, "bad_text")
    bad(_task(502, [16], [[_rect(1, 1, 9, 9)]], "   "), "empty_phrase")

    # --- polygons: non-finite and too-large-for-a-float numbers, absurd and merely-outside coordinates
    bad(_task(503, [10], [[[[1.0, 1.0], [float("nan"), 5.0], [9.0, 9.0]]]], "nan point"), "bad_schema")
    bad(_task(503, [11], [[[[1.0, 1.0], [float("inf"), 5.0], [9.0, 9.0]]]], "inf point"), "bad_schema")
    bad(_task(503, [12], [[[[1, 1], [10**400, 5], [9, 9]]]], "huge int point"), "bad_schema")
    bad(_task(503, [13], [[[[1.0, 1.0], [1e12, 5.0], [9.0, 9.0]]]], "far point"), "bad_polygons")
    bad(_task(503, [14], [[[[1.0, 1.0], [5.0, -1e9], [9.0, 9.0]]]], "far point"), "bad_polygons")
    clipped = _task(503, [15], [[[[-5.0, 1.0], [70.0, 5.0], [30.0, 50.0]]]], "clipped box")
    ok(clipped)  # slightly outside: clipped and kept, as in real PhraseCut
    stringy = _task(503, [16], [[_rect(1, 1, 9, 9)]], "string point")
    stringy["Polygons"][0][0][1] = "xy"
    bad(stringy, "bad_schema")

    # --- a duplicate in val, a hostile id in val too
    bad(_task(601, [1], [[_rect(3, 3, 30, 30)]], "copy", task_id="601__1"), "duplicate_task_id", "val")
    bad(_task(602, [9], [[_rect(3, 3, 30, 30)]], "val bad", task_id="../v"), "bad_id", "val")

    with open(os.path.join(root, "image_data_split.json"), "w", encoding="utf-8") as f:
        json.dump(metadata, f)
    for split, items in tasks.items():
        with open(os.path.join(root, f"refer_{split}.json"), "w", encoding="utf-8") as f:
            json.dump(items, f)  # ensure_ascii: the lone surrogates are written as \\ud800 escapes
    words = sorted({w for phrase in [*phrases, "clipped box"] for w in phrase.split()})
    return {
        "root": root,
        "base": base,
        "canaries": canaries,
        "good_task_ids": {split: sorted(ids) for split, ids in good.items()},
        "expected_quarantine": {split: sorted(rows) for split, rows in expected.items()},
        "inputs": {split: len(items) for split, items in tasks.items()},
        "words": words,
    }
