"""PhraseCut reader: the official folder layout to :class:`~pipeline.schema.ImageRecord` s.

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
:mod:`pipeline.quarantine`); an image-level fault quarantines each of the image's tasks. Records are
hostile input: ids, paths, text and sizes are checked by :mod:`pipeline.validate` (docs/data-safety.md),
and any exception while handling one record quarantines it (``record_error``) instead of failing the job. Polygons that are
degenerate while the task still has a usable one are kept (and counted): the official evaluator draws them
too, so dropping them would change the ground truth the metrics use.

The same loader reads the COCO layouts of :mod:`pipeline.refer`: their entries name the image file and
folder, and their tasks carry ``rles`` (COCO RLEs at the original size, checked against the image and kept
unchanged by ``max_side``); a task with no target at all is legal only for the sources of
:data:`pipeline.refer.NO_TARGET_SOURCES` (gRefCOCO's no-target expressions).
"""

from __future__ import annotations

import dataclasses
import io
import os
import warnings
from collections.abc import Iterator
from typing import Any

from PIL import Image, ImageFile

from pipeline.listing import Listing, iter_metadata
from pipeline.phrasecut_format import METADATA_FILES, ImageEntry
from pipeline.quarantine import (
    BAD_ID,
    BAD_METADATA,
    BAD_POLYGONS,
    BAD_RLE,
    BAD_SCHEMA,
    BAD_TEXT,
    EMPTY_PHRASE,
    IMAGE_TOO_LARGE,
    MISSING_IMAGE,
    MISSING_METADATA,
    NO_USABLE_POLYGONS,
    REASONS,
    RECORD_ERROR,
    SIZE_MISMATCH,
    UNREADABLE_IMAGE,
    UNSAFE_PATH,
)
from pipeline.refer import NO_TARGET_SOURCES
from pipeline.schema import ImageRecord, QuarantineRecord, Task
from pipeline.validate import (
    DEFAULT_MAX_IMAGE_BYTES,
    DEFAULT_MAX_PIXELS,
    TooLargeError,
    UnsafePathError,
    _show,
    id_error,
    meta_size,
    polygon_error,
    read_file_inside,
    size_error,
    structure_error,
    text_error,
)
from segvlm.masks import rle_area, rle_error

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
    return dict(iter_metadata(root))


def list_images(root: str | os.PathLike[str], split: str) -> list[ImageEntry]:
    """The images of ``refer_{split}.json`` with their tasks, in order of first appearance (no image I/O).

    Schema errors and repeated task ids (the first occurrence is kept) are attached to the entries as
    quarantine rows; tasks that cannot even be grouped (no usable image_id) go to a final entry with
    ``image_id=None``. Holds the whole split in memory: fine for tests and small splits; the sharding job
    streams a :class:`pipeline.listing.Listing` instead.
    """
    with Listing(root, split) as listing:
        return list(listing.entries(order="first"))


def _row(
    entry: ImageEntry, task: Any, index: int, source_file: str, reason: str, detail: str
) -> QuarantineRecord:
    """A quarantine row for one raw task (whatever its shape: the row must be written even for garbage)."""
    task_id = task.get("task_id") if isinstance(task, dict) else None
    return QuarantineRecord(
        source_file=source_file,
        record=task_id if isinstance(task_id, str) and task_id else f"{entry.image_id}#{index}",
        reason=reason,
        detail=detail,
        image_id=entry.image_id,
        task_id=task_id if isinstance(task_id, str) else None,
    )


def _quarantine_all(entry: ImageEntry, source_file: str, reason: str, detail: str) -> list[QuarantineRecord]:
    """One row per task of the image: an image-level fault takes all its tasks with it."""
    return [_row(entry, task, i, source_file, reason, detail) for i, task in enumerate(entry.tasks)]


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


