"""RefCOCO, RefCOCO+, RefCOCOg (the refer toolkit's layout) and gRefCOCO: one task per referring sentence.

Layout (ROOT is the toolkit's ``data/<dataset>`` folder)::

    ROOT/refs({split_by}).p    refcoco (unc, google), refcoco+ (unc), refcocog (umd, google): a pickle
                               (Python 2, protocol 2) of a list of refs {ref_id, ann_id, image_id, split,
                               sentences: [{sent_id, sent, raw, tokens}], sent_ids, category_id, file_name}
    ROOT/grefs(unc).json       grefcoco: a JSON list of such refs whose ann_id is a list (several targets),
                               [-1] with no_target: true for an expression that refers to nothing
    ROOT/instances.json        COCO: images [{id, file_name, width, height}], annotations [{id, image_id,
                               segmentation, bbox, iscrowd, area, category_id}], categories
    IMAGE_ROOT/{file_name}     COCO train2014 images; IMAGE_ROOT defaults to ROOT/../images/mscoco/images/train2014

A ref of the split becomes one raw task per sentence, in the form the PhraseCut listing stores: task_id =
the sentence id, phrase = ``sent``, ``Polygons`` empty, and ``rles``: one COCO compressed RLE per target
annotation at the original image size, made by pycocotools exactly as the toolkits' ``annToMask``/``getMask``
make the ground truth (polygons: ``frPyObjects`` + ``merge``; an uncompressed crowd RLE: ``frPyObjects``; a
compressed one as it is). The masks are therefore bit-identical to what RefCOCO/gRefCOCO evaluators score
against; PhraseCut's polygon rasteriser (which draws the outline too) would grow every COCO mask by about a
pixel all round. A gRefCOCO no-target expression is a task with neither polygons nor RLEs.

Memory: the refs pickle and ``instances.json`` are loaded whole on the driver (refcoco's are tens of MB),
gRefCOCO's JSON is streamed; the tasks go to a :class:`~pipeline.listing.Listing` (SQLite on local
scratch) like PhraseCut's. Every record is hostile input: a ref or sentence that cannot be read, a missing
image or annotation, an annotation of another image, a malformed polygon or RLE is a quarantine row naming
the file and the record; the listing adds repeated sentence ids and schema checks, the image loader
(:func:`pipeline.phrasecut.load_image_record`) the image, size, text and RLE checks. A pickle is read only
through :func:`pipeline.safe_pickle.load_plain_pickle` (plain data, never code).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Iterable, Iterator
from typing import Any

from pipeline.jsonstream import iter_json_list
from pipeline.listing import Feed, Listing
from pipeline.phrasecut_format import ImageEntry, schema_error
from pipeline.quarantine import (
    BAD_METADATA,
    BAD_POLYGONS,
    BAD_RLE,
    BAD_SCHEMA,
    MISSING_METADATA,
)
from pipeline.safe_pickle import load_plain_pickle
from pipeline.schema import QuarantineRecord
from pipeline.validate import _show, coco_polygon_error, meta_size
from segvlm.masks import rle_error

INSTANCES = "instances.json"
MAX_INSTANCES_BYTES = 1 << 30  # read whole: refcoco's is tens of MB, all of COCO train2014's about 450 MB
NO_TARGET_SOURCES = ("grefcoco",)  # sources whose expressions may refer to nothing


@dataclasses.dataclass(frozen=True)
class ReferDataset:
    """A dataset of this layout: its split-bys (the first is the default) and how its refs are stored."""

    name: str
    split_bys: tuple[str, ...]
    multi_target: bool = False  # gRefCOCO: grefs({split_by}).json, ann_id lists, no-target expressions

    def refs_file(self, split_by: str) -> str:
        return f"grefs({split_by}).json" if self.multi_target else f"refs({split_by}).p"


DATASETS = {
    "refcoco": ReferDataset("refcoco", ("unc", "google")),
    "refcoco+": ReferDataset("refcoco+", ("unc",)),
    "refcocog": ReferDataset("refcocog", ("umd", "google")),
    "grefcoco": ReferDataset("grefcoco", ("unc",), multi_target=True),
}


def resolve_split_by(name: str, split_by: str | None) -> str:
    """``split_by``, or the dataset's default; ValueError for a split-by the dataset does not have."""
    dataset = DATASETS[name]
    if split_by is None:
        return dataset.split_bys[0]
    if split_by not in dataset.split_bys:
        raise ValueError(
            f"--split-by {split_by!r}: {name} is split by {', '.join(dataset.split_bys)} only "
            f"(refs files {', '.join(dataset.refs_file(s) for s in dataset.split_bys)})"
        )
    return split_by


