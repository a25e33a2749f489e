"""S3 against local disk, side by side in one process: the training loader's samples/s, and the whole tiny
pipeline's wall time (prepare → train with 2 Ray workers → eval) with every output on S3 or on local disk.

    python benchmarks/s3_vs_local.py                       # 300 images ~480 px, then the tiny pipeline
    python benchmarks/s3_vs_local.py --skip-pipeline --json

The S3 server is a real one started here on 127.0.0.1 (SeaweedFS ``weed mini`` from the dev extras, see
``tests/s3_server.py``), so the figures measure the S3 code path (pyarrow's S3 client, HTTP, request
count, buffering) with no network latency or bandwidth limit: a lower bound of the cost of S3 in a
cluster. Loader runs alternate local / S3 and the best of ``--repeats`` is reported for each.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.loader_throughput import tokenize, write_shards
from pipeline import storage
from pipeline.loader import DataConfig, make_train_loader
from tests.s3_server import aws_environment, start_s3_server


def upload(folder: Path, uri: str) -> None:
    for file in sorted(folder.iterdir()):
        storage.write_bytes(storage.join(uri, file.name), file.read_bytes())


def time_loader(location: str, size: int, batch: int, batches: int, workers: int) -> float:
    """Tasks per wall-clock second of ``batches`` training batches (loader start-up included)."""
    loader, _ = make_train_loader(
        DataConfig(train_shards=str(location), num_workers=workers, shuffle_buffer=100),
        batch_size=batch,
        image_size=size,
        tokenizer=tokenize,
        seed=0,
        steps_per_epoch=batches,
    )
    start = time.perf_counter()
    n = sum(len(b["task_id"]) for b in loader)
    return n / (time.perf_counter() - start)


def time_read(location: str) -> float:
    """MB/s of streaming every shard once through ``pipeline.storage.open_input`` (no decoding)."""
    from pipeline.loader import list_shards

    urls, _ = list_shards(location, "train")
    start, total = time.perf_counter(), 0
    for url in urls:
        with storage.open_input(url) as stream:
            while chunk := stream.read(1 << 20):
                total += len(chunk)
    return total / 1e6 / (time.perf_counter() - start)


def pipeline_seconds(root: Path, clip: Path, where: str, work: Path, steps: int) -> dict[str, float]:
    """prepare (train/val/test) → train (2 workers, ``steps``) → eval (2 workers), outputs under ``where``."""
    from jobs.eval import run_eval
    from jobs.train import run_training
    from pipeline.prepare import PrepareConfig, run_prepare
    from tests.fixtures_train import tiny_experiment

    times: dict[str, float] = {}
    start = time.perf_counter()
    for split in ("train", "val", "test"):
        config = PrepareConfig(
            source="scenes",
            root=str(root / "scenes"),
            split=split,
            out=storage.join(where, "data", split),
            shard_samples=7,
            synthetic_prompts=split == "train",
            seed=0,
            progress_every=600.0,
        )
        run_prepare(config, log=lambda _: None)
    times["prepare"] = time.perf_counter() - start
    mark = time.perf_counter()
    cfg = tiny_experiment(
        root,
        clip,
        work,
        f"data.train_shards={storage.join(where, 'data', 'train')}",
        f"data.val_shards={storage.join(where, 'data', 'val')}",
        f"train.storage_path={storage.join(where, 'ray_results')}",
        f"train.best_path={storage.join(where, 'best')}",
        f"train.steps={steps}",
        f"train.ckpt_every={steps // 2}",
        f"train.val_every={steps // 2}",
        "train.log_every=2",
        "train.overlays=0",
        "train.run_name=bench",
    )
    out = run_training(cfg)
    times["train"] = time.perf_counter() - mark
    mark = time.perf_counter()
    run_eval(
        out["best_checkpoint"],
        storage.join(where, "data", "test"),
        out=storage.join(where, "eval"),
        official_dir=storage.join(where, "pngs"),
        num_workers=2,
        batch_size=8,
    )
    times["eval"] = time.perf_counter() - mark
    times["total"] = time.perf_counter() - start
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--size", type=int, default=352)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8, help="training steps of the tiny pipeline")
    parser.add_argument("--skip-pipeline", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    results: dict = {"args": vars(args)}
    with tempfile.TemporaryDirectory(prefix="segvlm-s3-bench-") as tmp_name:
        tmp = Path(tmp_name)
        server = start_s3_server(tmp / "s3")
        try:
            with aws_environment(server):
                local = tmp / "shards"
                write_shards(local, args.images, tasks=4)
                remote = server.uri("bench", "shards")
                upload(local, remote)
                rates: dict[str, list[float]] = {}
                for name, location in [("local", str(local)), ("s3", remote)] * args.repeats:
                    rates.setdefault(f"read_mb_s/{name}", []).append(time_read(location))
                for workers in (0, 2):
                    for name, location in [("local", str(local)), ("s3", remote)] * args.repeats:
                        rate = time_loader(location, args.size, args.batch, args.batches, workers)
                        rates.setdefault(f"loader_samples_s/workers{workers}/{name}", []).append(rate)
                best = {key: max(values) for key, values in rates.items()}
                results["loader"] = best
                for key in sorted(best):
                    if key.endswith("/local"):
                        base = key[: -len("/local")]
                        ratio = best[f"{base}/s3"] / best[key]
                        results["loader"][f"{base}/s3_over_local"] = ratio
                        print(
                            f"{base:32s} local {best[key]:9.1f}  s3 {best[base + '/s3']:9.1f}  s3/local {ratio:.3f}"
                        )
                if not args.skip_pipeline:
                    results["pipeline"] = run_pipelines(tmp, server, args.steps)
        finally:
            server.stop()
    if args.json:
        print(json.dumps(results, indent=1))


def run_pipelines(tmp: Path, server, steps: int) -> dict:
    import ray

    from jobs.common import init_ray
    from pipeline.scenes import SCENE_WORDS, write_scenes
    from segvlm.backbone import make_tiny_clip
    from segvlm.tokenizer import DEFAULT_TINY_WORDS
    from tests.fixtures_train import IMAGE_SIZE

    init_ray(None, num_cpus=2)
    try:
        root = tmp / "pipeline"
        write_scenes(root / "scenes", n_images=60, seed=3, size=IMAGE_SIZE)
        clip = make_tiny_clip(root / "clip", words=sorted(set(SCENE_WORDS) | set(DEFAULT_TINY_WORDS)))
        out = {}
        # local first, S3 second, then local again: the first run also warms caches (imports, Ray workers)
        for name, where in (
            ("local", str(root / "local")),
            ("s3", server.uri("pipeline")),
            ("local2", str(root / "local2")),
        ):
            out[name] = pipeline_seconds(root, clip, where, root / f"work-{name}", steps)
            print(
                f"pipeline {name:7s} " + "  ".join(f"{k} {v:6.1f} s" for k, v in out[name].items()),
                flush=True,
            )
        local_total = min(out["local"]["total"], out["local2"]["total"])
        out["s3_over_local_total"] = out["s3"]["total"] / local_total
        print(f"pipeline wall time s3/local: {out['s3_over_local_total']:.3f}")
        return out
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
