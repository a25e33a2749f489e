"""The sharding job: a PhraseCut- or refer-layout folder -> WebDataset shards + manifest, in parallel on Ray.

Plan on the driver, work in Ray tasks, record on the driver::

    lock the output; remove the completion markers of an earlier run and the temp files of a dead one
    Listing (driver, streamed: tasks grouped per image in SQLite on local scratch, constant memory)
      -> plan_listing: fixed groups of the key-sorted images (keys only)
    per shard, at most ~2 per CPU in flight: read its tasks from the listing, ship them inside the
    Ray task's arguments -> process_shard: verify a finished shard, or read + validate (+ prompts) +
    write the tar and its sidecar
    driver: stream the sidecars -> quarantine.parquet, summary.json -> manifest.parquet + sizes.json

Image bytes never travel through the driver or the object store: each task reads its images from the
source and writes its shard straight to the output filesystem, so the job scales with the cluster. On a
multi-node cluster the source folder must be on a path every node sees (NFS, FSx, a mounted bucket: the
reader uses plain file paths), and so must a refer-layout source's image folder (``image_root``); the output
may be any URI (``s3://``, ``gs://``) or such a shared path. The
driver's memory does not grow with the dataset: the listing lives in SQLite, a bounded number of shards'
tasks are in flight, results come back as counts, and the manifest is streamed from the sidecars.

Reruns and concurrency: one run per output at a time (:mod:`pipeline.runlock`; a second run refuses). A run
first deletes ``manifest.parquet``/``sizes.json``/``summary.json``/``quarantine.parquet``, so a folder it
is rewriting never reads as finished. Temp names carry the run id; a run deletes the temp files of the
run that held the lock before it (that run is over) and leaves any other temp file alone.

Crash safety and resume: a shard is written under a temp name, fsynced (local disk) and renamed; then a
small sidecar ``_parts/{shard}.json`` records what the shard holds (sample count, bytes, sha256, manifest
and quarantine rows, reader stats) and the fingerprint of the settings that made it. On a rerun, a shard
whose sidecar matches (same image keys, same settings) and whose tar has the recorded size and sha256 is
kept and its rows reused; anything else is rewritten. The manifest is assembled from sidecars only, so an
interrupted run followed by a rerun gives the same manifest as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import json
import os
import posixpath
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline import manifest as mf
from pipeline import shards
from pipeline.listing import ORPHANS_KEY, Listing, unpack
from pipeline.phrasecut_format import METADATA_FILES
from pipeline.progress import Progress, format_table
from pipeline.quarantine import RECORD_ERROR
from pipeline.refer import DATASETS, default_image_root, refer_listing, resolve_split_by
from pipeline.runlock import RunLock
from pipeline.schema import ImageRecord, QuarantineRecord, Task, make_key
from pipeline.validate import (
    DEFAULT_MAX_IMAGE_BYTES,
    DEFAULT_MAX_PIXELS,
    LOADER_MAX_MEMBER_BYTES,
    LOADER_MAX_PIXELS,
    UnsafePathError,
    id_error,
    meta_size,
    resolve_inside,
    structure_error,
    text_error,
)

PARTS_DIR = "_parts"
DEFAULT_SHARD_SAMPLES = 1000
REFER_SOURCES = tuple(DATASETS)  # refcoco, refcoco+, refcocog, grefcoco
SOURCES = ("phrasecut", "scenes", *REFER_SOURCES)
SIDECAR_VERSION = 2  # 2: negative pool drawn by hash rank (bounded memory), sidecars verified by sha256
NEGATIVE_POOL_SIZE = 10000
MAX_INFLIGHT_BYTES = 256 << 20  # task JSON of the shards in flight (PhraseCut: about 9 MB a shard)
MARKERS = (mf.MANIFEST, mf.SIZES, mf.SUMMARY, mf.QUARANTINE)  # what a finished run writes last


@dataclasses.dataclass(frozen=True)
class PrepareConfig:
    """Everything that decides what the job writes (plus where, and how it reports).

    Refer-layout sources (:data:`REFER_SOURCES`, :mod:`pipeline.refer`) also take ``split_by`` (None: the
    dataset's default, filled in) and ``image_root`` (None: the refer toolkit's folder beside ``root``,
    filled in as an absolute path; on a cluster a path every node sees). Other sources refuse both.
    """

    source: str
    root: str
    split: str
    out: str
    split_by: str | None = None
    image_root: str | None = None
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
    # Take over the output's lock even though its holder looks alive (object stores: a crashed run's lock
    # is otherwise honoured until its heartbeat is stale_after old).
    break_lock: bool = False

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {self.source!r}")
        if self.source in REFER_SOURCES:
            object.__setattr__(self, "split_by", resolve_split_by(self.source, self.split_by))
            root = self.image_root if self.image_root is not None else default_image_root(self.root)
            object.__setattr__(self, "image_root", os.path.abspath(root))
        elif self.split_by is not None or self.image_root is not None:
            raise ValueError(
                f"--split-by and --image-root are for {', '.join(REFER_SOURCES)}, not {self.source}"
            )
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
        if self.source in REFER_SOURCES:  # PhraseCut's fingerprints (and so its finished shards) stay valid
            content.update(split_by=self.split_by, image_root=self.image_root)
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


@dataclasses.dataclass
class ShardPlan:
    """One shard to write: its index/name, its (key-sorted) image keys, and their reader entries.

    ``images`` are the listing's group ids of the keys (``None``: the orphans' entry); ``entries`` are
    filled just before the shard is shipped to a worker (``ImageEntry`` or packed listing entries).
    """

    index: int
    name: str
    keys: tuple[str, ...]
    entries: list[Any]
    images: tuple[str | None, ...] = ()


# ----------------------------------------------------------------------------------------- planning


def entry_key(entry: Any, source: str) -> str:
    return ORPHANS_KEY if entry.image_id is None else make_key(source, entry.image_id)


def group_keys(
    sizes: Iterable[int | None], *, shard_samples: int | None = None, shard_bytes: int | None = None
) -> Iterator[list[int]]:
    """Positions of key-sorted items grouped into consecutive shards: fixed counts, or until
    ``shard_bytes`` of source bytes is reached. ``sizes`` is only read with ``shard_bytes``."""
    per = shard_samples or DEFAULT_SHARD_SAMPLES
    current: list[int] = []
    filled = 0
    for i, size in enumerate(sizes):
        current.append(i)
        if shard_bytes is not None:
            filled += size or 0
            if filled >= shard_bytes:
                yield current
                current, filled = [], 0
        elif len(current) == per:
            yield current
            current = []
    if current:
        yield current


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
    puts the same images in the same shard names. (In memory: the job plans from a listing, see
    :func:`plan_listing`, which gives the same plans.)
    """
    if shard_bytes is not None and sizes is None:
        raise ValueError("shard_bytes needs the entry sizes")
    order = sorted(range(len(entries)), key=lambda i: entry_key(entries[i], source))
    ordered_sizes = (sizes[i] for i in order) if sizes is not None else (None for _ in order)
    return [
        ShardPlan(
            index=n,
            name=shards.shard_name(split, n),
            keys=tuple(entry_key(entries[order[j]], source) for j in group),
            entries=[entries[order[j]] for j in group],
        )
        for n, group in enumerate(
            group_keys(ordered_sizes, shard_samples=shard_samples, shard_bytes=shard_bytes)
        )
    ]