def default_image_root(root: str | os.PathLike[str]) -> str:
    """The refer toolkit's image folder for a dataset folder ``ROOT``: ``ROOT/../images/mscoco/images/train2014``."""
    return os.path.normpath(os.path.join(os.fspath(root), "..", "images", "mscoco", "images", "train2014"))


# ------------------------------------------------------------------------------------------ the files


@dataclasses.dataclass
class Instances:
    """``instances.json`` indexed by id (a repeated id: the last wins, as the COCO and refer toolkits index)."""

    images: dict[int, dict[str, Any]]
    annotations: dict[int, dict[str, Any]]


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def load_instances(path: str | os.PathLike[str], max_bytes: int = MAX_INSTANCES_BYTES) -> Instances:
    """Read ``instances.json`` whole (at most ``max_bytes``); ValueError naming the file when it is not a
    COCO object with ``images`` and ``annotations`` lists. Rows without an int ``id`` cannot be referred
    to and are left out."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ValueError(f"{path}: larger than the limit of {max_bytes} bytes")
    try:
        coco = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: invalid UTF-8 at byte {err.start}") from err
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}") from err
    except RecursionError as err:
        raise ValueError(f"{path}: JSON nested too deeply to read") from err
    if not isinstance(coco, dict) or not all(
        isinstance(coco.get(k), list) for k in ("images", "annotations")
    ):
        raise ValueError(f"{path}: not a COCO object with 'images' and 'annotations' lists")
    return Instances(
        images={row["id"]: row for row in coco["images"] if isinstance(row, dict) and _is_id(row.get("id"))},
        annotations={a["id"]: a for a in coco["annotations"] if isinstance(a, dict) and _is_id(a.get("id"))},
    )


def iter_refs(path: str) -> Iterator[Any]:
    """The refs of a refs file: a pickle (plain data only, read whole) or gRefCOCO's JSON list (streamed)."""
    if path.endswith(".json"):
        yield from iter_json_list(path)
        return
    refs = load_plain_pickle(path)
    if not isinstance(refs, list):
        raise ValueError(f"{path}: the pickle holds a {type(refs).__name__}, not a list of refs")
    yield from refs


def metadata_rows(instances: Instances) -> Iterator[dict[str, Any]]:
    """The image rows a listing attaches to its images (values as they are: the image loader checks them)."""
    for image_id, row in instances.images.items():
        yield {
            "image_id": image_id,
            "width": row.get("width"),
            "height": row.get("height"),
            "file_name": row.get("file_name"),
        }


# ----------------------------------------------------------------------------------------------- masks


class AnnotationError(ValueError):
    """An annotation that cannot become a mask: ``reason`` (a quarantine code) and the message."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def annotation_rle(segmentation: Any, width: int, height: int) -> dict[str, Any]:
    """The COCO compressed RLE (``{"size": [height, width], "counts": str}``) of one annotation's segmentation
    on its ``width × height`` image, as the toolkits' ``annToRLE`` makes it; raises :class:`AnnotationError`.

    Everything is checked before pycocotools sees it (it trusts its input, see :mod:`segvlm.masks`):
    polygons by :func:`pipeline.validate.coco_polygon_error`, RLE sizes against the image, runs summing to
    height × width.
    """
    from pycocotools import mask as coco_mask

    if isinstance(segmentation, list):
        error = coco_polygon_error(segmentation, width, height)
        if error:
            raise AnnotationError(BAD_POLYGONS, error)
        polygons = [[float(v) for v in polygon] for polygon in segmentation]
        rle = coco_mask.merge(coco_mask.frPyObjects(polygons, height, width))
    elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
        counts, size = segmentation["counts"], segmentation.get("size")
        if not all(_is_id(c) and 0 <= c < 2**32 for c in counts):
            raise AnnotationError(BAD_RLE, "the uncompressed RLE counts are not non-negative integers")
        if not (isinstance(size, list) and len(size) == 2 and all(map(_is_id, size))):
            raise AnnotationError(BAD_RLE, f"the RLE size {_show(size)} is not [height, width]")
        rle = coco_mask.frPyObjects({"size": size, "counts": counts}, height, width)
    elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), str):
        rle = {"size": segmentation.get("size"), "counts": segmentation["counts"]}
    else:
        raise AnnotationError(BAD_SCHEMA, "the segmentation is neither a list of polygons nor an RLE object")
    counts = rle["counts"]
    out = {
        "size": [int(v) for v in rle["size"]] if isinstance(rle["size"], list | tuple) else rle["size"],
        "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts,
    }
    error = rle_error(out, height, width)
    if error:
        raise AnnotationError(BAD_RLE, error)
    return out


def _bbox(rle: dict[str, Any]) -> list[float]:
    from pycocotools import mask as coco_mask

    encoded = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
    return [float(v) for v in coco_mask.toBbox(encoded)]


# ----------------------------------------------------------------------------------------------- refs


@dataclasses.dataclass(frozen=True)
class _Problem:
    """Why every sentence of a ref is set aside (a quarantine code, the file to blame, the message)."""

    reason: str
    source_file: str
    why: str


def _target_ids(ref: dict[str, Any], dataset: ReferDataset) -> list[int] | _Problem:
    """The ref's annotation ids ([] for a no-target expression)."""
    ann_id = ref.get("ann_id")
    if not dataset.multi_target:
        if _is_id(ann_id) and ann_id >= 0:
            return [ann_id]
        why = f"ann_id {_show(ann_id)} is not an annotation id (lists of targets are gRefCOCO's)"
        return _Problem(BAD_SCHEMA, "", why)
    ids = ann_id if isinstance(ann_id, list) else [ann_id]
    no_target = ref.get("no_target", ids == [-1])
    if not ids or not all(_is_id(a) for a in ids) or not isinstance(no_target, bool):
        return _Problem(
            BAD_SCHEMA, "", f"ann_id {_show(ann_id)} / no_target {_show(no_target)} are not ids / a bool"
        )
    if ids == [-1] and no_target:
        return []
    if no_target or any(a < 0 for a in ids) or len(set(ids)) != len(ids):
        return _Problem(
            BAD_SCHEMA, "", f"ann_id {_show(ann_id)} with no_target {no_target} is neither [-1] (and no_target) "
            "nor a list of distinct annotation ids",
        )  # fmt: skip
    return ids


