"""A tiny PhraseCut-format folder with planted bad records, for the reader's and the sharding job's tests.

``make_phrasecut_fixture(root)`` writes ``image_data_split.json``, ``refer_train.json``, ``refer_val.json`` and
``images/``; it returns what a correct reader must produce, so any test can check a pipeline end to end.
"""

from __future__ import annotations

import io
import json
import os
from typing import Any

from PIL import Image, ImageDraw

SPLIT = "train"


def _image(width: int, height: int, seed: int) -> Image.Image:
    """An RGB picture with a few flat rectangles (content, so that resizing and re-encoding mean something)."""
    image = Image.new("RGB", (width, height), (40 + 10 * seed % 60, 60, 90))
    draw = ImageDraw.Draw(image)
    for k in range(3):
        x0, y0 = (7 * (seed + k) * 5) % max(1, width - 20), (11 * (seed + 2 * k) * 3) % max(1, height - 20)
        draw.rectangle([x0, y0, x0 + 18, y0 + 14], fill=((70 * k + 30 * seed) % 256, 200, (90 * k) % 256))
    return image


def _jpeg(image: Image.Image, **kwargs: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=92, **kwargs)
    return buffer.getvalue()


def _box(instance: list[list[list[float]]]) -> list[float]:
    xs = [x for polygon in instance for x, _ in polygon]
    ys = [y for polygon in instance for _, y in polygon]
    return [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]


def _task(
    image_id: int,
    ann_ids: list[int],
    polygons: list[list[list[list[float]]]],
    phrase: str,
    *,
    task_id: str | None = None,
) -> dict[str, Any]:
    """A task with exactly PhraseCut's seven fields."""
    words = phrase.split()
    return {
        "task_id": task_id or f"{image_id}__{'_'.join(str(a) for a in ann_ids)}",
        "image_id": image_id,
        "ann_ids": ann_ids,
        "Polygons": polygons,
        "instance_boxes": [_box(inst) for inst in polygons],
        "phrase": phrase,
        "phrase_structure": {
            "name": words[-1] if words else "",
            "attributes": words[:-1],
            "relation_ids": [],
            "relation_descriptions": [],
            "type": "attribute" if len(words) > 1 else "name",
        },
    }


def _rect(x0: float, y0: float, x1: float, y1: float) -> list[list[float]]:
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]