def plan_listing(listing: Listing, config: PrepareConfig) -> list[ShardPlan]:
    """:func:`plan_shards` over a streamed listing: plans hold keys only (entries are loaded per shard)."""
    keys: list[str] = []
    images: list[str | None] = []
    sizes: list[int] = []
    for key, image, _ in listing.images(order="key"):
        keys.append(key)
        images.append(image)
        if config.shard_bytes is not None:
            sizes.append(0 if image is None else image_file_size(*listing.image_path(image)))
    groups = group_keys(
        sizes if config.shard_bytes is not None else (None for _ in keys),
        shard_samples=config.shard_samples,
        shard_bytes=config.shard_bytes,
    )
    return [
        ShardPlan(
            index=n,
            name=shards.shard_name(config.split, n),
            keys=tuple(keys[i] for i in group),
            entries=[],
            images=tuple(images[i] for i in group),
        )
        for n, group in enumerate(groups)
    ]


def image_file_size(root: str, relative: str) -> int:
    """Bytes of an image inside ``root``, the estimate ``--shard-bytes`` groups by: 0 when it is missing or
    resolves outside the root (never even stat a file a hostile id or symlink points to)."""
    try:
        return os.path.getsize(resolve_inside(root, relative))
    except (OSError, UnsafePathError):
        return 0