def _resolve(
    ref: dict[str, Any], image_id: int, dataset: ReferDataset, instances: Instances, names: tuple[str, str]
) -> tuple[list[int], list[dict[str, Any]], list[list[float]]] | _Problem:
    """``(ann_ids, rles, boxes)`` of a ref of image ``image_id``, or why its sentences are set aside."""
    refs_file, meta_file = names
    ids = _target_ids(ref, dataset)
    if isinstance(ids, _Problem):
        return dataclasses.replace(ids, source_file=refs_file)
    row = instances.images.get(image_id)
    if row is None:
        return _Problem(MISSING_METADATA, refs_file, f"image_id {image_id} is not in {meta_file}")
    size, error = meta_size(row)
    if size is None:
        return _Problem(BAD_METADATA, meta_file, f"image {image_id} in {meta_file}: {error}")
    width, height = size
    rles, boxes = [], []
    for ann_id in ids:
        ann = instances.annotations.get(ann_id)
        if ann is None:
            return _Problem(MISSING_METADATA, refs_file, f"ann_id {ann_id} is not in {meta_file}")
        if ann.get("image_id") != image_id:
            why = (
                f"annotation {ann_id} in {meta_file} is of image {_show(ann.get('image_id'))}, not {image_id}"
            )
            return _Problem(MISSING_METADATA, refs_file, why)
        try:
            rle = annotation_rle(ann.get("segmentation"), width, height)
        except AnnotationError as err:
            return _Problem(err.reason, meta_file, f"annotation {ann_id} in {meta_file}: {err}")
        rles.append(rle)
        boxes.append(_bbox(rle))
    return ids, rles, boxes


Item = tuple[dict[str, Any] | QuarantineRecord, str]  # (raw task or quarantine row, label): see Feed


def iter_split_items(
    refs: Iterable[Any], instances: Instances, *, dataset: str, split: str, refs_file: str
) -> Iterator[Item]:
    """The listing items of the refs of ``split``: one per sentence (see :class:`~pipeline.listing.Feed`).

    A ref too broken to have a split is one quarantine row in every split (it is nobody's, and must not
    vanish). Raises ValueError, after the last ref, when no ref has this split, listing the splits present.
    """
    present: set[str] = set()
    for index, ref in enumerate(refs):
        if not isinstance(ref, dict) or not isinstance(ref.get("split"), str):
            where = f"ref #{index} in {refs_file}"
            why = (
                "not an object"
                if not isinstance(ref, dict)
                else f"split {_show(ref.get('split'))} is no string"
            )
            yield QuarantineRecord(refs_file, f"#{index}", BAD_SCHEMA, f"{where}: {why}"), where
            continue
        present.add(ref["split"])
        if ref["split"] == split:
            yield from _ref_items(index, ref, DATASETS[dataset], instances, refs_file)
    if split not in present:
        raise ValueError(
            f"{refs_file}: no ref of split {split!r}; the splits present are "
            f"{', '.join(sorted(present)) or 'none (no readable ref)'}"
        )


