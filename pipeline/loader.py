"""WebDataset loaders for training and evaluation (open_clip's ``get_wds_dataset`` is the model).

Shards hold one sample per image: ``jpg`` bytes and ``json`` = ``ImageRecord.to_json()``. Both
loaders read only those two members — ``select_files`` drops every other tar member *before it is read*,
so nothing is ever unpickled or handed to webdataset's auto-decoders — and expand each image into one
item per task, decoding the JPEG once per image.

Training (``make_train_loader``)
    ``resampled`` shards (drawn with replacement, per rank and loader worker, seeded) → image-level shuffle
    of the raw samples → optional phrase-type balancing → negatives mixed in at ``negative_rate`` →
    CLIPSeg augmentation (random square crop keeping ≥ 5% of the object, resize; optionally a horizontal
    flip with ``left`` ↔ ``right`` swapped in the phrase, ``hflip``) → task-level
    shuffle → batches. With ``phrases_per_image = k > 1`` up to k tasks of an image share one crop and sit
    next to each other (no task-level shuffle), so a batch holds each image once and the model encodes
    it once for all its phrases (``image_index``).
    The stream is endless, and every rank takes exactly ``steps_per_epoch`` batches
    from it (split over its loader workers), so all ranks run the same number of steps however uneven the
    shards are (unequal batch counts hang DDP). Without ``steps_per_epoch``/``samples_per_epoch``
    the loader is infinite (``next()`` it for as long as you train).

Evaluation (``make_eval_loader``)
    Every task exactly once over all ranks and workers, no resampling, no shuffling, no crop: see
    ``eval_assignment``. Ranks may receive different numbers of batches: the caller must not run a
    collective inside the evaluation loop (accumulate metric sums, all-reduce once after it).

Batches are dicts (layouts in ``collate_train`` / ``collate_eval``). Batching happens inside the dataset
(webdataset style) and the ``DataLoader`` runs with ``batch_size=None``.

Ranks are passed explicitly (``rank``, ``world_size``) instead of webdataset's environment lookup, so the
same code runs under Ray Train, torchrun, or a test that simulates ranks in one process.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import posixpath
import re
import sys
import tarfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import islice
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline import storage
from pipeline.augment import mirror_phrase, random_object_crop
from pipeline.grammar import target_words
from pipeline.schema import PHRASE_TYPES, ImageRecord, Task
from pipeline.validate import LOADER_MAX_MEMBER_BYTES, check_sample_sizes
from segvlm.config import ConfigError
from segvlm.masks import polygons_at_original_size
from segvlm.preprocess import (
    TokenizeFn,
    crop_resize,
    decode_image,
    normalize_uint8_batch,
    pil_to_uint8_array,
    region_mask,
    target_mask_array,
)

__all__ = [
    "DataConfig",
    "LoaderInfo",
    "ShardSource",
    "collate_eval",
    "collate_train",
    "eval_assignment",
    "list_shards",
    "make_eval_loader",
    "make_train_loader",
]

_MEMBERS = ("jpg", "json")  # the only tar members ever read
# A shard member is read whole into memory: cap what its tar header may ask for (prepare's images are at
# most PrepareConfig.max_image_bytes, itself capped at this).
MAX_MEMBER_BYTES = LOADER_MAX_MEMBER_BYTES


@dataclasses.dataclass(frozen=True)
class ShardSource:
    """One data set of a training mixture: a folder or URI written by ``segvlm prepare``, its sampling
    weight (relative: ``DataConfig.train_sources`` normalises the weights to sum 1) and its split
    (``""``: ``data.train_split``)."""

    path: str = ""
    weight: float = 1.0
    split: str = ""


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the shards are and how the loaders read them (``pipeline.loader``).

    ``train_shards`` is one folder or URI written by ``segvlm prepare`` (with ``manifest.parquet``), or a
    weighted mixture of several: a list of ``{path, weight, split}`` (``ShardSource``; ``weight`` defaults
    to 1, ``split`` to ``train_split``). Every training image is drawn from source d with probability
    weight_d / Σ weights, however many images each source holds. In YAML::

        train_shards:
          - {path: s3://b/refcoco/train, weight: 0.8}
          - {path: shards/gref, weight: 0.2}

    and on the command line the same list in YAML's one-line form (override values are read as YAML;
    quote it for the shell)::

        data.train_shards='[{path: s3://b/refcoco/train, weight: 0.8}, {path: shards/gref, weight: 0.2}]'
    """

    # a folder/URI, or a mixture of them (see the class docstring)
    train_shards: str | tuple[ShardSource, ...] = ""
    val_shards: str = ""  # empty: no validation
    train_split: str = "train"
    val_split: str = "val"
    negative_rate: float = 0.2
    phrase_type_balance: bool = False
    num_workers: int = 1  # DataLoader workers per training worker
    shuffle_buffer: int = 1000  # raw image samples (compressed bytes, cheap), per mixture source
    # augmented tasks (uint8 3×S×S each, ~0.37 MB at 352 px, per DataLoader worker); unused when
    # phrases_per_image > 1, as tasks sharing an image must stay adjacent
    task_shuffle_buffer: int = 256
    # side of CLIPSeg's random square crop as a share of the shorter image side; (1, 1) turns cropping off,
    # which phrases about relations and superlatives ("the largest circle") need on small scenes
    crop_scale: tuple[float, float] = (0.5, 1.0)
    # a crop keeps at least this share of its target's pixels (CLIPSeg's rule)
    min_object_fraction: float = 0.05
    # > 1: up to this many phrases of an image share its crop in a batch and the image is encoded once for
    # all of them; cheaper per task, and each batch shows the same pixels under different phrases
    phrases_per_image: int = 1
    # probability of a horizontal flip of a training crop, its phrases mirrored with it (left <-> right)
    hflip: float = 0.0

    def validate(self) -> None:
        if not isinstance(self.train_shards, str):
            self._validate_mixture()
        if not 0.0 <= self.hflip <= 1.0:
            raise ConfigError(f"data.hflip must lie in [0, 1], got {self.hflip}")
        if self.phrases_per_image < 1:
            raise ConfigError(f"data.phrases_per_image must be >= 1, got {self.phrases_per_image}")
        if not 0 <= self.negative_rate < 1:
            raise ConfigError(f"data.negative_rate must lie in [0, 1), got {self.negative_rate}")
        if self.num_workers < 0:
            raise ConfigError("data.num_workers must be >= 0")
        low, high = self.crop_scale
        if not 0 < low <= high <= 1:
            raise ConfigError(f"data.crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}")
        if not 0.0 <= self.min_object_fraction <= 1.0:
            raise ConfigError(f"data.min_object_fraction must lie in [0, 1], got {self.min_object_fraction}")

    def _validate_mixture(self) -> None:
        if not self.train_shards:
            raise ConfigError("data.train_shards: a mixture needs at least one {path, weight} source")
        seen: set[tuple[str, str]] = set()
        for i, source in enumerate(self.train_shards):
            where = f"data.train_shards[{i}]"
            if not isinstance(source, ShardSource):
                raise ConfigError(f"{where}: expected a {{path, weight}} source, got {source!r}")
            if not source.path.strip():
                raise ConfigError(f"{where}.path is empty")
            if isinstance(source.weight, bool) or not math.isfinite(source.weight) or source.weight <= 0:
                raise ConfigError(f"{where}.weight must be a finite number > 0, got {source.weight!r}")
            place = (source.path.rstrip("/"), source.split or self.train_split)
            if place in seen:
                raise ConfigError(f"{where}: {place[0]} (split {place[1]!r}) is already in the mixture")
            seen.add(place)

    def train_sources(self) -> tuple[ShardSource, ...]:
        """The training mixture with weights normalised to sum 1 and every split filled in; a plain
        ``train_shards`` string is a mixture of one. Call after ``validate``."""
        if isinstance(self.train_shards, str):
            return (ShardSource(self.train_shards, 1.0, self.train_split),)
        total = math.fsum(s.weight for s in self.train_shards)
        return tuple(
            ShardSource(s.path, s.weight / total, s.split or self.train_split) for s in self.train_shards
        )


