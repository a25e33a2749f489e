"""Weighted mixtures and RLE targets in the training loader, each against its baseline in this process.

    python benchmarks/mixture_loader.py            # 200 images ~480 px, 4 tasks each, 352 px crops
    python benchmarks/mixture_loader.py --json

1. Mixture: the same images read as one source, and split into two sources mixed 0.5 / 0.5 (each source
   has its own shard stream and image shuffle buffer): samples per CPU-second, ratio mixture / single.
   (Memory: each source adds one image shuffle buffer of compressed samples, ``shuffle_buffer`` × the
   mean JPEG size, about 10 MB here; not measured, as in one process the first loader's RSS growth
   includes warm-up that the second does not pay.)
2. Targets: the training crop's target mask of every task, rasterised from its polygons (the PhraseCut
   path) vs decoded from the same shape stored as a COCO RLE at the original size, cropped and resized
   (the path of crowd regions in the RefCOCO family): masks per CPU-second, ratio RLE / polygons, and
   how many pixels differ between the two (the polygon's own raster is the RLE's source, so they differ
   only by the nearest-neighbour resize).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from loader_throughput import cpu_seconds, tokenize, write_shards

from pipeline.loader import DataConfig, ShardSource, make_train_loader
from segvlm.masks import encode_rle, rasterize_polygons
from segvlm.preprocess import target_mask_array


def split_folder(folder: Path, into: list[Path]) -> None:
    """Shards of ``folder`` dealt round-robin into the folders of ``into`` (each gets its sizes.json)."""
    sizes = json.loads((folder / "sizes.json").read_text())
    parts: list[dict[str, int]] = [{} for _ in into]
    for i, name in enumerate(sorted(sizes)):
        into[i % len(into)].mkdir(parents=True, exist_ok=True)
        shutil.copy(folder / name, into[i % len(into)] / name)
        parts[i % len(into)][name] = sizes[name]
    for target, part in zip(into, parts):
        (target / "sizes.json").write_text(json.dumps(part))


def time_loader(shards: str | tuple[ShardSource, ...], size: int, batch: int, batches: int) -> dict:
    """Samples per CPU-second and per wall second of one in-process loader."""
    loader, _ = make_train_loader(
        DataConfig(train_shards=shards, num_workers=0, shuffle_buffer=200, task_shuffle_buffer=64),
        batch_size=batch,
        image_size=size,
        tokenizer=tokenize,
        seed=0,
        steps_per_epoch=batches + 1,
    )
    it = iter(loader)
    next(it)
    start, cpu, n = time.perf_counter(), cpu_seconds(), 0
    for b in it:
        n += b["pixel_values"].shape[0]
    wall, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    return {"per_cpu_s": n / cpu, "per_wall_s": n / wall}


def time_targets(rows: list[tuple], size: int, repeats: int) -> dict:
    """Every task's target mask in a random crop, from polygons and from an RLE of the same shape."""
    rng = np.random.default_rng(0)
    work = []
    for _, record in rows:
        w, h = record.width, record.height
        for task in record.tasks:
            side = int(rng.integers(min(w, h) // 2, min(w, h) + 1))
            x0, y0 = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
            box = (float(x0), float(y0), float(x0 + side), float(y0 + side))
            rle = encode_rle(rasterize_polygons(task.polygons, w, h))
            work.append((task.polygons, rle, box, w, h))

    def run(kind: str) -> tuple[float, list[np.ndarray]]:
        masks: list[np.ndarray] = []
        cpu = cpu_seconds()
        for _ in range(repeats):
            masks = []
            for polygons, rle, box, w, h in work:
                if kind == "polygons":
                    masks.append(target_mask_array(polygons, box, size))
                else:
                    masks.append(
                        target_mask_array([], box, size, rles=[rle], stored_size=(w, h), original_size=(w, h))
                    )
        return len(work) * repeats / (cpu_seconds() - cpu), masks

    polygon_rate, polygon_masks = run("polygons")
    rle_rate, rle_masks = run("rle")
    differ = [float((a != b).mean()) for a, b in zip(polygon_masks, rle_masks)]
    return {
        "tasks": len(work),
        "polygons_per_cpu_s": polygon_rate,
        "rle_per_cpu_s": rle_rate,
        "ratio": rle_rate / polygon_rate,
        "mean_pixels_differing": float(np.mean(differ)),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--tasks", type=int, default=4, help="tasks per image")
    parser.add_argument("--size", type=int, default=352)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3, help="passes over the tasks for the target timing")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    result: dict[str, float | int] = {"images": args.images, "cpus": os.cpu_count() or 0}
    with tempfile.TemporaryDirectory(prefix="segvlm-mixture-bench-") as tmp:
        whole = Path(tmp) / "whole"
        rows = write_shards(whole, args.images, args.tasks, per_shard=25)
        halves = [Path(tmp) / "a", Path(tmp) / "b"]
        split_folder(whole, halves)
        mixture = tuple(ShardSource(str(h), 0.5) for h in halves)
        single = time_loader(str(whole), args.size, args.batch, args.batches)
        mixed = time_loader(mixture, args.size, args.batch, args.batches)
        print(
            f"loader  single source {single['per_cpu_s']:6.1f} samples per CPU-s "
            f"(wall {single['per_wall_s']:6.1f}/s)   "
            f"two sources 0.5/0.5 {mixed['per_cpu_s']:6.1f} (wall {mixed['per_wall_s']:6.1f}/s)   ratio {mixed['per_cpu_s'] / single['per_cpu_s']:.2f}×"
        )
        targets = time_targets(rows, args.size, args.repeats)
        print(
            f"targets {targets['tasks']} tasks at {args.size} px: polygons {targets['polygons_per_cpu_s']:7.1f} "
            f"per CPU-s, RLE {targets['rle_per_cpu_s']:7.1f} per CPU-s   ratio {targets['ratio']:.2f}×   "
            f"pixels differing {100 * targets['mean_pixels_differing']:.2f} %"
        )
    result |= {f"single_{k}": round(v, 2) for k, v in single.items()}
    result |= {f"mixture_{k}": round(v, 2) for k, v in mixed.items()}
    result["mixture_ratio"] = round(mixed["per_cpu_s"] / single["per_cpu_s"], 3)
    result |= {f"targets_{k}": round(v, 4) for k, v in targets.items()}
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
