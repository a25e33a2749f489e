"""Make a synthetic prompt dataset from a finished shard set: same images, more phrases per image.

Launch::

    segvlm synth-prompts --shards shards/train --out shards/train_prompts \\
        [--rates template=1 recomposed=0.5 relation_rewrite=1 negative=0.2] [--seed 0] [--split train]
    # same as: python -m jobs.synth_prompts ...; --shards and --out may be URIs (s3://, gs://, memory://)

For every input shard ``{split}-{n}.tar`` it writes a shard of the same name and the same images whose
samples hold the original tasks, unchanged, plus the generated prompts (``pipeline.prompts``); then
``summary.json``, an empty ``quarantine.parquet``, and last ``manifest.parquet`` + ``sizes.json`` (the
completion markers), through the shard set's own writers. Rates are expected prompts per original task
and kind; the unnamed kinds keep their defaults. Negatives are drawn from phrases of the same split only,
so validation phrases never leak into training data. Prompts an input set already holds (it was prepared
with ``--synthetic-prompts``) are dropped and regenerated: the output depends only on the originals, the
rates and the seed, and a rerun rewrites the same bytes. Images are never decoded or re-encoded.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import posixpath
import random
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping
from typing import Any

import pyarrow.fs as pafs

from pipeline import manifest as mf
from pipeline import prompts, shards
from pipeline.progress import Progress, format_table
from pipeline.runlock import OutputLocked, RunLock
from pipeline.schema import ImageRecord

PROG = "segvlm synth-prompts"
SUMMARY_VERSION = 1


class UsageError(Exception):
    """A bad input: printed as one line, exit code 2."""


def originals_only(record: ImageRecord) -> tuple[ImageRecord, int]:
    """The record with generated tasks removed, and how many were removed."""
    kept = [t for t in record.tasks if t.kind == "original"]
    return dataclasses.replace(record, tasks=kept), len(record.tasks) - len(kept)


def _split_of(path: str) -> str:
    parsed = shards.parse_shard_name(path)
    assert parsed is not None  # list_shards only returns parseable names
    return parsed[0]


def _same_location(a: tuple[pafs.FileSystem, str], b: tuple[pafs.FileSystem, str]) -> bool:
    return a[1].rstrip("/") == b[1].rstrip("/") and a[0].type_name == b[0].type_name


def run_synth_prompts(
    shards_dir: str,
    out: str,
    *,
    rates: Mapping[str, float],
    seed: int = 0,
    split: str | None = None,
    pool_size: int = 10000,
    overwrite: bool = False,
    break_lock: bool = False,
    filesystem: pafs.FileSystem | None = None,
    log: Callable[[str], None] = print,
    progress_every: float = 5.0,
) -> dict[str, Any]:
    """Write the prompt set of ``shards_dir`` (optionally one split) to ``out``; return the summary.

    ``filesystem`` (tests, custom stores) is used for both locations; otherwise each is resolved from
    its URI. Raises UsageError for an unfinished or empty input, ``out`` equal to the input, or an ``out``
    that already holds a finished set (unless ``overwrite``); :class:`pipeline.runlock.OutputLocked` when
    another run (this job's or ``prepare``'s) is writing to ``out``.
    """
    start = time.perf_counter()
    rates = prompts.validate_rates(rates)
    src = shards.resolve(shards_dir, filesystem)
    dst_fs, base = shards.resolve(out, filesystem)
    if _same_location(src, (dst_fs, base)):
        raise UsageError("--out must differ from --shards: the input set would be overwritten while read")
    if not mf.is_complete(shards_dir, filesystem):
        raise UsageError(f"{shards_dir} is not a finished shard set (no manifest.parquet/sizes.json)")
    inputs = shards.list_shards(shards_dir, split, filesystem)
    if not inputs:
        raise UsageError(f"no shards{f' of split {split!r}' if split else ''} in {shards_dir}")
    run_id = shards.new_run_id()
    with RunLock(dst_fs, base, run_id, break_lock=break_lock) as lock:
        if mf.is_complete(out, filesystem):
            if not overwrite:
                raise UsageError(f"{out} already holds a finished shard set; pass --overwrite to replace it")
            # Remove the completion markers first: while we rewrite, the folder reads as unfinished.
            for name in (mf.MANIFEST, mf.SIZES):
                dst_fs.delete_file(shards.join(base, name))
        previous = (lock.previous or {}).get("run_id")
        # that run is over (we hold the lock): its leftovers may go, no one else's
        if isinstance(previous, str):
            removed = shards.remove_temp_files(dst_fs, base, run_ids=[previous])
            if removed:
                log(f"{PROG}: removed {len(removed)} temp file(s) left by run {previous}")

        by_split: dict[str, list[str]] = defaultdict(list)
        for path in inputs:
            by_split[_split_of(path)].append(path)

        # Pass 1: the negative pool of each split, from its original phrases only.
        pools: dict[str, list[tuple[str, str]]] = {}
        for name, paths in sorted(by_split.items()):
            records = (rec for path in paths for rec, _ in shards.iter_shard(src[0], path))
            pools[name] = prompts.build_negative_pool(records, max_size=pool_size, rng=random.Random(seed))
        log(
            f"{PROG}: {len(inputs)} shard(s) -> {out}; negative pool "
            + ", ".join(f"{k} {len(v)}" for k, v in pools.items())
        )

        # Pass 2: one output shard per input shard, same name, same images.
        expected = mf.load_sizes(shards_dir, filesystem)
        total = sum(expected.get(posixpath.basename(p), 0) for p in inputs) or None
        progress = Progress(total, label="synth-prompts", unit="images", every=progress_every)
        rows: list[dict[str, Any]] = []
        sizes: dict[str, int] = {}
        written_bytes = 0
        dropped = 0
        for path in inputs:
            shard = posixpath.basename(path)
            pool = pools[_split_of(path)]
            samples = []
            for record, jpg in shards.iter_shard(src[0], path):
                record, n_dropped = originals_only(record)
                dropped += n_dropped
                rng = prompts.record_rng(seed, record.key)
                samples.append(
                    (prompts.augment_record(record, rng=rng, rates=rates, negative_pool=pool), jpg)
                )
            lock.check()  # stop if another run took the output over
            info = shards.write_shard(samples, dst_fs, shards.join(base, shard), run_id=run_id)
            sizes[shard] = info.samples
            written_bytes += info.bytes
            rows += [row for record, _ in samples for row in mf.manifest_rows(record, shard)]
            progress.update(info.samples, shards=f"{len(sizes)}/{len(inputs)}")
        progress.close()

        # Shards of an earlier, larger run in the same folder would look like part of this set.
        for stale in shards.list_shards(out, None, filesystem):
            if posixpath.basename(stale) not in sizes:
                dst_fs.delete_file(stale)

        kinds = Counter(row["kind"] for row in rows)
        seconds = time.perf_counter() - start
        summary = {
            "version": SUMMARY_VERSION,
            "job": "synth-prompts",
            "input": str(shards_dir),
            "input_manifest_sha256": mf.manifest_hash(shards_dir, filesystem),
            "split": split,
            "splits": sorted(by_split),
            "seed": seed,
            "prompt_rates": rates,
            "negative_pool": {k: len(v) for k, v in sorted(pools.items())},
            "images": sum(sizes.values()),
            "tasks": len(rows),
            "tasks_per_kind": dict(sorted(kinds.items())),
            "input_generated_dropped": dropped,
            "shards": len(sizes),
            "bytes": written_bytes,
            "seconds": round(seconds, 3),
            "fingerprint": _fingerprint(rates, seed, split, pool_size),
        }
        shards.write_json_atomic(dst_fs, shards.join(base, mf.SUMMARY), summary, run_id=run_id)
        from pipeline.quarantine import write_quarantine

        write_quarantine(shards.join(base, mf.QUARANTINE), [], filesystem=dst_fs)  # nothing is set aside here
        lock.check()
        mf.write_manifest(dst_fs, base, rows, sizes)  # last: the completion markers
    log(summary_table(summary))
    return summary


def _fingerprint(rates: Mapping[str, float], seed: int, split: str | None, pool_size: int) -> str:
    content = {"rates": sorted(rates.items()), "seed": seed, "split": split, "pool_size": pool_size}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def summary_table(summary: Mapping[str, Any]) -> str:
    rows: list[tuple[str, Any]] = [("images", summary["images"]), ("tasks", summary["tasks"])]
    rows += [(f"  kind {k}", v) for k, v in summary["tasks_per_kind"].items()]
    rows += [("shards", summary["shards"]), ("MB written", summary["bytes"] / 1e6),
             ("seconds", float(summary["seconds"]))]  # fmt: skip
    return format_table(rows, title=f"synth-prompts {summary['input']}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--shards", required=True, help="a finished shard set: folder or URI")
    parser.add_argument("--out", required=True, help="folder or URI for the prompt set (not the input)")
    parser.add_argument(
        "--rates",
        nargs="*",
        default=[],
        metavar="KIND=R",
        help="expected prompts per original task; kinds: " + ", ".join(
            f"{k} (default {v:g})" for k, v in prompts.DEFAULT_RATES.items()),
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="with the image key, seeds each image's draws")
    parser.add_argument("--split", default=None, help="only the shards of this split (default: all)")
    parser.add_argument("--pool-size", type=int, default=10000, help="negative phrases kept per split")
    parser.add_argument("--overwrite", action="store_true", help="replace a finished set at --out")
    parser.add_argument(
        "--break-lock",
        action="store_true",
        help="take over --out although another run holds its lock (only when that run is known to be dead)",
    )
    parser.add_argument("--progress-every", type=float, default=5.0, help="seconds between progress lines")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """``segvlm synth-prompts --shards DIR --out DIR [--rates kind=R ...] [--seed S] [--split SPLIT]``."""
    args = parse_args(argv)
    try:
        try:
            rates = prompts.parse_rates(args.rates)
        except ValueError as err:
            raise UsageError(f"--rates: {err}") from None
        if args.pool_size < 0:
            raise UsageError(f"--pool-size must be >= 0, got {args.pool_size}")
        run_synth_prompts(
            args.shards,
            args.out,
            rates=rates,
            seed=args.seed,
            split=args.split,
            pool_size=args.pool_size,
            overwrite=args.overwrite,
            break_lock=args.break_lock,
            progress_every=args.progress_every,
        )
    except UsageError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    except OutputLocked as err:
        print(f"{PROG}: {err}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
