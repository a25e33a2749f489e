"""The sharding job: a PhraseCut-layout folder -> WebDataset shards + manifest, in parallel with Ray Data.

Plan on the driver, work in Ray tasks, record on the driver::

    list_images (driver, metadata only)  ->  plan_shards: fixed groups of the key-sorted images
    ray.data.from_items(one row per shard still to do)
        .map(process_shard)          one Ray task per shard: read + validate (+ prompts) + write tar
    driver: collect the small per-shard results -> quarantine.parquet -> manifest.parquet + sizes.json

Image bytes never travel through the driver or the object store: each task reads its images from the
source and writes its shard straight to the output filesystem, so the job scales with the cluster. On a
multi-node cluster the source folder must be on a path every node sees (NFS, FSx, a mounted bucket: the
reader uses plain file paths); the output may be any URI (``s3://``, ``gs://``) or such a shared path.

Crash safety and resume: a shard is written under a temp name and renamed; then a small sidecar
``_parts/{shard}.json`` records what the shard holds (sample count, bytes, sha256, manifest and quarantine
rows, reader stats) and the fingerprint of the settings that made it. On a rerun, a shard whose sidecar
matches (same image keys, same settings, tar present with the recorded size) is skipped and its rows
reused; temp leftovers are deleted. The manifest is assembled from sidecars only, so an interrupted run
followed by a rerun gives the same manifest as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import posixpath
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import pyarrow.fs as pafs

from pipeline import manifest as mf
from pipeline import shards
from pipeline.progress import Progress, format_table
from pipeline.quarantine import RECORD_ERROR
from pipeline.schema import ImageRecord, QuarantineRecord, Task, make_key
from pipeline.validate import (
    DEFAULT_MAX_IMAGE_BYTES,
    DEFAULT_MAX_PIXELS,
    LOADER_MAX_MEMBER_BYTES,
    LOADER_MAX_PIXELS,
    id_error,
    meta_size,
    structure_error,
    text_error,
)

PARTS_DIR = "_parts"
DEFAULT_SHARD_SAMPLES = 1000
SOURCES = ("phrasecut", "scenes")
SIDECAR_VERSION = 1


@dataclasses.dataclass(frozen=True)
class PrepareConfig:
    """Everything that decides what the job writes (plus where, and how it reports)."""

    source: str
    root: str
    split: str
    out: str
    max_side: int | None = None
    shard_samples: int | None = None
    shard_bytes: int | None = None
    synthetic_prompts: bool = False
    # prompts per original task and kind; None with synthetic_prompts: pipeline.prompts.DEFAULT_RATES
    prompt_rates: dict[str, float] | None = None
    seed: int = 0
    # Limits on one input image (pipeline/validate.py): pixels checked from the metadata and the image
    # header before decoding, bytes before reading; over them the image's tasks are quarantined.
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    progress_every: float = 5.0
    # Testing hook: shard indices whose task dies after half-writing its temp file (a simulated crash).
    crash_shards: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {self.source!r}")
        if self.shard_samples is not None and self.shard_bytes is not None:
            raise ValueError("give --shard-samples or --shard-bytes, not both")
        if self.shard_samples is not None and self.shard_samples < 1:
            raise ValueError("--shard-samples must be >= 1")
        if self.shard_bytes is not None and self.shard_bytes < 1:
            raise ValueError("--shard-bytes must be >= 1")
        if not 1 <= self.max_pixels <= LOADER_MAX_PIXELS:
            raise ValueError(f"--max-pixels must lie in 1..{LOADER_MAX_PIXELS} (what the loaders accept)")
        if not 1 <= self.max_image_bytes <= LOADER_MAX_MEMBER_BYTES:
            raise ValueError(
                f"--max-image-bytes must lie in 1..{LOADER_MAX_MEMBER_BYTES} (what the loaders read)"
            )
        if self.synthetic_prompts and self.prompt_rates is None:
            from pipeline.prompts import DEFAULT_RATES

            object.__setattr__(self, "prompt_rates", dict(DEFAULT_RATES))

    def fingerprint(self) -> str:
        """Hash of the settings that change shard content: a sidecar from other settings is not reused."""
        content = {
            "version": SIDECAR_VERSION,
            "source": self.source,
            "split": self.split,
            "max_side": self.max_side,
            "synthetic_prompts": self.synthetic_prompts,
            "prompt_rates": sorted((self.prompt_rates or {}).items()) if self.synthetic_prompts else None,
            "seed": self.seed if self.synthetic_prompts else None,
            "limits": [self.max_pixels, self.max_image_bytes],
        }
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


@dataclasses.dataclass
class ShardPlan:
    """One shard to write: its index/name and the (key-sorted) reader entries that go in it."""

    index: int
    name: str
    keys: tuple[str, ...]
    entries: list[Any]


# ----------------------------------------------------------------------------------------- planning


ORPHANS_KEY = "~orphans"  # the reader's entry of tasks with no usable image_id; sorts after every key


def entry_key(entry: Any, source: str) -> str:
    return ORPHANS_KEY if entry.image_id is None else make_key(source, entry.image_id)


def entry_size(entry: Any, root: str) -> int:
    """Source image bytes, the estimate ``--shard-bytes`` groups by (0 when the file is missing)."""
    if entry.image_id is None:
        return 0
    path = os.path.join(root, entry.image_file)
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def plan_shards(
    entries: Sequence[Any],
    *,
    source: str,
    split: str,
    shard_samples: int | None = None,
    shard_bytes: int | None = None,
    sizes: Sequence[int] | None = None,
) -> list[ShardPlan]:
    """Group key-sorted entries into consecutive shards: fixed counts, or until ``shard_bytes`` is reached.

    Depends only on the entries (and their source sizes), never on which records later fail, so a rerun
    puts the same images in the same shard names.
    """
    order = sorted(range(len(entries)), key=lambda i: entry_key(entries[i], source))
    groups: list[list[int]] = []
    if shard_bytes is not None:
        if sizes is None:
            raise ValueError("shard_bytes needs the entry sizes")
        current: list[int] = []
        filled = 0
        for i in order:
            current.append(i)
            filled += sizes[i]
            if filled >= shard_bytes:
                groups.append(current)
                current, filled = [], 0
        if current:
            groups.append(current)
    else:
        per = shard_samples or DEFAULT_SHARD_SAMPLES
        groups = [order[start : start + per] for start in range(0, len(order), per)]
    return [
        ShardPlan(
            index=n,
            name=shards.shard_name(split, n),
            keys=tuple(entry_key(entries[i], source) for i in group),
            entries=[entries[i] for i in group],
        )
        for n, group in enumerate(groups)
    ]


# ------------------------------------------------------------------------------------- per-shard work


@dataclasses.dataclass(frozen=True)
class ShardJob:
    """What a worker needs besides its plan (picklable; shipped once per task by Ray)."""

    root: str
    source: str
    max_side: int | None
    fingerprint: str
    filesystem: pafs.FileSystem
    base: str
    synthetic_prompts: bool = False
    prompt_rates: dict[str, float] | None = None
    seed: int = 0
    negative_pool: tuple[tuple[str, str], ...] = ()
    crash_shards: tuple[int, ...] = ()
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES


def sidecar_path(base: str, shard: str) -> str:
    return shards.join(base, PARTS_DIR, f"{shard}.json")


def augment(record: ImageRecord, job: ShardJob) -> ImageRecord:
    """The one call into the prompt generator; seeded by (seed, key) so every rerun draws the same."""
    from pipeline import prompts

    rng = prompts.record_rng(job.seed, record.key)
    return prompts.augment_record(
        record, rng=rng, rates=job.prompt_rates or {}, negative_pool=job.negative_pool
    )


def build_shard(plan: ShardPlan, job: ShardJob) -> dict[str, Any]:
    """Read, validate (and augment) the plan's images, write its shard and sidecar; return the sidecar.

    Pure apart from the two files it writes; runs inside a Ray task, or directly in tests.
    """
    from pipeline.phrasecut import load_image_record

    samples: list[tuple[ImageRecord, bytes]] = []
    rows: list[dict[str, Any]] = []
    quarantine: list[dict[str, Any]] = []
    stats: Counter[str] = Counter()
    for entry in plan.entries:
        record, jpg, bad, entry_stats = load_image_record(
            job.root,
            entry,
            source=job.source,
            max_side=job.max_side,
            max_pixels=job.max_pixels,
            max_image_bytes=job.max_image_bytes,
        )
        quarantine.extend(q.to_dict() if isinstance(q, QuarantineRecord) else dict(q) for q in bad)
        stats.update({k: v for k, v in (entry_stats or {}).items() if isinstance(v, int | float)})
        if record is None or jpg is None:
            continue
        try:
            if job.synthetic_prompts:
                record = augment(record, job)
            record_rows = mf.manifest_rows(record, plan.name)
            mf.check_rows(record_rows)  # a row Parquet cannot encode would fail the job at its very end
        except Exception as err:  # one record's surprise is that record's quarantine, not a failed job
            quarantine.extend(record_error_rows(record, entry.source_file, "augment/index", err))
            stats["tasks_ok"] -= sum(t.kind == "original" for t in record.tasks)
            stats["quarantined"] += sum(t.kind == "original" for t in record.tasks)
            continue
        samples.append((record, jpg))
        rows.extend(record_rows)

    path = shards.join(job.base, plan.name)
    if plan.index in job.crash_shards:
        _simulate_crash(job.filesystem, path)
    if samples:
        info = shards.write_shard(samples, job.filesystem, path)
        shard_bytes, sha = info.bytes, info.sha256
    else:
        shard_bytes, sha = 0, ""  # every image quarantined: no tar, only the sidecar says so
    sidecar = {
        "version": SIDECAR_VERSION,
        "fingerprint": job.fingerprint,
        "shard": plan.name,
        "index": plan.index,
        "keys": list(plan.keys),
        "samples": len(samples),
        "bytes": shard_bytes,
        "sha256": sha,
        "tasks": len(rows),
        "inputs": sum(input_records(e) for e in plan.entries),
        "manifest": rows,
        "quarantine": [_jsonable(q) for q in quarantine],
        "stats": dict(sorted(stats.items())),
    }
    shards.write_json_atomic(job.filesystem, sidecar_path(job.base, plan.name), sidecar)
    return sidecar


def input_records(entry: Any) -> int:
    """The refer-file records an entry stands for: its tasks plus the ones the listing already set aside."""
    return len(entry.tasks) + len(entry.issues)


def record_error_rows(
    record: ImageRecord, source_file: str, stage: str, err: Exception
) -> list[dict[str, Any]]:
    """Quarantine rows for every original task of a record whose handling raised ``err`` at ``stage``."""
    detail = f"{stage} of image {record.image_id} ({source_file}): {type(err).__name__}: {err}"
    return [
        QuarantineRecord(
            source_file=source_file,
            record=task.task_id,
            reason=RECORD_ERROR,
            detail=detail,
            image_id=record.image_id,
            task_id=task.task_id,
        ).to_dict()
        for task in record.tasks
        if task.kind == "original"
    ]


def _jsonable(row: dict[str, Any]) -> dict[str, Any]:
    return {
        k: (v if v is None or isinstance(v, str | int | float | bool) else str(v)) for k, v in row.items()
    }


def _simulate_crash(filesystem: pafs.FileSystem, path: str) -> None:
    with filesystem.open_output_stream(f"{path}{shards.TMP_MARK}crashed") as stream:
        stream.write(b"half a tar")
    raise RuntimeError(f"simulated crash while writing {posixpath.basename(path)}")


def finished_sidecar(plan: ShardPlan, job: ShardJob) -> dict[str, Any] | None:
    """The sidecar of a shard a previous run completed with the same inputs and settings, else None."""
    fs = job.filesystem
    try:
        sidecar = json.loads(shards.read_bytes(fs, sidecar_path(job.base, plan.name)))
    except (FileNotFoundError, OSError, ValueError):
        return None
    if (
        sidecar.get("version") != SIDECAR_VERSION
        or sidecar.get("fingerprint") != job.fingerprint
        or tuple(sidecar.get("keys", ())) != plan.keys
    ):
        return None
    if sidecar["samples"]:
        info = fs.get_file_info(shards.join(job.base, plan.name))
        if info.type != pafs.FileType.File or info.size != sidecar["bytes"]:
            return None
    return sidecar


def _ray_process(row: dict[str, Any], job: ShardJob) -> dict[str, Any]:
    """Ray Data row UDF: unpickle our own plan (never foreign data), build the shard, return JSON."""
    plan = pickle.loads(row["plan"])
    return {"index": row["index"], "result": json.dumps(build_shard(plan, job))}


# ------------------------------------------------------------------------------------------- driver


def list_entries(config: PrepareConfig) -> list[Any]:
    from pipeline.phrasecut import list_images

    return list_images(config.root, config.split)


def text_usable(raw: dict[str, Any]) -> bool:
    """Whether a listed task's id and text pass the reader's checks (pipeline/validate.py)."""
    return (
        id_error(raw["task_id"]) is None
        and text_error(raw["phrase"]) is None
        and structure_error(raw["phrase_structure"]) is None
    )


def negative_pool_for(entries: Sequence[Any], config: PrepareConfig) -> tuple[tuple[str, str], ...]:
    """Built once on the driver from the listing (phrases only, no images), shipped to every task."""
    from pipeline import prompts

    return tuple(
        prompts.build_negative_pool(listing_records(entries, config), rng=random.Random(config.seed))
    )


def listing_records(entries: Sequence[Any], config: PrepareConfig) -> list[ImageRecord]:
    """Phrase-only records from the listing (the pool needs phrases and names, not pixels or polygons)."""
    records = []
    for entry in sorted(entries, key=lambda e: entry_key(e, config.source)):
        if entry.image_id is None:
            continue
        tasks = [
            Task(
                task_id=raw["task_id"],
                phrase=raw["phrase"],
                polygons=[],
                phrase_structure=raw["phrase_structure"],
            )
            for raw in entry.tasks
            if text_usable(raw)  # the reader will quarantine the rest; their phrases must not spread
        ]
        meta = entry.meta or {}
        records.append(
            ImageRecord(
                source=config.source,
                image_id=entry.image_id,
                split=entry.split,
                width=(meta_size(meta)[0] or (0, 0))[0],  # unchecked rows: the reader quarantines them
                height=(meta_size(meta)[0] or (0, 0))[1],
                tasks=tasks,
            )
        )
    return records


def _map_plans(
    plans: Sequence[ShardPlan], job: ShardJob, on_result: Callable[[dict[str, Any]], None]
) -> None:
    import ray

    items = [{"index": p.index, "plan": pickle.dumps(p)} for p in plans]
    # One block per shard so every shard is its own Ray task (spread over the cluster).
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map(_ray_process, fn_kwargs={"job": job}, num_cpus=1)
    for row in ds.iter_rows():
        on_result(json.loads(row["result"]))


def run_prepare(
    config: PrepareConfig,
    *,
    filesystem: pafs.FileSystem | None = None,
    log: Callable[[str], None] = print,
    cpus: float | None = None,
) -> dict[str, Any]:
    """Run the job on the current Ray instance (the caller starts it); return the summary dict."""
    start = time.perf_counter()
    fs, base = shards.resolve(config.out, filesystem)
    fs.create_dir(base, recursive=True)
    removed = shards.remove_temp_files(fs, base)
    if removed:
        log(f"prepare: removed {len(removed)} temp file(s) left by an interrupted run")

    entries = list_entries(config)
    sizes = [entry_size(e, config.root) for e in entries] if config.shard_bytes else None
    plans = plan_shards(
        entries,
        source=config.source,
        split=config.split,
        shard_samples=config.shard_samples,
        shard_bytes=config.shard_bytes,
        sizes=sizes,
    )
    pool = negative_pool_for(entries, config) if config.synthetic_prompts else ()
    job = ShardJob(
        root=os.path.abspath(config.root),
        source=config.source,
        max_side=config.max_side,
        fingerprint=config.fingerprint(),
        filesystem=fs,
        base=base,
        synthetic_prompts=config.synthetic_prompts,
        prompt_rates=dict(config.prompt_rates or {}),
        seed=config.seed,
        negative_pool=pool,
        crash_shards=tuple(config.crash_shards),
        max_pixels=config.max_pixels,
        max_image_bytes=config.max_image_bytes,
    )

    results: dict[int, dict[str, Any]] = {}
    todo = []
    for plan in plans:
        done = finished_sidecar(plan, job)
        if done is None:
            todo.append(plan)
        else:
            results[plan.index] = done
    resumed = len(results)
    log(
        f"prepare: {len(entries)} images in {len(plans)} shards; {resumed} already complete, "
        f"{len(todo)} to write -> {config.out}"
    )
    progress = Progress(
        sum(len(p.entries) for p in todo), label="prepare", unit="images", every=config.progress_every
    )

    def on_result(sidecar: dict[str, Any]) -> None:
        results[sidecar["index"]] = sidecar
        progress.update(len(sidecar["keys"]), shards=f"{len(results)}/{len(plans)}")

    if todo:
        _map_plans(todo, job, on_result)
    progress.close()

    # Last: quarantine, then manifest + sizes (the completion markers), all from the sidecars.
    ordered = [results[p.index] for p in plans]
    from pipeline.quarantine import write_quarantine

    quarantine = [q for s in ordered for q in s["quarantine"]]
    write_quarantine(shards.join(base, mf.QUARANTINE), quarantine, filesystem=fs)
    seconds = time.perf_counter() - start
    processed = sum(len(p.entries) for p in todo)
    summary = summarize(
        ordered,
        config,
        seconds=seconds,
        resumed=resumed,
        processed=processed,
        cpus=cpus,
        inputs=sum(input_records(e) for e in entries),
    )
    shards.write_json_atomic(fs, shards.join(base, mf.SUMMARY), summary)
    rows = [row for s in ordered for row in s["manifest"]]
    mf.write_manifest(fs, base, rows, {s["shard"]: s["samples"] for s in ordered if s["samples"]})
    log(summary_table(summary))
    return summary


def summarize(
    sidecars: Sequence[dict[str, Any]],
    config: PrepareConfig,
    *,
    seconds: float,
    resumed: int = 0,
    processed: int | None = None,
    cpus: float | None = None,
    inputs: int | None = None,
) -> dict[str, Any]:
    """Counts over all shards (resumed ones included); rates over the images this run processed.

    Raises :class:`AccountingError` unless every input record is accounted for (``check_accounting``):
    the caller writes the completion markers only after this returns.
    """
    accounting = check_accounting(sidecars, inputs)
    kinds: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    stats: Counter[str] = Counter()
    for s in sidecars:
        kinds.update(row["kind"] for row in s["manifest"])
        reasons.update(q["reason"] for q in s["quarantine"])
        stats.update(s["stats"])
    images = sum(s["samples"] for s in sidecars)
    listed = sum(len(s["keys"]) for s in sidecars)
    processed = listed if processed is None else processed
    rate = round(processed / seconds, 2) if seconds > 0 else None
    return {
        "source": config.source,
        "split": config.split,
        "images_listed": listed,
        "images": images,
        "tasks": sum(kinds.values()),
        "tasks_per_kind": dict(sorted(kinds.items())),
        "quarantined": sum(reasons.values()),
        "quarantined_per_reason": dict(sorted(reasons.items())),
        "accounting": accounting,
        "shards": sum(1 for s in sidecars if s["samples"]),
        "shards_resumed": resumed,
        "bytes": sum(s["bytes"] for s in sidecars),
        "reader_stats": dict(sorted(stats.items())),
        "seconds": round(seconds, 3),
        "images_processed": processed,
        "images_per_s": rate,
        "cpus": cpus,
        "images_per_s_per_cpu": round(rate / cpus, 2) if rate is not None and cpus else None,
        "max_side": config.max_side,
        "synthetic_prompts": config.synthetic_prompts,
        "prompt_rates": config.prompt_rates if config.synthetic_prompts else None,
        "seed": config.seed,
        "fingerprint": config.fingerprint(),
    }


class AccountingError(RuntimeError):
    """Input records that are neither in the shards nor in the quarantine (or are in the shards twice)."""


def check_accounting(sidecars: Sequence[dict[str, Any]], inputs: int | None = None) -> dict[str, int]:
    """Prove that each input record is in the shards exactly once or in the quarantine, for the split.

    ``inputs`` is the number of records the driver listed (tasks of the refer file, the ones the listing
    set aside included); each sidecar also carries its own count. ``written`` counts manifest rows of kind
    ``original`` (generated prompts are extra rows, not input records). Returns
    ``{"inputs", "written", "quarantined"}`` with ``inputs == written + quarantined``, else raises.
    """
    problems = []
    written = quarantined = listed = 0
    seen: set[str] = set()
    repeated: set[str] = set()
    for s in sidecars:
        originals = [row["task_id"] for row in s["manifest"] if row["kind"] == "original"]
        repeated.update(t for t in originals if t in seen)
        seen.update(originals)
        written += len(originals)
        quarantined += len(s["quarantine"])
        if "inputs" in s:
            listed += s["inputs"]
            if s["inputs"] != len(originals) + len(s["quarantine"]):
                problems.append(
                    f"shard {s['shard']}: {s['inputs']} input records, {len(originals)} written + "
                    f"{len(s['quarantine'])} quarantined"
                )
    if inputs is None:
        inputs = listed
    if inputs != written + quarantined:
        problems.append(f"{inputs} input records, {written} written + {quarantined} quarantined")
    if repeated:
        problems.append(f"task ids written more than once: {sorted(repeated)[:5]}")
    if problems:
        raise AccountingError(
            "record accounting failed, not marking the job complete: " + "; ".join(problems)
        )
    return {"inputs": inputs, "written": written, "quarantined": quarantined}


def summary_table(summary: dict[str, Any]) -> str:
    rows: list[tuple[str, Any]] = [
        ("images", summary["images"]),
        ("tasks", summary["tasks"]),
    ]
    rows += [(f"  kind {k}", v) for k, v in summary["tasks_per_kind"].items()]
    rows.append(("input records", summary["accounting"]["inputs"]))
    rows.append(("quarantined", summary["quarantined"]))
    rows += [(f"  {k}", v) for k, v in summary["quarantined_per_reason"].items()]
    rows += [
        ("shards", summary["shards"]),
        ("shards resumed", summary["shards_resumed"]),
        ("MB written", summary["bytes"] / 1e6),
        ("seconds", float(summary["seconds"])),
        ("images/s", float(summary["images_per_s"] or 0.0)),
    ]
    return format_table(rows, title=f"prepare {summary['source']}/{summary['split']}")