def make_phrasecut_fixture(
    root: str | os.PathLike[str], *, with_bad: bool = True, metadata_name: str = "image_data_split.json"
) -> dict[str, Any]:
    """Write the fixture under ``root``; return what a correct reader yields.

    Returned keys:

    * ``root``, ``split`` ("train"), ``splits`` (["train", "val"]);
    * ``good_tasks``: ``{task_id: raw task}`` of the train tasks that must come out (phrase unchanged,
      polygons unchanged except ``clipped``);
    * ``good_task_ids``: ``{split: [task_id, ...]}``;
    * ``expected_quarantine``: list of ``(record, reason, source_file)`` for train;
    * ``converted_rgb``: image ids stored as grayscale / CMYK / palette; ``clipped``: ``{task_id: points}``
      of the tasks with points outside their image; ``resizable``: ``(image_id, task_id, w, h)`` of a
      large-ish image for ``max_side`` tests.
    """
    root = os.fspath(root)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    metadata: list[dict[str, Any]] = []
    train: list[dict[str, Any]] = []
    val: list[dict[str, Any]] = []
    expected: list[tuple[str, str, str]] = []
    converted: list[int] = []
    clipped: dict[str, int] = {}

    def add_image(image_id: int, width: int, height: int, split: str, data: bytes | None) -> None:
        metadata.append(
            {
                "image_id": image_id,
                "coco_id": None,
                "flickr_id": None,
                "width": width,
                "height": height,
                "url": "",
                "split": split,
            }
        )
        if data is not None:
            with open(os.path.join(root, "images", f"{image_id}.jpg"), "wb") as f:
                f.write(data)

    # good RGB images, one or two tasks each (one multi-instance)
    for image_id, (w, h) in zip((101, 102, 103), ((64, 48), (80, 60), (48, 64))):
        add_image(image_id, w, h, SPLIT, _jpeg(_image(w, h, image_id)))
        train.append(_task(image_id, [1], [[_rect(4.5, 5.0, 30.25, 28.0)]], "green box"))
    train.append(_task(101, [2, 3], [[_rect(33, 2, 50, 12)], [_rect(40, 20, 60, 40)]], "boxes"))
    # a large-ish image for max_side: a triangle plus a rectangle
    add_image(104, 120, 80, SPLIT, _jpeg(_image(120, 80, 4)))
    resizable_task = _task(
        104, [1], [[[[10.0, 10.0], [100.0, 15.0], [40.0, 70.0]], _rect(80, 40, 115, 75)]], "big thing"
    )
    train.append(resizable_task)
    # grayscale, CMYK and palette images are fine but must become RGB
    add_image(105, 40, 30, SPLIT, _jpeg(_image(40, 30, 5).convert("L")))
    add_image(106, 40, 30, SPLIT, _jpeg(_image(40, 30, 6).convert("CMYK")))
    palette = io.BytesIO()
    _image(40, 30, 7).convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(palette, format="PNG")
    add_image(107, 40, 30, SPLIT, palette.getvalue())  # a palette image can only be a non-JPEG file
    for image_id in (105, 106, 107):
        train.append(_task(image_id, [1], [[_rect(2, 2, 20, 20)]], "gray square"))
        converted.append(image_id)
    # points outside the image: clipped and counted, the task is kept
    add_image(108, 50, 40, SPLIT, _jpeg(_image(50, 40, 8)))
    outside = _task(108, [1], [[[[-5.0, 10.0], [30.0, -2.0], [60.0, 45.0], [10.0, 30.0]]]], "cut shape")
    train.append(outside)
    clipped[outside["task_id"]] = 3  # (60, 45) is out on both axes: one point

    good_tasks = {t["task_id"]: t for t in train}

    if with_bad:

        def bad(task: dict[str, Any], reason: str, source_file: str) -> None:
            train.append(task)
            expected.append((task["task_id"], reason, source_file))

        # missing image: metadata row but no file; two tasks, both quarantined
        add_image(201, 40, 30, SPLIT, None)
        bad(_task(201, [1], [[_rect(1, 1, 9, 9)]], "lost cat"), "missing_image", "images/201.jpg")
        bad(_task(201, [2], [[_rect(2, 2, 9, 9)]], "lost dog"), "missing_image", "images/201.jpg")
        # truncated JPEG
        add_image(202, 64, 48, SPLIT, _jpeg(_image(64, 48, 2))[:-400])
        bad(_task(202, [1], [[_rect(1, 1, 9, 9)]], "half picture"), "unreadable_image", "images/202.jpg")
        # not an image at all (an HTML error page saved as .jpg)
        add_image(203, 40, 30, SPLIT, b"<html><body>404 Not Found</body></html>")
        bad(_task(203, [1], [[_rect(1, 1, 9, 9)]], "web page"), "unreadable_image", "images/203.jpg")
        # image size differs from the metadata
        add_image(204, 40, 30, SPLIT, _jpeg(_image(44, 30, 3)))
        bad(_task(204, [1], [[_rect(1, 1, 9, 9)]], "wide one"), "size_mismatch", "images/204.jpg")
        # on a good image: degenerate polygons only, an empty phrase, a repeated task_id, a bad schema
        bad(
            _task(102, [7], [[[[1.0, 1.0], [5.0, 5.0]], [[3.0, 3.0], [3.0, 3.0], [3.0, 3.0]]]], "thin line"),
            "no_usable_polygons",
            "refer_train.json",
        )
        bad(_task(102, [8], [[_rect(1, 1, 9, 9)]], "   "), "empty_phrase", "refer_train.json")
        bad(
            _task(103, [9], [[_rect(1, 1, 9, 9)]], "copy", task_id="101__1"),
            "duplicate_task_id",
            "refer_train.json",
        )
        broken = _task(103, [10], [[_rect(1, 1, 9, 9)]], "no boxes")
        del broken["instance_boxes"]
        bad(broken, "bad_schema", "refer_train.json")
        # image_id not in the metadata (but the file exists)
        with open(os.path.join(root, "images", "299.jpg"), "wb") as f:
            f.write(_jpeg(_image(40, 30, 9)))
        bad(_task(299, [1], [[_rect(1, 1, 9, 9)]], "ghost"), "missing_metadata", "refer_train.json")

    # a clean val split, so split handling can be tested too
    add_image(301, 48, 40, "val", _jpeg(_image(48, 40, 11)))
    val.append(_task(301, [1], [[_rect(3, 3, 30, 30)]], "val square"))

    with open(os.path.join(root, metadata_name), "w", encoding="utf-8") as f:
        json.dump(metadata, f)
    for split, tasks in (("train", train), ("val", val)):
        with open(os.path.join(root, f"refer_{split}.json"), "w", encoding="utf-8") as f:
            json.dump(tasks, f)
    return {
        "root": root,
        "split": SPLIT,
        "splits": ["train", "val"],
        "good_tasks": good_tasks,
        "good_task_ids": {"train": list(good_tasks), "val": [t["task_id"] for t in val]},
        "expected_quarantine": expected,
        "converted_rgb": converted,
        "clipped": clipped,
        "resizable": (104, resizable_task["task_id"], 120, 80),
    }