# ----------------------------------------------------------------------------------------------- shards


def list_shards(
    urls_or_dir: str | os.PathLike | Sequence[str], split: str = "train"
) -> tuple[list[str], dict]:
    """Shard locations and ``{shard basename: samples}`` (empty when unknown).

    ``urls_or_dir`` is a folder, local or a URI (``s3://bucket/phrasecut/train``; shards ``{split}-*.tar``,
    listed from its ``sizes.json`` when present, else from the folder), a single shard, a webdataset brace
    pattern (``dir/train-{000000..000009}.tar``) or a list of those. Locations keep their kind: shards of an
    ``s3://`` folder are ``s3://`` URIs, opened later by ``pipeline.storage.open_input`` in the loader
    worker. ``pipe:`` and unknown schemes raise ``pipeline.storage.StorageError``. The list is sorted, so
    every rank and worker sees the same order.
    """
    sizes: dict[str, int] = {}
    if isinstance(urls_or_dir, str | os.PathLike):
        location = storage.check_location(urls_or_dir)
        if not storage.is_uri(location):  # loader workers may run in another folder
            location = os.path.abspath(location)
        pattern = re.compile(rf"^{re.escape(split)}-\d+\.tar$")
        if "{" not in location and storage.is_dir(location):
            sizes_path = storage.join(location, "sizes.json")
            if storage.exists(sizes_path):
                all_sizes = json.loads(storage.read_bytes(sizes_path))
                sizes = {
                    posixpath.basename(name): int(n)
                    for name, n in all_sizes.items()
                    if pattern.match(posixpath.basename(name))
                }
                urls = sorted(storage.join(location, name) for name in sizes)
            else:
                urls = sorted(u for u in storage.list_files(location) if pattern.match(storage.name(u)))
        else:
            urls = sorted(wds.shardlists.expand_urls(location))
    else:
        urls = sorted(storage.check_location(u) for u in urls_or_dir)
    if not urls:
        raise FileNotFoundError(f"no {split!r} shards found in {urls_or_dir!r}")
    return urls, sizes


