"""PhraseCut reader: the official folder layout (SPEC 3.1) to :class:`~pipeline.schema.ImageRecord` s.

Layout::

    ROOT/image_data_split.json      (or image_data_split3000.json, the name the dataset README uses)
    ROOT/refer_{split}.json         list of tasks: task_id, image_id, ann_ids, Polygons, instance_boxes,
                                    phrase, phrase_structure
    ROOT/images/{image_id}.jpg

Two steps, so a Ray driver can fan out cheaply:

* :func:`list_images` parses the JSON only (no image decode) and groups the tasks per image;
  schema errors, duplicate task ids and tasks whose image has no metadata are already known here.
* :func:`load_image_record` does the image I/O and validation of one image. Its inputs are plain
  picklable values and it has no side effects, so Ray tasks can call it directly.

Every bad record comes back as a :class:`~pipeline.schema.QuarantineRecord` (reason codes in
:mod:`pipeline.quarantine`); an image-level fault quarantines each of the image's tasks. Polygons that are
degenerate while the task still has a usable one are kept (and counted): the official evaluator draws them
too, so dropping them would change the ground truth the metrics use.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
from collections.abc import Iterator
from typing import Any

from PIL import Image, ImageFile

from pipeline.quarantine import (
    EMPTY_PHRASE,
    MISSING_IMAGE,
    MISSING_METADATA,
    NO_USABLE_POLYGONS,
    REASONS,
    SIZE_MISMATCH,
    UNREADABLE_IMAGE,
)
from pipeline.schema import ImageRecord, QuarantineRecord, Task

__all__ = [
    "METADATA_FILES",
    "REASONS",
    "ImageEntry",
    "iter_records",
    "list_images",
    "load_image_record",
    "merge_stats",
    "read_metadata",
]

METADATA_FILES = ("image_data_split.json", "image_data_split3000.json")
TASK_KEYS = ("task_id", "image_id", "ann_ids", "Polygons", "instance_boxes", "phrase", "phrase_structure")
JPEG_QUALITY = 95  # for the rare re-encode (colour conversion, --max-side): once, high quality
STAT_KEYS = (
    "images",
    "images_ok",
    "tasks",
    "tasks_ok",
    "quarantined",
    "clipped_points",
    "degenerate_polygons",
    "converted_rgb",
    "converted_format",
    "resized",
)


@dataclasses.dataclass
class ImageEntry:
    """One image of a split and its raw tasks, as listed from the JSON files (no pixels read yet).

    ``meta`` is the image's row of ``image_data_split.json`` (None when it has none). ``issues`` carries the
    quarantine rows found while listing (bad schema, duplicate ids); :func:`load_image_record` passes them on
    so all quarantine flows through one place. Tasks whose image_id is itself unusable are collected in one
    entry with ``image_id=None``.
    """

    image_id: int | str | None
    split: str
    meta: dict[str, Any] | None
    tasks: list[dict[str, Any]]
    source_file: str
    issues: list[QuarantineRecord] = dataclasses.field(default_factory=list)

    @property
    def image_file(self) -> str:
        return f"images/{self.image_id}.jpg"


def _empty_stats() -> dict[str, int]:
    return dict.fromkeys(STAT_KEYS, 0)


def merge_stats(*stats: dict[str, int]) -> dict[str, int]:
    """Sum per-image stats dicts (what a driver does after the fan-out)."""
    total = _empty_stats()
    for one in stats:
        for key, value in one.items():
            total[key] = total.get(key, 0) + value
    return total


def read_metadata(root: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """``{str(image_id): row}`` from ``image_data_split.json`` or ``image_data_split3000.json``.

    Holds every row; the sharding job streams the file instead (:mod:`pipeline.listing`).
    """
    from pipeline.listing import iter_metadata

    return dict(iter_metadata(root))


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _schema_error(task: Any) -> str | None:
    """Why ``task`` does not have PhraseCut's task fields with the right types (None when it does)."""
    if not isinstance(task, dict):
        return f"task is a {type(task).__name__}, not an object"
    missing = [key for key in TASK_KEYS if key not in task]
    if missing:
        return f"missing field(s) {', '.join(missing)}"
    if not isinstance(task["task_id"], str) or not task["task_id"]:
        return "task_id is not a non-empty string"
    if not isinstance(task["image_id"], int | str) or isinstance(task["image_id"], bool):
        return "image_id is neither an int nor a string"
    if not isinstance(task["phrase"], str):
        return "phrase is not a string"
    if not isinstance(task["ann_ids"], list):
        return "ann_ids is not a list"
    if task["phrase_structure"] is not None and not isinstance(task["phrase_structure"], dict):
        return "phrase_structure is neither an object nor null"
    polygons = task["Polygons"]
    if not isinstance(polygons, list) or not polygons:
        return "Polygons is not a non-empty list of instances"
    for i, instance in enumerate(polygons):
        if not isinstance(instance, list):
            return f"Polygons[{i}] is not a list of polygons"
        for j, polygon in enumerate(instance):
            if not isinstance(polygon, list) or not all(
                isinstance(p, list | tuple) and len(p) == 2 and _is_number(p[0]) and _is_number(p[1])
                for p in polygon
            ):
                return f"Polygons[{i}][{j}] is not a list of [x, y] number pairs"
    boxes = task["instance_boxes"]
    if not isinstance(boxes, list) or not all(
        isinstance(b, list | tuple) and len(b) == 4 and all(_is_number(v) for v in b) for b in boxes
    ):
        return "instance_boxes is not a list of [x, y, w, h]"
    return None


