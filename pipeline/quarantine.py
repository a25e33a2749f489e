"""Quarantine: records set aside with a reason, written to ``quarantine.parquet``.

Bad records never crash a job and never pass silently: the reader turns each into a
:class:`~pipeline.schema.QuarantineRecord` and the job writes them here, one row per task.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline import shards
from pipeline.schema import QuarantineRecord

QUARANTINE_FILE = "quarantine.parquet"
MAX_DETAIL = 2000  # characters of a row's detail

MISSING_IMAGE = "missing_image"
UNREADABLE_IMAGE = "unreadable_image"
SIZE_MISMATCH = "size_mismatch"
NO_USABLE_POLYGONS = "no_usable_polygons"
EMPTY_PHRASE = "empty_phrase"
DUPLICATE_TASK_ID = "duplicate_task_id"
MISSING_METADATA = "missing_metadata"
BAD_SCHEMA = "bad_schema"
BAD_ID = "bad_id"
UNSAFE_PATH = "unsafe_path"
BAD_TEXT = "bad_text"
BAD_METADATA = "bad_metadata"
IMAGE_TOO_LARGE = "image_too_large"
BAD_POLYGONS = "bad_polygons"
RECORD_ERROR = "record_error"
BAD_RLE = "bad_rle"

# code -> what it means; the codes are the values of the `reason` column.
REASONS: dict[str, str] = {
    MISSING_IMAGE: "images/{image_id}.jpg does not exist",
    UNREADABLE_IMAGE: "the image file cannot be decoded completely (not an image, or truncated)",
    SIZE_MISMATCH: "the decoded image size differs from width/height in the image metadata",
    NO_USABLE_POLYGONS: "every polygon has fewer than 3 points or zero area after clipping to the image",
    EMPTY_PHRASE: "the phrase is empty or whitespace",
    DUPLICATE_TASK_ID: "a task with the same task_id came earlier in the file (the first one is kept)",
    MISSING_METADATA: "the task's image_id is not in image_data_split.json (COCO layouts: its image or one of "
    "its ann_ids is not in instances.json, or the annotation belongs to another image)",
    BAD_SCHEMA: "a required field is missing or has the wrong type",
    BAD_ID: "image_id or task_id is not a safe file-name component (pipeline.validate.ID_PATTERN)",
    UNSAFE_PATH: "the image path (after symlinks) leads outside the dataset root",
    BAD_TEXT: "phrase or phrase_structure holds invalid Unicode, control characters, or is too long",
    BAD_METADATA: "the image's metadata row lacks width/height or they are not positive integers",
    IMAGE_TOO_LARGE: "the image (metadata, header or file) is over the configured pixel or byte limit",
    BAD_POLYGONS: "polygon points lie far outside the image, or there are too many of them",
    RECORD_ERROR: "an unexpected error while handling the record (its type and message are the detail)",
    BAD_RLE: "a COCO RLE mask is not of its image's size, or its counts do not decode to exactly its pixels",
}

SCHEMA = pa.schema(
    [
        ("source_file", pa.string()),
        ("record", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("image_id", pa.string()),  # string: PhraseCut ids are ints, other sources may not be
        ("task_id", pa.string()),
    ]
)


def _as_dict(record: QuarantineRecord | Mapping[str, Any]) -> dict[str, Any]:
    return record.to_dict() if isinstance(record, QuarantineRecord) else dict(record)


def _utf8(value: Any) -> str:
    """``str(value)`` that UTF-8 can encode: a quarantined record's id or detail may quote the very lone
    surrogate it was quarantined for, and a quarantine file that cannot be written loses every row."""
    text = str(value)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def _target(path: str) -> str:
    """A directory gets ``quarantine.parquet`` inside it; a ``*.parquet`` path is used as is."""
    return path if path.endswith(".parquet") else path.rstrip("/") + "/" + QUARANTINE_FILE


def _bounded(detail: str | None) -> str:
    """A detail quotes input (an exception message may hold a whole record): at most MAX_DETAIL chars."""
    detail = detail or ""
    return detail if len(detail) <= MAX_DETAIL else f"{detail[: MAX_DETAIL - 20]}...({len(detail)} chars)"


def to_table(records: Iterable[QuarantineRecord | Mapping[str, Any]]) -> pa.Table:
    """The quarantine rows as an Arrow table with :data:`SCHEMA` (empty input gives an empty table)."""
    rows = [_as_dict(r) for r in records]

    def column(name: str, *, nullable: bool) -> list[str | None]:
        values = [row.get(name) for row in rows]
        return [None if v is None and nullable else _utf8(v if v is not None else "") for v in values]

    return pa.table(
        {
            "source_file": column("source_file", nullable=False),
            "record": column("record", nullable=False),
            "reason": column("reason", nullable=False),
            "detail": [_bounded(d) for d in column("detail", nullable=False)],
            "image_id": column("image_id", nullable=True),
            "task_id": column("task_id", nullable=True),
        },
        schema=SCHEMA,
    )


def write_quarantine(
    path_or_fs_path: str | os.PathLike[str],
    records: Iterable[QuarantineRecord | Mapping[str, Any]],
    filesystem: Any = None,
) -> str:
    """Write ``quarantine.parquet`` (into a directory, or to an explicit ``*.parquet`` path); returns the path.

    ``filesystem`` is an optional ``pyarrow.fs.FileSystem`` (for remote storage; the path is then relative to
    it). The file is written under a temporary name and renamed, so a reader never sees half a file. An empty
    list still writes a file: "no quarantined records" must be distinguishable from "job not finished".
    """
    table = to_table(records)
    final = _target(os.fspath(path_or_fs_path))
    if filesystem is None:
        filesystem, target = pafs.LocalFileSystem(), os.path.abspath(final)
    else:
        target = final
    with shards.publishing(filesystem, target) as stream:
        pq.write_table(table, stream)
    return final


def read_quarantine(path: str | os.PathLike[str], filesystem: Any = None) -> list[dict[str, Any]]:
    """The rows of a quarantine file (or of ``quarantine.parquet`` in a directory) as dicts."""
    return pq.read_table(_target(os.fspath(path)), filesystem=filesystem).to_pylist()


def count_by_reason(records: Iterable[QuarantineRecord | Mapping[str, Any]]) -> dict[str, int]:
    """``{reason: rows}``, most frequent first (ties by name), for job summaries and MLflow params."""
    counts = Counter(_as_dict(r)["reason"] for r in records)
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