def folder_split(location: str | os.PathLike) -> str:
    """The one split whose shards (``{split}-NNNNNN.tar``) a folder written by ``segvlm prepare`` holds,
    from its ``sizes.json`` or its listing; ``ValueError`` naming the folder when it holds none or several
    (then the split must be given)."""
    from pipeline.shards import parse_shard_name

    location = storage.check_location(location)
    if not storage.is_uri(location):
        location = os.path.abspath(location)
    if not storage.is_dir(location):
        raise ValueError(f"{location} is not a folder of shards; give the split")
    sizes_path = storage.join(location, "sizes.json")
    if storage.exists(sizes_path):
        names = list(json.loads(storage.read_bytes(sizes_path)))
    else:
        names = [storage.name(u) for u in storage.list_files(location)]
    splits = sorted({parsed[0] for name in names if (parsed := parse_shard_name(name)) is not None})
    if len(splits) != 1:
        found = ", ".join(splits) if splits else "no shards"
        raise ValueError(f"{location} holds {found}; give the split")
    return splits[0]


def _open_shards(
    sources: Iterable[dict[str, Any]], handler: Callable[[Exception], bool] = wds.reraise_exception
) -> Iterator[dict[str, Any]]:
    """``{"url"}`` -> ``{"url", "stream"}`` through ``pipeline.storage`` (local files, S3, GCS...), never
    webdataset's ``gopen`` (which has no S3 and runs ``pipe:`` URLs in a shell). Each stream is closed when
    the next shard is requested."""
    for source in sources:
        url = source["url"]
        try:
            stream = storage.open_input(url)
        except Exception as exn:
            exn.args = (*exn.args, url)
            if handler(exn):
                continue
            break
        try:
            yield {**source, "stream": stream}
        finally:
            stream.close()


def _select_members(fname: str) -> bool:
    """Keep only ``<key>.jpg`` and ``<key>.json``: other members (``x.pickle``…) are skipped unread."""
    return fname.rsplit(".", 1)[-1].lower() in _MEMBERS if "." in fname else False


def _capped_members(sources: Iterable[dict[str, Any]], handler: Any) -> Iterator[dict[str, Any]]:
    """webdataset's ``tar_file_expander`` with a size check: a selected member larger than
    ``MAX_MEMBER_BYTES`` (the size its tar header states) raises before a single byte of it is read."""
    for source in sources:
        try:
            with tarfile.open(fileobj=source["stream"], mode="r|*") as stream:
                for info in stream:
                    try:
                        if not info.isreg() or not _select_members(info.name):
                            continue
                        if info.size > MAX_MEMBER_BYTES:
                            raise ValueError(
                                f"{info.name} in {source['url']}: {info.size} bytes, over the {MAX_MEMBER_BYTES} "
                                "a shard member may have"
                            )
                        data = stream.extractfile(info).read()
                        stream.members = []  # streaming: keep no index of what was read
                        yield {"fname": info.name, "data": data, "__url__": source["url"]}
                    except Exception as exn:
                        if not handler(exn):
                            raise
            yield {}  # end of shard: samples of two shards never merge
        except Exception as exn:
            if not handler(exn):
                raise


def _read_tar_samples(src: Iterable[dict[str, Any]], handler: Any = wds.reraise_exception):
    """URLs -> samples, as ``wds.tarfile_to_samples`` with ``select_files=_select_members``, plus the
    member size cap (``_capped_members``)."""
    streams = _open_shards(src, handler)  # pyarrow.fs (local, s3://...), never webdataset's gopen
    return wds.tariterators.group_by_keys(_capped_members(streams, handler), handler=handler)


_tarfile_to_samples = wds.filters.pipelinefilter(_read_tar_samples)


class _ErrorBudget:
    """webdataset handler for training: warn and skip a broken shard or sample, but raise after
    ``limit`` consecutive failures, so an endless resampled stream over broken data cannot spin forever."""

    def __init__(self, limit: int = 50) -> None:
        self.limit = limit
        self.failures = 0

    def ok(self) -> None:
        self.failures = 0

    def __call__(self, exn: Exception) -> bool:
        self.failures += 1
        if self.failures > self.limit:
            raise RuntimeError(f"{self.failures} consecutive shard/sample errors; last: {exn!r}") from exn
        print(f"[segvlm.loader] skipping after error: {exn!r}", file=sys.stderr)
        return True


def _parse(sample: dict[str, Any]) -> tuple[str, bytes, ImageRecord]:
    """``(key, jpg bytes, record)`` of a raw tar sample; raises if a member is missing, or if a size in it
    (the record's, or the image header's) is beyond what may be allocated (``check_sample_sizes``):
    crop boxes, masks and the decode all allocate from those sizes."""
    missing = [m for m in _MEMBERS if m not in sample]
    if missing:
        raise ValueError(f"sample {sample.get('__key__')!r} in {sample.get('__url__')!r} lacks {missing}")
    record = ImageRecord.from_json(sample["json"])
    check_sample_sizes(record, sample["jpg"])
    return sample["__key__"], sample["jpg"], record


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


# ----------------------------------------------------------------------------------------------- collate


def _stack_masks(items: list[dict[str, Any]]) -> torch.Tensor:
    """``1×S×S`` uint8 masks -> ``B×1×S×S`` float32."""
    return torch.from_numpy(np.stack([it["mask"] for it in items]).astype(np.float32))