def list_images(root: str | os.PathLike[str], split: str) -> list[ImageEntry]:
    """The images of ``refer_{split}.json`` with their tasks, in order of first appearance (no image I/O).

    Schema errors and repeated task ids (the first occurrence is kept) are attached to the entries as
    quarantine rows; tasks that cannot even be grouped (no usable image_id) go to a final entry with
    ``image_id=None``. Holds the whole split in memory: fine for tests and small splits; the sharding job
    streams a :class:`pipeline.listing.Listing` instead.
    """
    from pipeline.listing import Listing

    with Listing(root, split) as listing:
        return list(listing.entries(order="first"))


def _quarantine_all(entry: ImageEntry, source_file: str, reason: str, detail: str) -> list[QuarantineRecord]:
    """One row per task of the image: an image-level fault takes all its tasks with it."""
    return [
        QuarantineRecord(
            source_file=source_file,
            record=task["task_id"],
            reason=reason,
            detail=detail,
            image_id=entry.image_id,
            task_id=task["task_id"],
        )
        for task in entry.tasks
    ]


def _polygon_area(polygon: list[list[float]]) -> float:
    """Absolute shoelace area."""
    area = 0.0
    for (x0, y0), (x1, y1) in zip(polygon, polygon[1:] + polygon[:1]):
        area += x0 * y1 - x1 * y0
    return abs(area) / 2.0


def _clip_polygons(
    instances: list[list[list[float]]], width: int, height: int
) -> tuple[list[list[list[list[float]]]], int, int, int]:
    """Points clamped into [0, w] × [0, h]; returns (instances, clipped points, usable, degenerate polygons).

    Points already inside are returned as the very same values, so clean tasks pass through unchanged.
    """
    clipped = usable = degenerate = 0
    out = []
    for instance in instances:
        new_instance = []
        for polygon in instance:
            new_polygon = []
            for x, y in polygon:
                cx, cy = min(max(x, 0), width), min(max(y, 0), height)
                if cx != x or cy != y:
                    clipped += 1
                new_polygon.append([cx, cy])
            if len(new_polygon) >= 3 and _polygon_area(new_polygon) > 0:
                usable += 1
            else:
                degenerate += 1
            new_instance.append(new_polygon)
        out.append(new_instance)
    return out, clipped, usable, degenerate


def _clip_box(box: list[float], width: int, height: int) -> list[float]:
    x, y, w, h = box
    x0, y0 = min(max(x, 0), width), min(max(y, 0), height)
    x1, y1 = min(max(x + w, 0), width), min(max(y + h, 0), height)
    if (x0, y0, x1, y1) == (x, y, x + w, y + h):
        return list(box)
    return [x0, y0, x1 - x0, y1 - y0]


def _encode_jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def _decode(data: bytes) -> tuple[Image.Image | None, str]:
    """Fully decoded image, or None and why. Decoding everything is what detects truncated files."""
    try:
        image = Image.open(io.BytesIO(data))
        image_format = image.format or "unknown"
        image.load()  # raises OSError on a truncated file unless LOAD_TRUNCATED_IMAGES
    except Exception as err:  # PIL raises several types for garbage input
        return None, f"cannot decode ({type(err).__name__}: {err})"
    if image_format == "JPEG" and ImageFile.LOAD_TRUNCATED_IMAGES and b"\xff\xd9" not in data[-64:]:
        # someone switched on lenient loading in this process: check the end-of-image marker ourselves
        return None, "truncated JPEG (no end-of-image marker)"
    return image, ""


def _scale_task(task: Task, sx: float, sy: float) -> Task:
    polygons = [
        [[[x * sx, y * sy] for x, y in polygon] for polygon in instance] for instance in task.polygons
    ]
    boxes = [[x * sx, y * sy, w * sx, h * sy] for x, y, w, h in task.boxes]
    return dataclasses.replace(task, polygons=polygons, boxes=boxes)


