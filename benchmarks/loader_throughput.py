"""Training-loader throughput: samples/s per core of ``pipeline.loader.make_train_loader`` against a naive
per-task loader, on shards generated here.

    python benchmarks/loader_throughput.py                 # 300 images ~480 px, 4 tasks each, 352 and 128 px
    python benchmarks/loader_throughput.py --images 100 --json

The figure per core is samples per CPU-second (user + system time of the process and its finished
DataLoader workers), which stays meaningful on a shared machine where wall-clock rates drop with the
load; wall-clock rates are printed beside it. ``num_workers=0`` runs everything in-process; the
``num_workers=1`` run moves the same work into one worker (its start-up is included), so both should agree. The naive baseline runs in the same process on the same data and crop boxes: for every
task it opens the JPEG, decodes it at full size, converts to a tensor, crops and resizes torchvision-style
(``antialias=True``), normalises, and rasterises the mask at full size then resizes it (nearest) — nothing
shared between the tasks of an image. Goal: ≥ 150 samples/s per core at 352 px.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image, ImageDraw, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.augment import random_object_crop
from pipeline.loader import DataConfig, make_train_loader
from pipeline.schema import ImageRecord, Task
from segvlm.masks import rasterize_polygons
from segvlm.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

NAMES = ("cup", "table", "dog", "car", "tree", "sign", "man", "window", "shirt", "plate", "chair", "lamp")
COLOURS = ("red", "blue", "green", "white", "black", "yellow", "brown", "gray")


def tokenize(phrases: list[str]) -> dict[str, torch.Tensor]:
    """A cheap stand-in for the backbone's tokenizer (word hashes, 16 tokens), the same in both loaders."""
    ids = torch.zeros(len(phrases), 16, dtype=torch.long)
    for i, phrase in enumerate(phrases):
        words = [zlib.crc32(w.encode()) % 49000 + 1 for w in phrase.split()][:16]
        ids[i, : len(words)] = torch.tensor(words)
    return {"input_ids": ids, "attention_mask": (ids > 0).long()}


def write_shards(folder: Path, images: int, tasks: int, per_shard: int = 50, seed: int = 0) -> list[tuple]:
    """Photo-like JPEGs (~480 px, textured background, random polygons) and ``tasks`` tasks each."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows, sink, shard = [], None, -1
    sizes: dict[str, int] = {}
    for image_id in range(images):
        if image_id % per_shard == 0:
            if sink is not None:
                sink.close()
            shard += 1
            sink = wds.TarWriter(str(folder / f"train-{shard:06d}.tar"))
        w, h = (
            (480, int(rng.integers(320, 400))) if rng.random() < 0.6 else (int(rng.integers(320, 400)), 480)
        )
        noise = rng.integers(0, 255, (h // 8, w // 8, 3), dtype=np.uint8)
        image = Image.fromarray(noise).resize((w, h), Image.BICUBIC).filter(ImageFilter.GaussianBlur(2))
        draw = ImageDraw.Draw(image)
        task_list = []
        for t in range(tasks):
            cx, cy = rng.uniform(0.1, 0.9) * w, rng.uniform(0.1, 0.9) * h
            r = rng.uniform(0.03, 0.3) * min(w, h)
            angles = np.sort(rng.uniform(0, 2 * np.pi, int(rng.integers(5, 12))))
            poly = [[float(cx + r * np.cos(a)), float(cy + r * np.sin(a))] for a in angles]
            draw.polygon([tuple(p) for p in poly], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
            name, colour = NAMES[int(rng.integers(len(NAMES)))], COLOURS[int(rng.integers(len(COLOURS)))]
            task_list.append(
                Task(
                    task_id=f"{image_id}__{t}",
                    phrase=f"{colour} {name}",
                    polygons=[[poly]],
                    phrase_structure={"name": name, "attributes": [colour], "type": "attribute"},
                )
            )
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=90)
        record = ImageRecord(
            source="bench", image_id=image_id, split="train", width=w, height=h, tasks=task_list
        )
        sink.write({"__key__": record.key, "jpg": buf.getvalue(), "json": record.to_json()})
        sizes[f"train-{shard:06d}.tar"] = sizes.get(f"train-{shard:06d}.tar", 0) + 1
        rows.append((buf.getvalue(), record))
    sink.close()
    (folder / "sizes.json").write_text(json.dumps(sizes))
    return rows


def cpu_seconds() -> float:
    """CPU time of this process plus its finished children (DataLoader workers exit after an epoch)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def time_loader(folder: Path, size: int, batch: int, batches: int, workers: int) -> tuple[float, float]:
    """``(samples per wall second, samples per CPU second)`` of ``make_train_loader`` over ``batches``
    batches after one warm-up batch (with a worker, its start-up CPU time is included)."""
    loader, _ = make_train_loader(
        DataConfig(
            train_shards=str(folder),
            negative_rate=0.2,
            num_workers=workers,
            shuffle_buffer=100,
            task_shuffle_buffer=64,
        ),
        batch_size=batch,
        image_size=size,
        tokenizer=tokenize,
        seed=0,
        steps_per_epoch=batches + 1,
    )
    cpu0 = cpu_seconds()
    it = iter(loader)
    next(it)  # start-up (worker fork, shuffle buffers filling) is not throughput
    start, cpu = time.perf_counter(), cpu_seconds()
    n = sum(b["pixel_values"].shape[0] for b in it)
    wall = time.perf_counter() - start
    cpu = cpu_seconds() - (cpu if workers == 0 else cpu0)
    return n / wall, n / cpu


