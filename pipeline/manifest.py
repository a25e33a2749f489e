"""The index beside the shards: ``manifest.parquet`` (one row per task), ``sizes.json``, ``summary.json``.

``manifest.parquet`` and ``sizes.json`` are written last, after every shard and ``quarantine.parquet``,
each through a temp name: a folder without both is an unfinished job (``is_complete``).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline import shards
from pipeline.schema import ImageRecord
from segvlm.masks import decode_rles, polygons_at_original_size, rasterize_polygons

MANIFEST = "manifest.parquet"
SIZES = "sizes.json"
SUMMARY = "summary.json"
QUARANTINE = "quarantine.parquet"

# PhraseCut's evaluation subsets (PhraseCutDataset utils/subset.py): target area < 2 %, 2–20 %, > 20 %.
SMALL_AREA = 0.02
LARGE_AREA = 0.20

MANIFEST_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("shard", pa.string()),
        ("task_id", pa.string()),
        ("image_id", pa.string()),
        ("phrase", pa.string()),
        ("kind", pa.string()),
        ("phrase_type", pa.string()),
        ("num_instances", pa.int32()),
        ("mask_area", pa.float64()),
        ("size", pa.string()),
        ("instances", pa.string()),
        ("source", pa.string()),
    ]
)


def size_tag(area: float, num_instances: int) -> str:
    if num_instances == 0:
        return "none"  # negatives: the target is the empty mask
    return "small" if area < SMALL_AREA else "large" if area > LARGE_AREA else "medium"


def instances_tag(num_instances: int) -> str:
    return "none" if num_instances == 0 else "single" if num_instances == 1 else "multiple"


def manifest_rows(record: ImageRecord, shard: str) -> list[dict[str, Any]]:
    """One row per task; the mask area (rasterised polygons ∪ decoded RLEs) is measured at the original size,
    as the metrics are. A task without a target (a negative, a gRefCOCO no-target expression) has area 0,
    size and instances ``"none"``."""
    orig_w, orig_h = int(record.orig_width or record.width), int(record.orig_height or record.height)
    resized = (orig_w, orig_h) != (record.width, record.height)
    rows = []
    for task in record.tasks:
        n = task.num_instances
        if n:
            polygons = task.polygons
            if resized:  # stored at the capped size: map back exactly as the metrics' ground truth does
                polygons = polygons_at_original_size(polygons, record.width, record.height, orig_w, orig_h)
            mask = rasterize_polygons(polygons, orig_w, orig_h)
            if task.rles:  # already at the original size
                mask = mask | decode_rles(task.rles, orig_h, orig_w)
            # == mask_area_fraction's mean() for a 0/1 mask, without a float64 pass over every pixel
            area = np.count_nonzero(mask) / mask.size
        else:
            area = 0.0
        rows.append(
            {
                "key": record.key,
                "shard": shard,
                "task_id": task.task_id,
                "image_id": str(record.image_id),
                "phrase": task.phrase,
                "kind": task.kind,
                "phrase_type": task.phrase_type,
                "num_instances": n,
                "mask_area": area,
                "size": size_tag(area, n),
                "instances": instances_tag(n),
                "source": record.source,
            }
        )
    return rows


def check_rows(rows: Iterable[dict[str, Any]]) -> None:
    """Raise ValueError if a row has a string UTF-8 cannot encode (a lone surrogate): Parquet would raise
    only when the whole manifest is written, after every shard, and lose the job. Called per record, so
    the record is quarantined instead."""
    for row in rows:
        for name, value in row.items():
            if isinstance(value, str):
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError as err:
                    raise ValueError(
                        f"manifest row of task {row.get('task_id')!r}: {name} is not valid Unicode"
                    ) from err


def sort_rows(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Canonical order (shard, key, task_id) so reruns and resumed runs give byte-equal manifests."""
    return sorted(rows, key=lambda r: (r["shard"], r["key"], r["task_id"]))


def manifest_table(rows: Sequence[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(sort_rows(rows), schema=MANIFEST_SCHEMA)


def write_manifest(
    filesystem: pafs.FileSystem, base: str, rows: Sequence[dict[str, Any]], sizes: dict[str, int]
) -> None:
    """Write ``manifest.parquet`` then ``sizes.json``, each via a temp name. Call after everything else."""
    buffer = io.BytesIO()
    pq.write_table(manifest_table(rows), buffer)
    shards.write_bytes_atomic(filesystem, shards.join(base, MANIFEST), buffer.getvalue())
    shards.write_json_atomic(filesystem, shards.join(base, SIZES), dict(sorted(sizes.items())))


def load_manifest(dir_or_uri: str | os.PathLike, filesystem: pafs.FileSystem | None = None) -> pa.Table:
    fs, base = shards.resolve(dir_or_uri, filesystem)
    return pq.read_table(io.BytesIO(shards.read_bytes(fs, shards.join(base, MANIFEST))))


def load_sizes(dir_or_uri: str | os.PathLike, filesystem: pafs.FileSystem | None = None) -> dict[str, int]:
    fs, base = shards.resolve(dir_or_uri, filesystem)
    return json.loads(shards.read_bytes(fs, shards.join(base, SIZES)))


def load_summary(dir_or_uri: str | os.PathLike, filesystem: pafs.FileSystem | None = None) -> dict[str, Any]:
    fs, base = shards.resolve(dir_or_uri, filesystem)
    return json.loads(shards.read_bytes(fs, shards.join(base, SUMMARY)))


def table_hash(table: pa.Table) -> str:
    """sha256 of the rows in canonical JSON: independent of parquet encoder version and metadata."""
    digest = hashlib.sha256()
    digest.update(json.dumps(table.schema.names).encode())
    for row in sort_rows(table.to_pylist()):
        digest.update(json.dumps(row, sort_keys=True, separators=(",", ":")).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def manifest_hash(dir_or_uri: str | os.PathLike, filesystem: pafs.FileSystem | None = None) -> str:
    """Identifies the dataset content (an MLflow param): equal for equal rows, whatever wrote them."""
    return table_hash(load_manifest(dir_or_uri, filesystem))


def is_complete(dir_or_uri: str | os.PathLike, filesystem: pafs.FileSystem | None = None) -> bool:
    """True when the job finished: manifest and sizes present, and every shard in sizes.json exists."""
    fs, base = shards.resolve(dir_or_uri, filesystem)
    if not (shards.exists(fs, shards.join(base, MANIFEST)) and shards.exists(fs, shards.join(base, SIZES))):
        return False
    try:
        sizes = json.loads(shards.read_bytes(fs, shards.join(base, SIZES)))
    except (OSError, ValueError):
        return False
    return all(shards.exists(fs, shards.join(base, name)) for name in sizes)