# ------------------------------------------------------------------------------------- per-shard work


@dataclasses.dataclass(frozen=True)
class ShardJob:
    """What a worker needs besides its plan (picklable; put in the object store once per run)."""

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
    # called as shard_hook(plan, job, path) in the task just before the shard is written (tests inject
    # faults through it; it must pickle, as the job travels to every task)
    shard_hook: Callable[[ShardPlan, ShardJob, str], None] | None = None
    run_id: str | None = None
    split: str = ""
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    # the listing's layout (pipeline.listing.unpack); defaults: PhraseCut's refer_{split}.json
    source_file: str | None = None
    meta_file: str = METADATA_FILES[0]
    image_root: str | None = None


def sidecar_path(base: str, shard: str) -> str:
    return shards.join(base, PARTS_DIR, f"{shard}.json")


def augment(record: ImageRecord, job: ShardJob) -> ImageRecord:
    """The one call into the prompt generator; seeded by (seed, key) so every rerun draws the same."""
    from pipeline import prompts

    rng = prompts.record_rng(job.seed, record.key)
    return prompts.augment_record(
        record, rng=rng, rates=job.prompt_rates or {}, negative_pool=job.negative_pool
    )


def _as_entry(entry: Any, job: ShardJob) -> Any:
    """An ``ImageEntry``, from a packed listing entry (a tuple) when that is what was shipped."""
    if not isinstance(entry, tuple):
        return entry
    source_file = job.source_file or f"refer_{job.split}.json"
    return unpack(entry, job.split, source_file, meta_file=job.meta_file, image_root=job.image_root)


def build_shard(plan: ShardPlan, job: ShardJob) -> dict[str, Any]:
    """Read, validate (and augment) the plan's images, write its shard and sidecar; return the sidecar.

    Pure apart from the two files it writes; runs inside a Ray task, or directly in tests.
    """
    from pipeline.phrasecut import load_image_record

    samples: list[tuple[ImageRecord, bytes]] = []
    rows: list[dict[str, Any]] = []
    quarantine: list[dict[str, Any]] = []
    stats: Counter[str] = Counter()
    inputs = 0
    for packed in plan.entries:
        entry = _as_entry(packed, job)
        inputs += input_records(entry)
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
    if job.shard_hook is not None:
        job.shard_hook(plan, job, path)
    if samples:
        info = shards.write_shard(samples, job.filesystem, path, run_id=job.run_id)
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
        "inputs": inputs,
        "manifest": rows,
        "quarantine": [_jsonable(q) for q in quarantine],
        "stats": dict(sorted(stats.items())),
    }
    shards.write_json_atomic(job.filesystem, sidecar_path(job.base, plan.name), sidecar, run_id=job.run_id)
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


def finished_sidecar(plan: ShardPlan, job: ShardJob, *, verify: bool = True) -> dict[str, Any] | None:
    """The sidecar of a shard a previous run completed with the same inputs and settings, else None.

    With ``verify`` the tar is read back and its sha256 compared with the sidecar's: a shard whose bytes
    changed (a bad disk, a partial copy, an edit) is rewritten even when its size is right.
    """
    fs = job.filesystem
    try:
        sidecar = json.loads(shards.read_bytes(fs, sidecar_path(job.base, plan.name)))
    except (FileNotFoundError, OSError, ValueError):
        return None
    if (
        not isinstance(sidecar, dict)
        or sidecar.get("version") != SIDECAR_VERSION
        or sidecar.get("fingerprint") != job.fingerprint
        or tuple(sidecar.get("keys", ())) != plan.keys
    ):
        return None
    if sidecar["samples"]:
        path = shards.join(job.base, plan.name)
        info = fs.get_file_info(path)
        if info.type != pafs.FileType.File or info.size != sidecar["bytes"]:
            return None
        if verify and shards.file_sha256(fs, path) != (sidecar["bytes"], sidecar["sha256"]):
            return None
    return sidecar