def collate_train(items: list[dict[str, Any]], tokenizer: TokenizeFn) -> dict[str, Any]:
    """Training batch (B tasks on N ≤ B distinct image crops, S = image size)::

    pixel_values   N×3×S×S float32, CLIP-normalised, each crop once
    image_index    B int64: task b's image is ``pixel_values[image_index[b]]``
    input_ids      B×L int64          attention_mask  B×L int64
    masks          B×1×S×S float32 in {0, 1}
    phrase, task_id, phrase_type, kind, key: lists of length B (phrase as the model sees it: mirrored
                   when flipped)
    target_words   list of B strings: the attributes and name of the phrase's subject ("red triangle",
                   from ``phrase_structure``), what the word losses ask the target to be called;
                   "" for negatives and tasks without a structure
    crop_box       B×4 int64, (x0, y0, x1, y1) in stored-image pixels
    flipped        B bool: the crop (pixels and mask) was mirrored left–right after cropping
    source         B int64: the task's image came from ``data.train_sources()[source]`` (0 without a mixture)

    Items carrying the same ``group`` share one crop (``phrases_per_image > 1``); items without one are
    their own image (N = B).
    """
    tokens = tokenizer([it["phrase"] for it in items])
    slots: dict[Any, int] = {}
    image_index = [slots.setdefault(it.get("group", ("item", i)), len(slots)) for i, it in enumerate(items)]
    first = {slot: i for i, slot in reversed(list(enumerate(image_index)))}
    return {
        "pixel_values": normalize_uint8_batch([items[first[slot]]["pixels"] for slot in range(len(slots))]),
        "image_index": torch.tensor(image_index, dtype=torch.int64),
        "input_ids": torch.as_tensor(tokens["input_ids"]).long(),
        "attention_mask": torch.as_tensor(tokens["attention_mask"]).long(),
        "masks": _stack_masks(items),
        "phrase": [it["phrase"] for it in items],
        "task_id": [it["task_id"] for it in items],
        "phrase_type": [it["phrase_type"] for it in items],
        "kind": [it["kind"] for it in items],
        "key": [it["key"] for it in items],
        "target_words": [it.get("target_words", "") for it in items],
        "crop_box": torch.tensor([it["crop_box"] for it in items], dtype=torch.int64),
        "flipped": torch.tensor([it.get("flipped", False) for it in items], dtype=torch.bool),
        "source": torch.tensor([it.get("source", 0) for it in items], dtype=torch.int64),
    }


def collate_eval(items: list[dict[str, Any]], tokenizer: TokenizeFn) -> dict[str, Any]:
    """Evaluation batch (B items)::

    pixel_values   B×3×S×S float32 (whole image resized to S×S, CLIP-normalised)
    input_ids, attention_mask   B×L int64
    masks          B×1×S×S float32, the target at model resolution (same squeeze as the image)
    orig_height, orig_width     B int64: the size the official metrics are computed at
    height, width  B int64: the stored image size
    polygons       list of B ``[instance][polygon][point] = [x, y]`` in ORIGINAL-image pixels
    rles           list of B lists of COCO compressed RLEs at the original size (``Task.rles``); the GT
                   at the original size is ``rasterize_polygons(polygons, orig_width, orig_height)`` ∪
                   ``decode_rles(rles, orig_height, orig_width)``
    num_instances  B int64 (polygons + RLEs; 0: no target)
    phrase, task_id, phrase_type, kind, key: lists of length B
    """
    tokens = tokenizer([it["phrase"] for it in items])
    out: dict[str, Any] = {
        "pixel_values": normalize_uint8_batch([it["pixels"] for it in items]),
        "input_ids": torch.as_tensor(tokens["input_ids"]).long(),
        "attention_mask": torch.as_tensor(tokens["attention_mask"]).long(),
        "masks": _stack_masks(items),
    }
    for name in ("orig_height", "orig_width", "height", "width", "num_instances"):
        out[name] = torch.tensor([it[name] for it in items], dtype=torch.int64)
    for name in ("polygons", "rles", "phrase", "task_id", "phrase_type", "kind", "key"):
        out[name] = [it[name] for it in items]
    return out


# ----------------------------------------------------------------------------------------------- training


@dataclasses.dataclass
class LoaderInfo:
    """What ``make_train_loader`` decided, for logging and for the training loop."""

    urls: list[str]  # every source's shards
    num_shards: int
    num_images: int | None  # from sizes.json; None when unknown
    batch_size: int
    world_size: int
    rank: int
    num_workers: int
    steps_per_epoch: int | None  # batches per rank per epoch (identical on every rank); None = endless
    batches_per_worker: list[int] | None  # how the rank's batches are split over its loader workers
    sources: tuple[ShardSource, ...] = ()  # the mixture (``DataConfig.train_sources``), weights summing to 1
    source_images: list[int | None] = dataclasses.field(default_factory=list)  # per source, as num_images