def time_naive(rows: list[tuple], size: int, batch: int, samples: int) -> tuple[float, float]:
    """The baseline: every task decodes its image at full size; torchvision-style tensor crop/resize."""
    import torchvision.transforms.functional as F  # only the baseline uses torchvision

    rng = np.random.default_rng(0)
    mean, std = list(OPENAI_CLIP_MEAN), list(OPENAI_CLIP_STD)
    tasks = [(jpg, rec, t) for jpg, rec in rows for t in rec.tasks]
    order = rng.permutation(len(tasks))
    done, items = 0, []
    start, cpu = time.perf_counter(), cpu_seconds()
    while done < samples:
        jpg, rec, task = tasks[order[done % len(tasks)]]
        image = Image.open(io.BytesIO(jpg)).convert("RGB")  # full decode, per task
        full = rasterize_polygons(task.polygons, rec.width, rec.height)
        x0, y0, x1, y1 = random_object_crop(rec.width, rec.height, full, rng=rng)
        pixels = F.to_tensor(image)[:, y0:y1, x0:x1]
        pixels = F.normalize(F.resize(pixels, [size, size], antialias=True), mean, std)
        mask = torch.from_numpy(full[y0:y1, x0:x1].copy())[None].float()
        mask = F.resize(mask, [size, size], interpolation=F.InterpolationMode.NEAREST)
        items.append((pixels, mask, task.phrase))
        done += 1
        if len(items) == batch:
            tokens = tokenize([p for _, _, p in items])
            _ = torch.stack([p for p, _, _ in items]), torch.stack([m for _, m, _ in items]), tokens
            items = []
    return done / (time.perf_counter() - start), done / (cpu_seconds() - cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--tasks", type=int, default=4, help="tasks per image")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=20, help="timed batches per measurement")
    parser.add_argument("--sizes", type=int, nargs="+", default=[352, 128])
    parser.add_argument("--shards", type=Path, default=None, help="reuse/keep shards in this folder")
    parser.add_argument("--json", action="store_true", help="also print one JSON line")
    args = parser.parse_args()
    torch.set_num_threads(1)  # per-core figures

    tmp = None
    folder = args.shards
    if folder is None:
        tmp = tempfile.TemporaryDirectory(prefix="segvlm-loader-bench-")
        folder = Path(tmp.name)
    t0 = time.perf_counter()
    rows = write_shards(folder, args.images, args.tasks)
    print(f"shards: {args.images} images × {args.tasks} tasks in {time.perf_counter() - t0:.1f} s ({folder})")

    result: dict[str, float | int | str] = {
        "images": args.images,
        "tasks_per_image": args.tasks,
        "cpus": os.cpu_count() or 0,
    }
    for size in args.sizes:
        ours_wall, ours = time_loader(folder, size, args.batch, args.batches, workers=0)
        one_wall, one_cpu = time_loader(folder, size, args.batch, args.batches, workers=1)
        naive_wall, naive = time_naive(rows, size, args.batch, args.batch * args.batches)
        print(
            f"{size:4d} px  loader {ours:6.1f} samples per CPU-s (wall {ours_wall:6.1f}/s; 1 DataLoader worker: "
            f"{one_cpu:6.1f} per CPU-s, wall {one_wall:6.1f}/s)   naive {naive:6.1f} per CPU-s (wall "
            f"{naive_wall:6.1f}/s)   ratio {ours / naive:4.2f}×   goal ≥ 150/core: {'yes' if ours >= 150 else 'NO'}"
        )
        result |= {
            f"loader_{size}_per_core": round(ours, 1),
            f"loader_{size}_wall": round(ours_wall, 1),
            f"loader_{size}_one_worker_per_core": round(one_cpu, 1),
            f"loader_{size}_one_worker_wall": round(one_wall, 1),
            f"naive_{size}_per_core": round(naive, 1),
            f"naive_{size}_wall": round(naive_wall, 1),
            f"ratio_{size}": round(ours / naive, 2),
        }
    if args.json:
        print(json.dumps(result))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