def shard_result(sidecar: dict[str, Any], *, resumed: bool) -> dict[str, Any]:
    """The counts of a sidecar the driver keeps (its rows stay in the sidecar file)."""
    originals = [row["task_id"] for row in sidecar["manifest"] if row["kind"] == "original"]
    return {
        "index": sidecar["index"],
        "shard": sidecar["shard"],
        "images": len(sidecar["keys"]),
        "samples": sidecar["samples"],
        "bytes": sidecar["bytes"],
        "kinds": dict(Counter(row["kind"] for row in sidecar["manifest"])),
        "reasons": dict(Counter(q["reason"] for q in sidecar["quarantine"])),
        "stats": sidecar["stats"],
        "resumed": resumed,
        # record accounting (check_accounting): counts, and task ids repeated inside this shard (repeats
        # across shards are caught while the manifest is streamed, see write_outputs)
        "inputs": sidecar.get("inputs"),
        "originals": len(originals),
        "quarantine_rows": len(sidecar["quarantine"]),
        "repeated": sorted({t for t, n in Counter(originals).items() if n > 1})[:5],
    }


def process_shard(plan: ShardPlan, job: ShardJob) -> dict[str, Any]:
    """One Ray task: keep a verified finished shard, or (re)build it; return its counts."""
    done = finished_sidecar(plan, job)
    if done is not None:
        return shard_result(done, resumed=True)
    return shard_result(build_shard(plan, job), resumed=False)


def _ray_process(row: dict[str, Any], job: ShardJob) -> dict[str, Any]:
    """The Ray task's function: ``row = {"index": shard index, "plan": ShardPlan}`` (looked up when the
    job runs, so a test can wrap it to see where each shard's task ran)."""
    return process_shard(row["plan"], job)


# ------------------------------------------------------------------------------------------- driver