def _split_batches(total: int, workers: int) -> list[int]:
    return [total // workers + (1 if w < total % workers else 0) for w in range(workers)]


class _NegativeSource:
    """Negatives at rate ``r`` among emitted items (CLIPSeg used 0.2).

    For each positive kept, a geometric number of negatives (mean ``r / (1 - r)``) is owed; owed negatives
    are paid from the image's own ``kind == "negative"`` tasks when the shard has them (drawn with
    replacement), otherwise made up here: a phrase of another recent image (a ring buffer of positives
    seen by this worker) whose ``phrase_structure.name`` is not the name of any task of this image and
    does not occur as a word in any of its phrases. That guard is deliberately simple: the prompt generator
    (``pipeline/prompts.py``) has the careful one, and shards written with negatives use it. A negative
    that cannot be made yet (empty ring buffer) stays owed for the next image, so the rate holds.
    """

    def __init__(self, rate: float, rng: np.random.Generator, memory: int = 512) -> None:
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"negative_rate must be in [0, 1), got {rate}")
        self.rate = rate
        self.rng = rng
        self.recent: deque[Task] = deque(maxlen=memory)
        self.owed = 0

    def owe(self, positives: int) -> None:
        if self.rate > 0 and positives:
            # numpy's geometric counts trials up to and including the first success: subtract one
            self.owed += int((self.rng.geometric(1.0 - self.rate, positives) - 1).sum())

    def draw(self, record: ImageRecord) -> list[Task]:
        own = [t for t in record.tasks if t.kind == "negative"]
        positives = [t for t in record.tasks if t.kind != "negative"]
        out: list[Task] = []
        if self.owed and own:
            out = [own[i] for i in self.rng.integers(0, len(own), self.owed)]
        elif self.owed and self.recent:
            names = {_name(t) for t in positives} - {""}
            words = set(" ".join(t.phrase.lower() for t in positives).split())
            for _ in range(self.owed * 4):  # a few tries per owed negative
                if len(out) == self.owed:
                    break
                cand = self.recent[int(self.rng.integers(0, len(self.recent)))]
                name = _name(cand)
                if name and name not in names and not set(name.split()) <= words:
                    out.append(
                        Task(
                            task_id=f"{record.key}__neg__{cand.task_id}",
                            phrase=cand.phrase,
                            polygons=[],
                            phrase_structure=cand.phrase_structure,
                            kind="negative",
                            source_task_id=cand.task_id,
                        )
                    )
        self.owed -= len(out)
        self.recent.extend(t for t in positives if _name(t))
        return out


def _target_words(task: Task) -> str:
    """The words of a positive task's subject (``grammar.target_words``); none for a negative."""
    return "" if task.kind == "negative" else target_words(task.phrase_structure)


def _name(task: Task) -> str:
    return str((task.phrase_structure or {}).get("name") or "").strip().lower()


class _TypeBalancer:
    """Even phrase types by streaming rejection: a positive of type ``t`` is kept with probability
    ``min_count / count[t]`` over the types seen so far by this worker (name-type phrases were
    only 18% of the prototype's data). Unknown types pass untouched."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.counts = dict.fromkeys(PHRASE_TYPES, 0)

    def keep(self, task: Task) -> bool:
        kind = task.phrase_type
        if kind not in self.counts:
            return True
        self.counts[kind] += 1
        seen = [c for c in self.counts.values() if c > 0]
        return bool(self.rng.random() < min(seen) / self.counts[kind])


def _train_items(
    samples: Iterable[dict[str, Any]],
    cfg: DataConfig,
    size: int,
    rng: np.random.Generator,
    errors: _ErrorBudget,
) -> Iterator[dict[str, Any]]:
    """Raw image samples -> one augmented item per task (uint8 pixels ``3×S×S``, uint8 mask ``1×S×S``).

    With ``phrases_per_image == 1`` every task gets its own crop (CLIPSeg). With ``k > 1`` up to ``k``
    tasks of an image share one crop (keeping ``min_object_fraction`` of their union) and one pixel array;
    their items are emitted consecutively with the same ``group`` number, and ``collate_train`` stores
    that image once. Everything that needs only the JSON (task choice, negatives, crop boxes) is decided
    before the JPEG is decoded, so the decode happens once per image, at a reduced DCT scale when every
    crop allows it. With probability ``hflip`` a crop (shared by its group) is mirrored left–right, its
    masks with it, and each of its phrases is mirrored too (``mirror_phrase``), so the pair stays true.
    """
    negatives = _NegativeSource(cfg.negative_rate, rng)
    balancer = _TypeBalancer(rng) if cfg.phrase_type_balance else None
    per_image = cfg.phrases_per_image
    group = 0
    for sample in samples:
        try:
            key, jpg, record = _parse(sample)
            chosen = [
                t for t in record.tasks if t.kind != "negative" and (balancer is None or balancer.keep(t))
            ]
            negatives.owe(len(chosen))
            chosen += negatives.draw(record)
            if not chosen:
                continue
            w, h = int(record.width), int(record.height)
            orig = (int(record.orig_width or w), int(record.orig_height or h))
            if per_image == 1:
                boxes = [_crop_box(w, h, [task], cfg, rng, orig) for task in chosen]
            else:
                if len(chosen) > per_image:
                    chosen = [chosen[i] for i in sorted(rng.choice(len(chosen), per_image, replace=False))]
                boxes = [_crop_box(w, h, chosen, cfg, rng, orig)] * len(chosen)
            # decode reduced only as far as the smallest crop still has ≥ S source pixels per side
            smallest = min(b[2] - b[0] for b in boxes)
            factor = max(smallest / size, 1.0)
            image, reduction = decode_image(jpg, min_size=(math.ceil(w / factor), math.ceil(h / factor)))
            # stored-image pixels -> decoded pixels: exactly 1/reduction when the JPEG has the size the
            # metadata says (a reduced decode has ceil(w / r) columns); else the plain ratio
            if (image.width, image.height) == (-(-w // reduction), -(-h // reduction)):
                fx = fy = 1.0 / reduction
            else:
                fx, fy = image.width / w, image.height / h
            shared, flipped = None, False
            for task, box in zip(chosen, boxes):
                x0, y0, x1, y1 = box
                if shared is None or per_image == 1:
                    shared = pil_to_uint8_array(
                        crop_resize(image, (x0 * fx, y0 * fy, x1 * fx, y1 * fy), size)
                    )
                    flipped = cfg.hflip > 0 and bool(rng.random() < cfg.hflip)
                    if flipped:
                        shared = np.ascontiguousarray(shared[:, :, ::-1])
                    group += 1
                mask = _target_mask(task, box, size, (w, h), orig, where=_where(sample))
                words = _target_words(task)
                if flipped:
                    mask = np.ascontiguousarray(mask[:, ::-1])
                    words = mirror_phrase(words)
                yield {
                    "pixels": shared,  # 3×S×S uint8, normalised per batch
                    "group": group,  # items with the same group share their pixels
                    "mask": mask[None],  # 1×S×S uint8
                    "phrase": mirror_phrase(task.phrase) if flipped else task.phrase,
                    "task_id": task.task_id,
                    "phrase_type": task.phrase_type,
                    "kind": task.kind,
                    "key": key,
                    "crop_box": box,
                    "flipped": flipped,
                    "target_words": words,
                    "source": sample.get("__source__", 0),  # which mixture source (``_mix``)
                }
            errors.ok()
        except Exception as exn:  # a corrupt sample is skipped (and counted), never fatal on its own
            errors(exn)


def _where(sample: dict[str, Any]) -> str:
    return f"sample {sample.get('__key__')!r} in {sample.get('__url__')!r}"


def _target_mask(
    task: Task,
    box: tuple[float, float, float, float],
    size: int,
    stored: tuple[int, int],
    original: tuple[int, int],
    *,
    where: str,
) -> np.ndarray:
    """``task``'s target (polygons ∪ RLEs) inside ``box`` at ``size × size``: S×S uint8, empty without a
    target. A target that does not fit its record (an RLE of another size, a malformed RLE) raises a
    ValueError naming ``where`` (sample and shard), the task and the reason."""
    if not task.has_target:
        return np.zeros((size, size), np.uint8)
    try:
        return target_mask_array(
            task.polygons, box, size, rles=task.rles, stored_size=stored, original_size=original
        )
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{where}, task {task.task_id!r}: bad target: {err!r}") from err


def _crop_box(
    width: int,
    height: int,
    tasks: list[Task],
    cfg: DataConfig,
    rng: np.random.Generator,
    original: tuple[int, int],
) -> tuple[int, int, int, int]:
    """A random square crop keeping ``min_object_fraction`` of the union of the tasks' targets (polygons and
    RLEs; ``original`` = the original image's width, height, the size of the RLEs)."""
    instances = [instance for task in tasks for instance in task.polygons]
    rles = [rle for task in tasks for rle in task.rles]
    obj = (
        region_mask(
            instances,
            (0, 0, width, height),
            width,
            height,
            rles=rles,
            stored_size=(width, height),
            original_size=original,
        )
        if instances or rles
        else None
    )
    return random_object_crop(
        width, height, obj, rng=rng, min_object_fraction=cfg.min_object_fraction, scale=cfg.crop_scale
    )


