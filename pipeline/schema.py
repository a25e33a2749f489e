"""The sample schema shared by the reader, the shard writer, the prompt generator and the loaders.

One WebDataset sample per image::

    __key__  "{source}_{image_id}"            (no dots: Ray Data and webdataset split keys on dots)
    jpg      the image bytes (untouched, or re-encoded once when the longer side is capped)
    json     ImageRecord.to_json(): image metadata plus "tasks"

Polygons are kept per instance, as PhraseCut stores them: ``polygons[instance][polygon][point] = [x, y]``
in pixels of the stored image (``width × height``); ``orig_width × orig_height`` is the size the
official metrics are computed at. Instances that polygons cannot express (COCO crowd regions) are kept as
COCO compressed RLEs in ``rles``: ``{"size": [orig_height, orig_width], "counts": "<ascii>"}``, always at the
ORIGINAL image size (they are not rescaled with the image). A task's target is the union of both lists;
a task with neither has no target (a negative prompt, or a gRefCOCO no-target expression).
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

from segvlm.vocabulary import PHRASE_TYPES  # noqa: F401  (re-exported: the records' phrase types)

TASK_KINDS = ("original", "template", "recomposed", "relation_rewrite", "negative")
_KEY_SAFE = re.compile(r"[^A-Za-z0-9_\-]")


def make_key(source: str, image_id: int | str) -> str:
    """``{source}_{image_id}`` with anything but letters, digits, ``_`` and ``-`` replaced by ``-``."""
    return _KEY_SAFE.sub("-", f"{source}_{image_id}")


@dataclasses.dataclass
class Task:
    """One referring expression and its target (the union of ``polygons`` and ``rles``; empty: no target)."""

    task_id: str
    phrase: str
    polygons: list[list[list[list[float]]]]
    boxes: list[list[float]] = dataclasses.field(default_factory=list)
    phrase_structure: dict[str, Any] | None = None
    kind: str = "original"
    source_task_id: str | None = None  # for generated prompts: the original task they derive from
    # instances as COCO compressed RLE at the original image size (see the module docstring)
    rles: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    @property
    def phrase_type(self) -> str | None:
        return (self.phrase_structure or {}).get("type")

    @property
    def num_instances(self) -> int:
        return len(self.polygons) + len(self.rles or [])

    @property
    def has_target(self) -> bool:
        return bool(self.polygons) or bool(self.rles)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Task:
        task = cls(**{f.name: data.get(f.name) for f in dataclasses.fields(cls) if f.name in data})
        if task.rles is None:
            task.rles = []
        return task


@dataclasses.dataclass
class ImageRecord:
    """One image and all its tasks: exactly one shard sample."""

    source: str
    image_id: int | str
    split: str
    width: int
    height: int
    tasks: list[Task]
    orig_width: int | None = None
    orig_height: int | None = None
    image_path: str | None = None  # where the reader found it; not written to shards

    def __post_init__(self) -> None:
        if self.orig_width is None:
            self.orig_width = self.width
        if self.orig_height is None:
            self.orig_height = self.height

    @property
    def key(self) -> str:
        return make_key(self.source, self.image_id)

    def to_json(self) -> bytes:
        data = {
            "source": self.source,
            "image_id": self.image_id,
            "split": self.split,
            "width": self.width,
            "height": self.height,
            "orig_width": self.orig_width,
            "orig_height": self.orig_height,
            "tasks": [t.to_dict() for t in self.tasks],
        }
        return json.dumps(data, separators=(",", ":"), sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes | str | dict[str, Any]) -> ImageRecord:
        data = json.loads(raw) if isinstance(raw, bytes | str) else dict(raw)
        tasks = [Task.from_dict(t) for t in data.pop("tasks")]
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(tasks=tasks, **{k: v for k, v in data.items() if k in fields})


@dataclasses.dataclass
class QuarantineRecord:
    """A record set aside with its reason; written to ``quarantine.parquet``, never silently dropped."""

    source_file: str
    record: str  # task_id or image_id of the offending record
    reason: str  # a short code, e.g. "missing_image", "size_mismatch" (see pipeline.phrasecut.REASONS)
    detail: str = ""
    image_id: int | str | None = None
    task_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