def _pool_rank(seed: int, entry: tuple[str, str]) -> int:
    digest = hashlib.sha256(f"{seed}\x00{entry[0]}\x00{entry[1]}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def text_usable(raw: dict[str, Any]) -> bool:
    """Whether a listed task's id and text pass the reader's checks (pipeline/validate.py)."""
    return (
        id_error(raw["task_id"]) is None
        and text_error(raw["phrase"]) is None
        and structure_error(raw["phrase_structure"]) is None
    )


def negative_pool_for(
    entries: Iterable[Any], config: PrepareConfig, max_size: int = NEGATIVE_POOL_SIZE
) -> tuple[tuple[str, str], ...]:
    """(name, phrase) of at most ``max_size`` distinct original phrases of the listing, shipped to every task.

    A bottom-k sample: the distinct entries with the smallest seeded hash rank. That is a uniform sample
    of the distinct phrases drawn in ``O(max_size)`` memory, whatever the number of tasks (no set of every
    phrase seen), and independent of the listing's order; the pool is ordered by rank.
    """
    from pipeline import prompts

    heap: list[tuple[int, tuple[str, str]]] = []  # (-rank, entry): the largest kept rank on top
    kept: set[tuple[str, str]] = set()
    for record in listing_records(entries, config):
        for entry in prompts.negative_pool_entries(record.tasks):
            if entry in kept:
                continue
            rank = _pool_rank(config.seed, entry)
            if len(heap) < max_size:
                heapq.heappush(heap, (-rank, entry))
                kept.add(entry)
            elif heap and rank < -heap[0][0]:
                _, gone = heapq.heapreplace(heap, (-rank, entry))
                kept.discard(gone)
                kept.add(entry)
    return tuple(entry for _, entry in sorted(heap, key=lambda item: (-item[0], item[1])))


def listing_records(entries: Iterable[Any], config: PrepareConfig) -> Iterator[ImageRecord]:
    """Phrase-only records from the listing (the pool needs phrases and names, not pixels or polygons)."""
    for entry in entries:
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
        yield ImageRecord(
            source=config.source,
            image_id=entry.image_id,
            split=entry.split,
            width=(meta_size(meta)[0] or (0, 0))[0],  # unchecked rows: the reader quarantines them
            height=(meta_size(meta)[0] or (0, 0))[1],
            tasks=tasks,
        )


def _packed_bytes(entries: Sequence[Any]) -> int:
    """About the bytes a shard's packed entries take in the object store (0 for other entry types)."""
    return sum(
        sum(map(len, e[2])) + len(e[1] or "") + 200 * len(e[3]) if isinstance(e, tuple) else 0
        for e in entries
    )


def _map_plans(
    plans: Sequence[ShardPlan],
    job: ShardJob,
    on_result: Callable[[dict[str, Any]], None],
    *,
    load: Callable[[ShardPlan], list[Any]] | None = None,
    check: Callable[[], None] = lambda: None,
    window: int | None = None,
    max_inflight_bytes: int = MAX_INFLIGHT_BYTES,
) -> None:
    """Run :func:`process_shard` (via :func:`_ray_process`) for every plan as a Ray task, at most ``window`` (2 per CPU) in flight.

    ``load`` fills a plan's entries just before it is submitted; they travel inside the task's arguments
    (never via the driver's disk, which other nodes cannot see). The shards in flight also stay under
    ``max_inflight_bytes`` of task JSON (one at least), so the driver's and the object store's share does
    not grow with the cluster either. On a task error the others are cancelled and awaited, then it raises.
    """
    import ray

    if window is None:
        window = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
    remote = ray.remote(num_cpus=1)(_ray_process)
    job_ref = ray.put(job)
    pending: dict[Any, int] = {}  # ref -> bytes of its arguments
    inflight = 0
    todo = iter(plans)
    upcoming: ShardPlan | None = None
    try:
        while True:
            while len(pending) < window:
                if upcoming is None:
                    plan = next(todo, None)
                    if plan is None:
                        break
                    upcoming = dataclasses.replace(plan, entries=load(plan)) if load is not None else plan
                size = _packed_bytes(upcoming.entries)
                if pending and inflight + size > max_inflight_bytes:
                    break
                pending[remote.remote({"index": upcoming.index, "plan": upcoming}, job_ref)] = size
                inflight += size
                upcoming = None
            if not pending:
                return
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                inflight -= pending.pop(ref)
                on_result(ray.get(ref))
            check()
    except BaseException:
        for ref in pending:
            ray.cancel(ref)
        if pending:  # a cancelled task may be writing: wait, so the caller's cleanup sees the final state
            ray.wait(list(pending), num_returns=len(pending), timeout=60)
        raise


def remove_markers(filesystem: pafs.FileSystem, base: str) -> list[str]:
    """Delete the completion markers of an earlier run (manifest and sizes first): until this run writes
    them again, the folder reads as unfinished, whatever happens in between."""
    removed = []
    for name in MARKERS:
        path = shards.join(base, name)
        if shards.exists(filesystem, path):
            filesystem.delete_file(path)
            removed.append(name)
    return removed


def remove_stale_shards(
    filesystem: pafs.FileSystem, base: str, split: str, plans: Sequence[ShardPlan]
) -> list[str]:
    """Shards (and sidecars) of this split that the plan does not name: left by an earlier, larger run."""
    wanted = {p.name for p in plans}
    removed = []
    for path in shards.list_shards(base, split, filesystem):
        if posixpath.basename(path) not in wanted:
            filesystem.delete_file(path)
            removed.append(posixpath.basename(path))
    for info in filesystem.get_file_info(
        pafs.FileSelector(shards.join(base, PARTS_DIR), allow_not_found=True)
    ):
        name = info.base_name.removesuffix(".json")
        parsed = shards.parse_shard_name(name)
        if info.type == pafs.FileType.File and parsed and parsed[0] == split and name not in wanted:
            filesystem.delete_file(info.path)
    return removed


def write_outputs(
    plans: Sequence[ShardPlan], job: ShardJob, summary: dict[str, Any], *, batch_rows: int = 8192
) -> None:
    """Quarantine, summary, then manifest and sizes (the completion markers), streamed from the sidecars.

    The manifest goes to its temp name shard by shard (rows in canonical order: shards in name order,
    rows sorted inside each) and is published after the quarantine and summary.
    """
    from pipeline.quarantine import write_quarantine

    fs, base = job.filesystem, job.base
    quarantine: list[dict[str, Any]] = []
    sizes: dict[str, int] = {}
    seen: set[bytes] = set()  # 8-byte digests of the original task ids: ~70 B a task, not the ids
    repeated: list[str] = []
    with shards.publishing(fs, shards.join(base, mf.MANIFEST), job.run_id) as stream:
        writer = pq.ParquetWriter(stream, mf.MANIFEST_SCHEMA)
        rows: list[dict[str, Any]] = []
        for plan in sorted(plans, key=lambda p: p.name):
            sidecar = json.loads(shards.read_bytes(fs, sidecar_path(base, plan.name)))
            for row in sidecar["manifest"]:
                if row["kind"] == "original":
                    digest = hashlib.blake2b(row["task_id"].encode(), digest_size=8).digest()
                    if digest in seen:
                        repeated.append(row["task_id"])
                    seen.add(digest)
            rows += mf.sort_rows(sidecar["manifest"])
            quarantine += sidecar["quarantine"]
            if sidecar["samples"]:
                sizes[plan.name] = sidecar["samples"]
            if len(rows) >= batch_rows:
                writer.write_table(pa.Table.from_pylist(rows, schema=mf.MANIFEST_SCHEMA))
                rows = []
        writer.write_table(pa.Table.from_pylist(rows, schema=mf.MANIFEST_SCHEMA))
        writer.close()
        if repeated:  # raising here unpublishes the manifest: the folder stays unfinished
            raise AccountingError(
                "record accounting failed, not marking the job complete: task ids written more than once: "
                f"{sorted(repeated)[:5]}"
            )
        write_quarantine(shards.join(base, mf.QUARANTINE), quarantine, filesystem=fs)
        shards.write_json_atomic(fs, shards.join(base, mf.SUMMARY), summary, run_id=job.run_id)
    shards.write_json_atomic(fs, shards.join(base, mf.SIZES), dict(sorted(sizes.items())), run_id=job.run_id)


def run_prepare(
    config: PrepareConfig,
    *,
    filesystem: pafs.FileSystem | None = None,
    log: Callable[[str], None] = print,
    cpus: float | None = None,
    shard_hook: Callable[[ShardPlan, ShardJob, str], None] | None = None,
) -> dict[str, Any]:
    """Run the job on the current Ray instance (the caller starts it); return the summary dict.

    ``shard_hook(plan, job, path)`` runs inside each shard's task just before its tar is written (a picklable
    callable; tests use it to crash a task halfway).

    Raises :class:`pipeline.runlock.OutputLocked` when another run is writing to the same output.
    """
    start = time.perf_counter()
    fs, base = shards.resolve(config.out, filesystem)
    run_id = shards.new_run_id()
    lock = RunLock(fs, base, run_id, break_lock=config.break_lock).acquire()
    try:
        summary = _run_locked(config, fs, base, run_id, lock, log, cpus, start, shard_hook)
    except BaseException:
        lock.release("failed")
        raise
    lock.release()
    return summary


def open_listing(config: PrepareConfig) -> Listing:
    """The listing of the configured source and split (read on the driver; see :mod:`pipeline.listing`)."""
    if config.source in REFER_SOURCES:
        return refer_listing(
            config.root, config.split, config.source, split_by=config.split_by, image_root=config.image_root
        )
    return Listing(config.root, config.split, source=config.source)


def _run_locked(
    config: PrepareConfig,
    fs: pafs.FileSystem,
    base: str,
    run_id: str,
    lock: RunLock,
    log: Callable[[str], None],
    cpus: float | None,
    start: float,
    shard_hook: Callable[[ShardPlan, ShardJob, str], None] | None = None,
) -> dict[str, Any]:
    removed_markers = remove_markers(fs, base)
    if removed_markers:
        log(f"prepare: removed the completion markers of an earlier run ({', '.join(removed_markers)})")
    previous = (lock.previous or {}).get("run_id")
    if isinstance(previous, str):
        removed = shards.remove_temp_files(fs, base, run_ids=[previous])
        if removed:
            log(f"prepare: removed {len(removed)} temp file(s) left by run {previous}")
    foreign = shards.temp_files(fs, base)
    if foreign:
        log(f"prepare: left {len(foreign)} temp file(s) of other writers in place (e.g. {foreign[0]})")

    with open_listing(config) as listing:
        plans = plan_listing(listing, config)
        pool: tuple[tuple[str, str], ...] = ()
        if config.synthetic_prompts:
            pool = negative_pool_for(listing.entries(order="key"), config)
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
            shard_hook=shard_hook,
            run_id=run_id,
            split=config.split,
            max_pixels=config.max_pixels,
            max_image_bytes=config.max_image_bytes,
            source_file=listing.source_file,
            meta_file=listing.meta_file,
            image_root=listing.image_root,
        )
        log(
            f"prepare: {len(listing)} images ({listing.num_tasks} tasks) in {len(plans)} shards "
            f"-> {config.out} (run {run_id})"
        )
        results: dict[int, dict[str, Any]] = {}
        progress = Progress(len(listing), label="prepare", unit="images", every=config.progress_every)

        def on_result(result: dict[str, Any]) -> None:
            results[result["index"]] = result
            progress.update(result["images"], shards=f"{len(results)}/{len(plans)}")

        _map_plans(plans, job, on_result, load=lambda plan: listing.packed(plan.images), check=lock.check)
        progress.close()
        inputs = listing.num_tasks + listing.num_issues  # every record of the refer file, as input_records

    removed = remove_stale_shards(fs, base, config.split, plans)
    if removed:
        log(f"prepare: removed {len(removed)} shard(s) of an earlier, larger run")
    ordered = [results[p.index] for p in plans]
    resumed = sum(r["resumed"] for r in ordered)
    processed = sum(r["images"] for r in ordered if not r["resumed"])
    seconds = time.perf_counter() - start
    summary = summarize(
        ordered, config, seconds=seconds, resumed=resumed, processed=processed, cpus=cpus, inputs=inputs
    )
    write_outputs(plans, job, summary)
    log(summary_table(summary))
    return summary