def _resampled_urls(urls: Sequence[str], rng: np.random.Generator) -> Iterator[dict[str, str]]:
    """Shards drawn with replacement, forever (open_clip's ``ResampledShards``, but seeded by us)."""
    while True:
        yield {"url": urls[int(rng.integers(0, len(urls)))]}


def _mix(
    sources: Sequence[Iterable[dict[str, Any]]], weights: Sequence[float], rng: np.random.Generator
) -> Iterator[dict[str, Any]]:
    """Each next sample from ``sources[d]`` with probability ``weights[d]`` (summing to 1), tagged
    ``__source__ = d``: webdataset's ``RandomMix``, seeded by us. The shares hold whatever the sources'
    sizes, as every source is an endless resampled stream that never runs dry."""
    iterators = [iter(source) for source in sources]
    while True:
        d = int(rng.choice(len(iterators), p=weights)) if len(iterators) > 1 else 0
        sample = next(iterators[d], None)
        if sample is None:
            return
        yield {**sample, "__source__": d}


class TrainStream(IterableDataset):
    """The training pipeline for one rank; ``len()`` = batches per epoch on this rank (when finite).

    Each (seed, epoch, rank, worker) gets its own random stream, so runs are reproducible and workers
    and ranks see different shards, crops and negatives. ``sources`` holds each mixture source's shard
    locations and ``weights`` its sampling probability (summing to 1): every source has its own
    resampled shard stream and image shuffle buffer (``shuffle_buffer`` images each), and ``_mix`` draws
    each image from one of them.
    """

    def __init__(
        self,
        sources: Sequence[Sequence[str]],
        weights: Sequence[float],
        cfg: DataConfig,
        tokenizer: TokenizeFn,
        *,
        batch_size: int,
        image_size: int,
        seed: int,
        rank: int,
        steps_per_epoch: int | None,
    ) -> None:
        super().__init__()
        if len(sources) != len(weights) or not sources:
            raise ValueError(f"{len(sources)} shard lists for {len(weights)} mixture weights")
        self.sources = [list(urls) for urls in sources]
        self.weights = [float(w) for w in weights]
        self.cfg = cfg
        self.batch_size = int(batch_size)
        self.image_size = int(image_size)
        self.tokenizer = tokenizer
        self.seed = int(seed)
        self.rank = int(rank)
        self.steps_per_epoch = steps_per_epoch
        self.epoch = 0  # copied into worker processes when the DataLoader starts them (no persistent workers)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        if self.steps_per_epoch is None:
            raise TypeError("endless training stream (no steps_per_epoch) has no length")
        return self.steps_per_epoch

    def _collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        return collate_train(items, self.tokenizer)

    def _source_samples(
        self,
        urls: list[str],
        url_seed: np.random.SeedSequence,
        shuffle_seed: np.random.SeedSequence,
        errors: _ErrorBudget,
    ) -> wds.DataPipeline:
        """One source's endless stream of raw image samples: resampled shards, then an image shuffle."""
        url_rng, samples = np.random.default_rng(url_seed), max(1, self.cfg.shuffle_buffer)
        return wds.DataPipeline(
            lambda: _resampled_urls(urls, url_rng),
            _tarfile_to_samples(handler=errors),
            wds.shuffle(samples, initial=min(samples, 100), seed=int(shuffle_seed.generate_state(1)[0])),
        )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, workers = _worker()
        streams = np.random.SeedSequence([self.seed, self.epoch, self.rank, worker]).spawn(
            4 + len(self.sources)
        )
        # 0-3 serve as they did before mixtures (a one-source stream reads the same images as then): shards
        # and image shuffle of source 0, items, tasks; 4 picks the source of each image; 5... sources 1...
        item_rng, mix_rng = np.random.default_rng(streams[1]), np.random.default_rng(streams[4])
        task_seed = int(streams[3].generate_state(1)[0])
        seeds = [(streams[0], streams[2])] + [tuple(s.spawn(2)) for s in streams[5:]]
        errors = _ErrorBudget()
        cfg = self.cfg
        tasks = max(1, cfg.task_shuffle_buffer)
        raw = [self._source_samples(urls, *pair, errors) for urls, pair in zip(self.sources, seeds)]
        stages: list[Any] = [
            lambda: _mix(raw, self.weights, mix_rng),
            lambda src: _train_items(src, cfg, self.image_size, item_rng, errors),
        ]
        if cfg.phrases_per_image == 1:  # tasks sharing an image stay adjacent, or they cannot share it
            stages.append(wds.shuffle(tasks, initial=min(tasks, 64), seed=task_seed))
        stages.append(wds.batched(self.batch_size, collation_fn=self._collate, partial=False))
        pipeline = wds.DataPipeline(*stages)
        if self.steps_per_epoch is None:
            yield from pipeline
        else:
            yield from islice(pipeline, _split_batches(self.steps_per_epoch, workers)[worker])