def load_image_record(
    root: str | os.PathLike[str],
    entry: ImageEntry,
    *,
    source: str = "phrasecut",
    max_side: int | None = None,
) -> tuple[ImageRecord | None, bytes | None, list[QuarantineRecord], dict[str, int]]:
    """Read, validate and (if needed) convert one image and its tasks.

    Returns ``(record, jpg_bytes, quarantine, stats)``; record and bytes are None when no task survives.
    The original JPEG bytes pass through untouched unless the image is not RGB (converted, re-encoded),
    not a JPEG at all but a decodable image such as a palette PNG (re-encoded), or longer than
    ``max_side`` (resized once, polygons and boxes scaled, ``orig_width``/``orig_height`` kept).
    """
    root = os.fspath(root)
    stats = _empty_stats()
    quarantine = list(entry.issues)
    stats["tasks"] = len(entry.tasks) + len(entry.issues)

    def done(record: ImageRecord | None = None, data: bytes | None = None):
        stats["quarantined"] = len(quarantine)
        stats["tasks_ok"] = len(record.tasks) if record else 0
        stats["images_ok"] = int(record is not None)
        return record, data, quarantine, stats

    if entry.image_id is None:
        return done()
    stats["images"] = 1
    if not entry.tasks:
        return done()
    image_file = entry.image_file
    if entry.meta is None:
        meta_names = " or ".join(METADATA_FILES)
        for task in entry.tasks:
            detail = f"task {task['task_id']} in {entry.source_file}: image_id {entry.image_id} is not in {meta_names}"
            quarantine += _quarantine_all(
                dataclasses.replace(entry, tasks=[task]), entry.source_file, MISSING_METADATA, detail
            )
        return done()
    path = os.path.join(root, image_file)
    if not os.path.isfile(path):
        quarantine += _quarantine_all(entry, image_file, MISSING_IMAGE, f"{image_file} does not exist")
        return done()
    with open(path, "rb") as f:
        data = f.read()
    image, why = _decode(data)
    if image is None:
        quarantine += _quarantine_all(entry, image_file, UNREADABLE_IMAGE, f"{image_file}: {why}")
        return done()
    width, height = int(entry.meta["width"]), int(entry.meta["height"])
    if image.size != (width, height):
        detail = f"{image_file} is {image.size[0]}x{image.size[1]}, image_data_split says {width}x{height}"
        quarantine += _quarantine_all(entry, image_file, SIZE_MISMATCH, detail)
        return done()

    tasks: list[Task] = []
    for raw in entry.tasks:
        task_id = raw["task_id"]
        if not raw["phrase"].strip():
            quarantine.append(
                QuarantineRecord(
                    source_file=entry.source_file,
                    record=task_id,
                    reason=EMPTY_PHRASE,
                    detail=f"task {task_id} in {entry.source_file} has phrase {raw['phrase']!r}",
                    image_id=entry.image_id,
                    task_id=task_id,
                )
            )
            continue
        polygons, clipped, usable, degenerate = _clip_polygons(raw["Polygons"], width, height)
        if usable == 0:
            quarantine.append(
                QuarantineRecord(
                    source_file=entry.source_file,
                    record=task_id,
                    reason=NO_USABLE_POLYGONS,
                    detail=(
                        f"task {task_id} in {entry.source_file}: none of its {degenerate} polygon(s) has "
                        f"3+ points and a positive area inside the {width}x{height} image"
                    ),
                    image_id=entry.image_id,
                    task_id=task_id,
                )
            )
            continue
        stats["clipped_points"] += clipped
        stats["degenerate_polygons"] += degenerate
        tasks.append(
            Task(
                task_id=task_id,
                phrase=raw["phrase"],
                polygons=polygons,
                boxes=[_clip_box(list(b), width, height) for b in raw["instance_boxes"]],
                phrase_structure=raw["phrase_structure"],
                kind="original",
            )
        )
    if not tasks:
        return done()

    # pass the original bytes through unless something forces one re-encode (never two)
    reencode = False
    if image.format != "JPEG":
        stats["converted_format"] = 1
        reencode = True
    if image.mode != "RGB":
        image = image.convert("RGB")
        stats["converted_rgb"] = 1
        reencode = True
    out_w, out_h = width, height
    if max_side is not None and max(width, height) > max_side:
        scale = max_side / max(width, height)
        out_w, out_h = max(1, round(width * scale)), max(1, round(height * scale))
        image = image.resize((out_w, out_h), Image.Resampling.LANCZOS)
        sx, sy = out_w / width, out_h / height
        tasks = [_scale_task(t, sx, sy) for t in tasks]
        stats["resized"] = 1
        reencode = True
    jpg = _encode_jpeg(image) if reencode else data
    record = ImageRecord(
        source=source,
        image_id=entry.image_id,
        split=entry.split,
        width=out_w,
        height=out_h,
        tasks=tasks,
        orig_width=width,
        orig_height=height,
        image_path=path,
    )
    return done(record, jpg)


def iter_records(
    root: str | os.PathLike[str],
    split: str,
    *,
    source: str = "phrasecut",
    max_side: int | None = None,
) -> Iterator[tuple[ImageRecord | None, bytes | None, list[QuarantineRecord], dict[str, int]]]:
    """:func:`load_image_record` over every entry of :func:`list_images`, in one process (tests, small data)."""
    for entry in list_images(root, split):
        yield load_image_record(root, entry, source=source, max_side=max_side)