def _decode(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[Image.Image | None, str, str]:
    """``(image, "", "")`` fully decoded, or ``(None, reason, why)``. The size is checked from the header,
    before a single pixel is decoded; decoding everything is what detects truncated files."""
    try:
        with warnings.catch_warnings():
            # Pillow warns from 89 MP on; the size is checked against our own limit right below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:  # Pillow's own refusal (over 2 × its MAX_IMAGE_PIXELS)
        return None, IMAGE_TOO_LARGE, f"refused before decoding ({err})"
    except Exception as err:  # PIL raises several types for garbage input
        return None, UNREADABLE_IMAGE, f"cannot decode ({type(err).__name__}: {err})"
    error = size_error(image.size[0], image.size[1], max_pixels, "header")
    if error is not None:
        reason = IMAGE_TOO_LARGE if "over the limit" in error else UNREADABLE_IMAGE
        return None, reason, f"{error}; not decoded"
    image_format = image.format or "unknown"
    try:
        image.load()  # raises OSError on a truncated file unless LOAD_TRUNCATED_IMAGES
    except Exception as err:
        return None, UNREADABLE_IMAGE, f"cannot decode ({type(err).__name__}: {err})"
    if image_format == "JPEG" and ImageFile.LOAD_TRUNCATED_IMAGES and b"\xff\xd9" not in data[-64:]:
        # someone switched on lenient loading in this process: check the end-of-image marker ourselves
        return None, UNREADABLE_IMAGE, "truncated JPEG (no end-of-image marker)"
    return image, "", ""


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
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
) -> tuple[ImageRecord | None, bytes | None, list[QuarantineRecord], dict[str, int]]:
    """Read, validate and (if needed) convert one image and its tasks.

    Returns ``(record, jpg_bytes, quarantine, stats)``; record and bytes are None when no task survives.
    Every task of ``entry`` (and every listing issue it carries) ends up either in the record or in the
    quarantine: ``stats["tasks"] == stats["tasks_ok"] + stats["quarantined"]``, whatever the input, since
    an unexpected exception quarantines the image's tasks as ``record_error`` instead of propagating.
    Checks (``pipeline/validate.py``): safe ids, the image path inside ``root``, file and pixel limits
    (from the metadata and the image header, before decoding), clean text, sane polygon coordinates.
    The original JPEG bytes pass through untouched unless the image is not RGB (converted, re-encoded),
    not a JPEG at all but a decodable image such as a palette PNG (re-encoded), or longer than
    ``max_side`` (resized once, polygons and boxes scaled, ``orig_width``/``orig_height`` kept; RLEs stay
    at the original size). The image is read from ``entry.image_root`` when the entry names one, else
    from ``root``.
    """
    try:
        return _load_image_record(
            os.fspath(root),
            entry,
            source=source,
            max_side=max_side,
            max_pixels=max_pixels,
            max_image_bytes=max_image_bytes,
        )
    except Exception as err:  # one image's surprise must not fail the job: quarantine it, with the error
        detail = f"{entry.image_file}: {type(err).__name__}: {err}"
        quarantine = list(entry.issues) + _quarantine_all(entry, entry.source_file, RECORD_ERROR, detail)
        stats = _empty_stats()
        stats.update(
            images=int(entry.image_id is not None),
            tasks=len(quarantine),
            quarantined=len(quarantine),
        )
        return None, None, quarantine, stats


def _task_error(raw: dict[str, Any], width: int, height: int) -> tuple[str, str] | None:
    """``(reason, why)`` when one (schema-valid) task must be quarantined before its polygons are used."""
    error = id_error(raw["task_id"], "task_id")
    if error:
        return BAD_ID, error
    error = text_error(raw["phrase"]) or structure_error(raw["phrase_structure"])
    if error:
        return BAD_TEXT, error
    if not raw["phrase"].strip():
        return EMPTY_PHRASE, f"phrase {raw['phrase']!r}"
    error = polygon_error(raw["Polygons"], width, height)
    if error:
        return BAD_POLYGONS, error
    for i, rle in enumerate(raw.get("rles") or []):
        error = rle_error(rle, height, width)
        if error:
            return BAD_RLE, f"rles[{i}]: {error}"
    return None


def _no_target_error(raw: dict[str, Any], source: str) -> str | None:
    """Why a task without any polygon or RLE may not stand as a no-target expression (None when it may)."""
    if source not in NO_TARGET_SOURCES:
        return f"it has no target (no polygon, no RLE), which only {', '.join(NO_TARGET_SOURCES)} allows"
    if raw["ann_ids"]:
        return f"it lists ann_ids {_show(raw['ann_ids'])} but has no polygon or RLE"
    return None