def summarize(
    results: Sequence[dict[str, Any]],
    config: PrepareConfig,
    *,
    seconds: float,
    resumed: int = 0,
    processed: int | None = None,
    cpus: float | None = None,
    inputs: int | None = None,
) -> dict[str, Any]:
    """Counts over all shards (resumed ones included, from :func:`shard_result`); rates over the images
    this run processed.

    Raises :class:`AccountingError` unless every input record is accounted for (``check_accounting``):
    the caller writes the completion markers only after this returns.
    """
    accounting = check_accounting(results, inputs)
    kinds: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    stats: Counter[str] = Counter()
    for r in results:
        kinds.update(r["kinds"])
        reasons.update(r["reasons"])
        stats.update(r["stats"])
    images = sum(r["samples"] for r in results)
    listed = sum(r["images"] for r in results)
    processed = listed if processed is None else processed
    rate = round(processed / seconds, 2) if seconds > 0 else None
    refer = {"split_by": config.split_by} if config.split_by is not None else {}
    return {
        "source": config.source,
        "split": config.split,
        **refer,
        "images_listed": listed,
        "images": images,
        "tasks": sum(kinds.values()),
        "tasks_per_kind": dict(sorted(kinds.items())),
        "quarantined": sum(reasons.values()),
        "quarantined_per_reason": dict(sorted(reasons.items())),
        "accounting": accounting,
        "shards": sum(1 for r in results if r["samples"]),
        "shards_resumed": resumed,
        "bytes": sum(r["bytes"] for r in results),
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
        if "manifest" in s:  # a whole sidecar
            originals = [row["task_id"] for row in s["manifest"] if row["kind"] == "original"]
            repeated.update(t for t in originals if t in seen)
            seen.update(originals)
            n_written, n_quarantined = len(originals), len(s["quarantine"])
        else:  # a shard_result: counts only (repeats across shards: write_outputs)
            repeated.update(s["repeated"])
            n_written, n_quarantined = s["originals"], s["quarantine_rows"]
        written += n_written
        quarantined += n_quarantined
        if s.get("inputs") is not None:
            listed += s["inputs"]
            if s["inputs"] != n_written + n_quarantined:
                problems.append(
                    f"shard {s['shard']}: {s['inputs']} input records, {n_written} written + "
                    f"{n_quarantined} quarantined"
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
