"""PhraseCut's files as they are on disk: the metadata file names, the fields of a raw task, and the image
entry that the listing (:mod:`pipeline.listing`) builds and the reader (:mod:`pipeline.phrasecut`) loads.

Other layouts (:mod:`pipeline.refer`) hand the listing raw tasks of the same form, plus ``rles``."""

from __future__ import annotations

import dataclasses
from typing import Any

from pipeline.schema import QuarantineRecord
from pipeline.validate import is_number

METADATA_FILES = ("image_data_split.json", "image_data_split3000.json")
TASK_KEYS = ("task_id", "image_id", "ann_ids", "Polygons", "instance_boxes", "phrase", "phrase_structure")


@dataclasses.dataclass
class ImageEntry:
    """One image of a split and its raw tasks, as listed from the JSON files (no pixels read yet).

    ``meta`` is the image's row of ``image_data_split.json`` (None when it has none). ``issues`` carries the
    quarantine rows found while listing (bad schema, duplicate ids); :func:`load_image_record` passes them on
    so all quarantine flows through one place. Tasks whose image_id is itself unusable are collected in one
    entry with ``image_id=None``.

    Where the image is: PhraseCut's ``images/{image_id}.jpg`` under the dataset root handed to the reader;
    for COCO layouts ``file_name`` (the metadata row's, e.g. ``COCO_train2014_000000581857.jpg``) under
    ``image_root``, a folder of its own. ``meta_file`` names the metadata file in quarantine rows.
    """

    image_id: int | str | None
    split: str
    meta: dict[str, Any] | None
    tasks: list[dict[str, Any]]
    source_file: str
    issues: list[QuarantineRecord] = dataclasses.field(default_factory=list)
    meta_file: str = METADATA_FILES[0]
    file_name: str | None = None
    image_root: str | None = None

    @property
    def image_file(self) -> str:
        """The image's path relative to the folder it is read from."""
        return self.file_name if self.file_name is not None else f"images/{self.image_id}.jpg"


def schema_error(task: Any, *, with_rles: bool = False) -> str | None:
    """Why ``task`` does not have PhraseCut's task fields with the right types (None when it does).

    ``with_rles`` (COCO layouts): the task also has ``rles``, a list of ``{"size", "counts"}`` objects
    (checked in full by the reader), and ``Polygons`` may be empty.
    """
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
    if with_rles:
        rles = task.get("rles")
        if not isinstance(rles, list) or not all(
            isinstance(r, dict) and isinstance(r.get("size"), list) and isinstance(r.get("counts"), str)
            for r in rles
        ):
            return "rles is not a list of {size, counts} objects"
    polygons = task["Polygons"]
    if not isinstance(polygons, list) or not (polygons or with_rles):
        return "Polygons is not a non-empty list of instances"
    for i, instance in enumerate(polygons):
        if not isinstance(instance, list):
            return f"Polygons[{i}] is not a list of polygons"
        for j, polygon in enumerate(instance):
            if not isinstance(polygon, list) or not all(
                isinstance(p, list | tuple) and len(p) == 2 and is_number(p[0]) and is_number(p[1])
                for p in polygon
            ):
                return f"Polygons[{i}][{j}] is not a list of [x, y] number pairs"
    boxes = task["instance_boxes"]
    if not isinstance(boxes, list) or not all(
        isinstance(b, list | tuple) and len(b) == 4 and all(is_number(v) for v in b) for b in boxes
    ):
        return "instance_boxes is not a list of [x, y, w, h]"
    return None