def _load_image_record(
    root: str,
    entry: ImageEntry,
    *,
    source: str,
    max_side: int | None,
    max_pixels: int,
    max_image_bytes: int,
) -> tuple[ImageRecord | None, bytes | None, list[QuarantineRecord], dict[str, int]]:
    stats = _empty_stats()
    quarantine = list(entry.issues)
    stats["tasks"] = len(entry.tasks) + len(entry.issues)

    def done(record: ImageRecord | None = None, data: bytes | None = None):
        stats["quarantined"] = len(quarantine)
        stats["tasks_ok"] = len(record.tasks) if record else 0
        stats["images_ok"] = int(record is not None)
        return record, data, quarantine, stats

    def reject_all(source_file: str, reason: str, detail: str):
        quarantine.extend(_quarantine_all(entry, source_file, reason, detail))
        return done()

    if entry.image_id is None:
        # the listing puts only schema failures here; anything else would be lost without this
        return reject_all(entry.source_file, BAD_SCHEMA, "task has no usable image_id")
    stats["images"] = 1
    if not entry.tasks:
        return done()
    error = id_error(entry.image_id, "image_id")
    if error:
        return reject_all(entry.source_file, BAD_ID, f"image of tasks in {entry.source_file}: {error}")
    image_file = entry.image_file
    meta_file = entry.meta_file  # PhraseCut: the usual name of its two; the detail says which row
    if entry.meta is None:
        meta_names = " or ".join(METADATA_FILES) if meta_file in METADATA_FILES else meta_file
        for i, task in enumerate(entry.tasks):
            detail = f"task {task['task_id']} in {entry.source_file}: image_id {entry.image_id} is not in {meta_names}"
            quarantine.append(_row(entry, task, i, entry.source_file, MISSING_METADATA, detail))
        return done()
    size, error = meta_size(entry.meta)
    if size is None:
        return reject_all(meta_file, BAD_METADATA, f"{meta_file}, image_id {entry.image_id}: {error}")
    if entry.image_root is not None and entry.file_name is None:  # never images/{id}.jpg by mistake
        detail = f"{meta_file}, image_id {entry.image_id}: the image row has no file_name string"
        return reject_all(meta_file, BAD_METADATA, detail)
    width, height = size
    error = size_error(width, height, max_pixels, "metadata")
    if error:
        return reject_all(meta_file, IMAGE_TOO_LARGE, f"{meta_file}, image_id {entry.image_id}: {error}")
    folder = entry.image_root if entry.image_root is not None else root
    try:
        path, data = read_file_inside(folder, image_file, max_image_bytes)
    except FileNotFoundError:
        return reject_all(image_file, MISSING_IMAGE, f"{image_file} does not exist")
    except UnsafePathError as err:
        return reject_all(image_file, UNSAFE_PATH, f"{image_file}: {err}")
    except TooLargeError as err:
        return reject_all(image_file, IMAGE_TOO_LARGE, f"{image_file}: {err}")
    except OSError as err:  # a directory, a symlink swapped in (ELOOP), permissions
        return reject_all(image_file, UNREADABLE_IMAGE, f"{image_file}: {type(err).__name__}: {err}")
    image, reason, why = _decode(data, max_pixels)
    if image is None:
        return reject_all(image_file, reason, f"{image_file}: {why}")
    if image.size != (width, height):
        says = "image_data_split" if meta_file in METADATA_FILES else meta_file
        detail = f"{image_file} is {image.size[0]}x{image.size[1]}, {says} says {width}x{height}"
        return reject_all(image_file, SIZE_MISMATCH, detail)

    tasks: list[Task] = []
    for i, raw in enumerate(entry.tasks):
        task_id = raw["task_id"]
        where = f"task {_show(task_id)} in {entry.source_file}"
        try:
            problem = _task_error(raw, width, height)
            if problem is not None:
                quarantine.append(
                    _row(entry, raw, i, entry.source_file, problem[0], f"{where}: {problem[1]}")
                )
                continue
            rles = list(raw.get("rles") or [])
            polygons, clipped, usable, degenerate = _clip_polygons(raw["Polygons"], width, height)
            if not raw["Polygons"] and not rles:
                why = _no_target_error(raw, source)
                if why is not None:
                    detail = f"task {task_id} in {entry.source_file}: {why}"
                    quarantine.append(_row(entry, raw, i, entry.source_file, NO_USABLE_POLYGONS, detail))
                    continue
            elif usable == 0 and not any(rle_area(rle) for rle in rles):
                empty = f" and its {len(rles)} RLE(s) are empty" if rles else ""
                detail = (
                    f"task {task_id} in {entry.source_file}: none of its {degenerate} polygon(s) has "
                    f"3+ points and a positive area inside the {width}x{height} image{empty}"
                )
                quarantine.append(_row(entry, raw, i, entry.source_file, NO_USABLE_POLYGONS, detail))
                continue
            task = Task(
                task_id=task_id,
                phrase=raw["phrase"],
                polygons=polygons,
                boxes=[_clip_box(list(b), width, height) for b in raw["instance_boxes"]],
                phrase_structure=raw["phrase_structure"],
                kind="original",
                rles=rles,
            )
        except Exception as err:  # one task's surprise takes only that task
            detail = f"{where}: {type(err).__name__}: {err}"
            quarantine.append(_row(entry, raw, i, entry.source_file, RECORD_ERROR, detail))
            continue
        stats["clipped_points"] += clipped
        stats["degenerate_polygons"] += degenerate
        tasks.append(task)
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
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
) -> Iterator[tuple[ImageRecord | None, bytes | None, list[QuarantineRecord], dict[str, int]]]:
    """:func:`load_image_record` over every entry of :func:`list_images`, in one process (tests, small data)."""
    for entry in list_images(root, split):
        yield load_image_record(
            root,
            entry,
            source=source,
            max_side=max_side,
            max_pixels=max_pixels,
            max_image_bytes=max_image_bytes,
        )