def _ref_items(
    index: int, ref: dict[str, Any], dataset: ReferDataset, instances: Instances, refs_file: str
) -> Iterator[Item]:
    """The items of one ref (the ``index``-th of the file): a task per sentence, or why it is set aside."""
    where = f"ref {_show(ref.get('ref_id'))} (#{index} in {refs_file})"
    image_id, sentences = ref.get("image_id"), ref.get("sentences")
    if not _is_id(image_id):
        target: Any = _Problem(BAD_SCHEMA, refs_file, f"image_id {_show(image_id)} is not an int")
        image_id = None
    else:
        target = _resolve(ref, image_id, dataset, instances, (refs_file, INSTANCES))
    if not isinstance(sentences, list):
        yield (
            QuarantineRecord(refs_file, f"#{index}", BAD_SCHEMA, f"{where}: sentences is no list", image_id),
            where,
        )
        return
    for j, sentence in enumerate(sentences):
        sent_id = sentence.get("sent_id") if isinstance(sentence, dict) else None
        if not isinstance(sent_id, int | str) or isinstance(sent_id, bool):
            why = f"sentence #{j} of {where}: not an object with an int or string sent_id"
            yield QuarantineRecord(refs_file, f"#{index}.{j}", BAD_SCHEMA, why, image_id), where
            continue
        task_id, label = str(sent_id), f"sentence {_show(sent_id)} of {where}"
        if isinstance(target, _Problem):
            detail = f"{label}: {target.why}"
            yield (
                QuarantineRecord(target.source_file, task_id, target.reason, detail, image_id, task_id),
                label,
            )
            continue
        ann_ids, rles, boxes = target
        task = {
            "task_id": task_id,
            "image_id": image_id,
            "ann_ids": list(ann_ids),
            "Polygons": [],
            "instance_boxes": [list(b) for b in boxes],
            "phrase": sentence.get("sent"),
            "phrase_structure": None,
            "rles": [dict(r) for r in rles],
        }
        yield task, label


def refer_listing(
    root: str | os.PathLike[str],
    split: str,
    dataset: str,
    *,
    split_by: str | None = None,
    image_root: str | os.PathLike[str] | None = None,
    scratch: str | None = None,
) -> Listing:
    """The :class:`~pipeline.listing.Listing` of one split of a refer-layout folder (see the module docstring).

    ``image_root`` defaults to :func:`default_image_root`. Raises ValueError for an unknown dataset,
    split-by or split, FileNotFoundError for a missing refs file, ``instances.json`` or image folder, and
    the errors of :func:`iter_refs`/:func:`load_instances` for unreadable files (the file named).
    """
    if dataset not in DATASETS:
        raise ValueError(f"unknown refer dataset {dataset!r}; one of {', '.join(DATASETS)}")
    root = os.fspath(root)
    split_by = resolve_split_by(dataset, split_by)
    refs_file = DATASETS[dataset].refs_file(split_by)
    refs_path = os.path.join(root, refs_file)
    if not os.path.isfile(refs_path):
        raise FileNotFoundError(f"{refs_path} does not exist ({dataset} split by {split_by} reads it)")
    images = os.path.abspath(image_root if image_root is not None else default_image_root(root))
    if not os.path.isdir(images):
        raise FileNotFoundError(f"image folder {images} does not exist (give --image-root)")
    instances = load_instances(os.path.join(root, INSTANCES))
    feed = Feed(
        items=iter_split_items(
            iter_refs(refs_path), instances, dataset=dataset, split=split, refs_file=refs_file
        ),
        metadata=metadata_rows(instances),
        source_file=refs_file,
        meta_file=INSTANCES,
        image_root=images,
        schema=functools.partial(schema_error, with_rles=True),
    )
    return Listing(root, split, source=dataset, scratch=scratch, feed=feed)


def list_refer_images(
    root: str | os.PathLike[str],
    split: str,
    dataset: str,
    *,
    split_by: str | None = None,
    image_root: str | os.PathLike[str] | None = None,
) -> list[ImageEntry]:
    """Every image entry of the split, in order of first appearance (in memory: tests and small data)."""
    with refer_listing(root, split, dataset, split_by=split_by, image_root=image_root) as listing:
        return list(listing.entries(order="first"))