class TrainLoader(DataLoader):
    """``DataLoader`` over a ``TrainStream`` that advances the stream's epoch on every ``iter()``
    (a new seed per epoch) unless ``set_epoch`` chose one, like ``DistributedSampler.set_epoch``."""

    def __init__(self, dataset: TrainStream, **kwargs: Any) -> None:
        super().__init__(dataset, batch_size=None, **kwargs)
        self._next_epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self._next_epoch = int(epoch)

    def __iter__(self):  # type: ignore[override]
        self.dataset.set_epoch(self._next_epoch)  # before the workers are started, so they copy it
        self._next_epoch += 1
        return super().__iter__()


def make_train_loader(
    data: DataConfig,
    *,
    batch_size: int,
    image_size: int,
    tokenizer: TokenizeFn,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    steps_per_epoch: int | None = None,
    samples_per_epoch: int | None = None,
    pin_memory: bool = False,
    return_dataset: bool = False,
) -> tuple[TrainLoader | TrainStream, LoaderInfo]:
    """The training loader of one rank over ``data.train_shards`` (split ``data.train_split``, or a weighted
    mixture of sources: ``DataConfig``), and what it decided.

    Every data knob comes from ``data`` (checked by ``DataConfig.validate``); the arguments are what the
    training run decides: batch and image size, seed, this rank's place, and the epoch length.
    ``steps_per_epoch`` is batches per rank per epoch; ``samples_per_epoch`` is global (all ranks, as
    open_clip's ``train_num_samples``) and becomes ``ceil(samples / (batch_size · world_size))`` steps.
    With neither, the stream is endless. Either way every rank yields exactly the same number of batches
    (full batches only), whatever the shard sizes: shards are resampled with replacement, so no rank can
    run out. With ``phrases_per_image > 1`` up to that many tasks of one image share a crop (see
    ``collate_train``); ``hflip`` mirrors a crop left–right together with its phrases (left ↔ right).
    A mixture draws each image from source d with probability weight_d, whatever the sources' sizes;
    batches say where each task came from (``source``).
    Returns a ``TrainLoader`` (``batch_size=None``; batching happens in the pipeline), or the bare
    ``TrainStream`` with ``return_dataset=True``.
    """
    data.validate()
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world_size {world_size}")
    sources = data.train_sources()
    listed = [list_shards(source.path, source.split) for source in sources]
    urls = [url for source_urls, _ in listed for url in source_urls]
    images = [sum(sizes.values()) if sizes else None for _, sizes in listed]
    if steps_per_epoch is None and samples_per_epoch is not None:
        steps_per_epoch = max(1, math.ceil(samples_per_epoch / (batch_size * world_size)))
    stream = TrainStream(
        [source_urls for source_urls, _ in listed],
        [source.weight for source in sources],
        data,
        tokenizer,
        batch_size=batch_size,
        image_size=image_size,
        seed=seed,
        rank=rank,
        steps_per_epoch=steps_per_epoch,
    )
    info = LoaderInfo(
        urls=urls,
        num_shards=len(urls),
        num_images=None if None in images else sum(images),
        batch_size=batch_size,
        world_size=world_size,
        rank=rank,
        num_workers=data.num_workers,
        steps_per_epoch=steps_per_epoch,
        batches_per_worker=None
        if steps_per_epoch is None
        else _split_batches(steps_per_epoch, max(1, data.num_workers)),
        sources=sources,
        source_images=images,
    )
    if return_dataset:
        return stream, info
    loader = TrainLoader(stream, num_workers=data.num_workers, pin_memory=pin_memory)
    return loader, info


# ----------------------------------------------------------------------------------------------- evaluation


def eval_assignment(
    num_shards: int, rank: int, world_size: int, worker: int, num_workers: int
) -> tuple[list[int], int, int]:
    """Which shards a (rank, worker) slot reads, and which of their samples it keeps.

    Returns ``(shard_indices, modulus, remainder)``: the slot reads those shards in order and keeps the
    samples whose running index (over the concatenation of those shards) ``% modulus == remainder``.
    Every sample lands in exactly one slot:

    * ``shards ≥ world × workers``: whole shards, shard ``i`` to slot ``i % (world × workers)``;
    * ``world ≤ shards < world × workers``: shard ``i`` to rank ``i % world``, whose workers then take
      every ``workers``-th sample of the rank's shards;
    * ``shards < world``: every slot reads every shard and takes every ``(world × workers)``-th sample.

    Splitting by running index (not by hash) balances the slots to within one sample, and is exact
    because every slot of a group reads the same shards in the same order.
    """
    slots = world_size * num_workers
    slot = rank * num_workers + worker
    if num_shards >= slots:
        return [i for i in range(num_shards) if i % slots == slot], 1, 0
    if num_shards >= world_size:
        return [i for i in range(num_shards) if i % world_size == rank], num_workers, worker
    return list(range(num_shards)), slots, slot


def _eval_items(
    samples: Iterable[dict[str, Any]], image_size: int, modulus: int, remainder: int
) -> Iterator[dict[str, Any]]:
    """Kept samples -> one item per task (all kinds, negatives included), image resized once per image."""
    size = image_size
    for index, sample in enumerate(samples):
        if index % modulus != remainder:
            continue
        key, jpg, record = _parse(sample)
        image, _ = decode_image(jpg)  # full decode: evaluation matches inference (segvlm.preprocess)
        w, h = int(record.width), int(record.height)
        # the same box for image and mask; it also absorbs a decoded size that differs from the metadata
        pixels = pil_to_uint8_array(crop_resize(image, (0, 0, image.width, image.height), size))
        ow, oh = int(record.orig_width or w), int(record.orig_height or h)
        for task in record.tasks:
            polygons = polygons_at_original_size(task.polygons or [], w, h, ow, oh)
            mask = _target_mask(task, (0, 0, w, h), size, (w, h), (ow, oh), where=_where(sample))
            yield {
                "pixels": pixels,
                "mask": mask[None],
                "orig_height": oh,
                "orig_width": ow,
                "height": h,
                "width": w,
                "polygons": polygons,
                "rles": task.rles,
                "num_instances": task.num_instances,
                "phrase": task.phrase,
                "task_id": task.task_id,
                "phrase_type": task.phrase_type,
                "kind": task.kind,
                "key": key,
            }


class EvalStream(IterableDataset):
    """The evaluation pipeline for one rank (see ``eval_assignment``); finite, unshuffled."""

    def __init__(
        self,
        urls: list[str],
        image_size: int,
        batch_size: int,
        tokenizer: TokenizeFn,
        rank: int,
        world_size: int,
    ) -> None:
        super().__init__()
        self.urls = urls
        self.image_size = image_size
        self.batch_size = batch_size
        self.tokenizer = tokenizer
        self.rank = rank
        self.world_size = world_size

    def _collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        return collate_eval(items, self.tokenizer)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, workers = _worker()
        shards, modulus, remainder = eval_assignment(
            len(self.urls), self.rank, self.world_size, worker, workers
        )
        if not shards:
            return
        pipeline = wds.DataPipeline(
            lambda: iter([{"url": self.urls[i]} for i in shards]),  # a bare list would be taken as stages
            # errors are fatal here: a skipped sample would silently change the metric
            _tarfile_to_samples(),
            lambda src: _eval_items(src, self.image_size, modulus, remainder),
            wds.batched(self.batch_size, collation_fn=self._collate, partial=True),
        )
        yield from pipeline


def make_eval_loader(
    urls_or_dir: str | os.PathLike | Sequence[str],
    *,
    split: str,
    batch_size: int,
    image_size: int,
    tokenizer: TokenizeFn,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """The evaluation loader of one rank: every task of the split exactly once over all ranks and
    workers (``eval_assignment``), whole images resized to ``image_size``² (no crop), batches as in
    ``collate_eval`` (the last one per worker may be short).

    Ranks (and workers) can get different numbers of batches, including none: do not call a collective
    (all-reduce, barrier, ``ray.train.report``) inside the loop; accumulate sums and reduce after it.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world_size {world_size}")
    urls, _ = list_shards(urls_or_dir, split)
    stream = EvalStream(urls, image_size, batch_size, tokenizer, rank, world_size)
    return DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory)
