"""Driver memory of ``prepare`` against the dataset's size: peak RSS at two sizes, extrapolated to PhraseCut.

Launch::

    python benchmarks/prepare_memory.py                                  # 4000 and 16000 images, this tree
    python benchmarks/prepare_memory.py --baseline-tree /tmp/segvlm-old  # plus an older checkout, side by side
    python benchmarks/prepare_memory.py --sizes 2000 8000 --json

It writes a PhraseCut-shaped folder per size (cached under /tmp): ``image_data_split.json``, a
``refer_train.json`` with about 4.3 tasks per image in PhraseCut's shape (1-3 instances of 8-40 point
polygons, boxes, phrase structures with attributes and relations), tasks of one image spread over the file,
and tiny images (one 32x24 JPEG hard-linked), so the run measures the driver's bookkeeping, not pixels.

Each run is the real job, ``run_prepare`` on a local Ray instance (``--cpus``), in a fresh Python process;
its peak RSS (``ru_maxrss``, the driver only: Ray's workers are other processes) and wall time are
reported. ``--baseline-tree`` runs the same child code with that checkout first on ``sys.path`` (e.g.
``git worktree add /tmp/segvlm-old <commit>``), so an older ``pipeline`` is measured on the same data in
the same benchmark. The extrapolation to PhraseCut's image count is linear through the two sizes:
``rss(n) = rss(small) + (n - small) * slope``, slope = the RSS difference over the size difference.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from typing import Any

PHRASECUT_IMAGES = 77362  # train + val + test + miniv images
TASKS_PER_IMAGE = 4.33  # 346,307 tasks over 77,362 images
WIDTH, HEIGHT = 32, 24
NAMES = ("man", "shirt", "tree", "sky", "window", "car", "building", "sign", "wall", "grass", "table", "cup")
ATTRIBUTES = ("white", "black", "large", "small", "red", "wooden", "green", "tall", "blue", "metal")
PREDICATES = ("on", "in", "near", "behind", "wearing", "has", "above", "next to")


def _polygon(rng: random.Random) -> list[list[float]]:
    points = rng.randint(8, 40)
    cx, cy = rng.uniform(4, WIDTH - 4), rng.uniform(4, HEIGHT - 4)
    return [[round(cx + rng.uniform(-4, 4), 2), round(cy + rng.uniform(-4, 4), 2)] for _ in range(points)]


def _task(rng: random.Random, image_id: int, k: int) -> dict[str, Any]:
    instances = [[_polygon(rng)] for _ in range(rng.choice((1, 1, 1, 2, 3)))]
    name = rng.choice(NAMES)
    attributes = rng.sample(ATTRIBUTES, rng.choice((0, 0, 1, 2)))
    relations = [[rng.choice(PREDICATES), rng.choice(NAMES)] for _ in range(rng.choice((0, 0, 1)))]
    phrase = " ".join([*attributes, name] + [w for p, o in relations for w in (p, o)])
    ann_ids = [image_id * 10 + k * 3 + i for i in range(len(instances))]
    xs = [[min(x for x, _ in inst[0]), min(y for _, y in inst[0])] for inst in instances]
    return {
        "task_id": f"{image_id}__{'_'.join(map(str, ann_ids))}",
        "image_id": image_id,
        "ann_ids": ann_ids,
        "Polygons": instances,
        "instance_boxes": [[x, y, 6.0, 5.0] for x, y in xs],
        "phrase": phrase,
        "phrase_structure": {
            "name": name,
            "attributes": attributes,
            "relation_ids": list(range(len(relations))),
            "relation_descriptions": relations,
            "type": "relation" if relations else "attribute" if attributes else "name",
        },
    }


def phrasecut_folder(images: int, seed: int = 0) -> str:
    """A cached PhraseCut-shaped folder of ``images`` images (see the module docstring)."""
    from PIL import Image

    root = os.path.join(tempfile.gettempdir(), f"segvlm-bench-phrasecut-{images}-{seed}")
    done = os.path.join(root, ".complete")
    if os.path.exists(done):
        return root
    print(
        f"writing a PhraseCut-shaped folder of {images} images under {root} ...", file=sys.stderr, flush=True
    )
    rng = random.Random(seed)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    first = os.path.join(root, "images", "_one.jpg")
    Image.new("RGB", (WIDTH, HEIGHT), (90, 120, 60)).save(first, format="JPEG", quality=90)
    ids = [1_000_000 + i for i in range(images)]
    for image_id in ids:
        path = os.path.join(root, "images", f"{image_id}.jpg")
        if not os.path.exists(path):
            os.link(first, path)
    rows = [{"image_id": i, "width": WIDTH, "height": HEIGHT, "split": "train", "url": "", "coco_id": None,
             "flickr_id": None} for i in ids]  # fmt: skip
    with open(os.path.join(root, "image_data_split.json"), "w") as f:
        json.dump(rows, f)
    tasks = []
    for image_id in ids:
        n = int(TASKS_PER_IMAGE) + (rng.random() < TASKS_PER_IMAGE % 1)
        tasks += [_task(rng, image_id, k) for k in range(n)]
    rng.shuffle(tasks)  # tasks of one image are not adjacent in real files either
    with open(os.path.join(root, "refer_train.json"), "w") as f:
        json.dump(tasks, f)
    open(done, "w").close()
    return root


CHILD = r"""
import json, os, resource, sys, tempfile, time
root, cpus = sys.argv[1], int(sys.argv[2])
import ray
ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
from ray.data import DataContext
DataContext.get_current().enable_progress_bars = False
import pipeline.prepare as prepare
base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with tempfile.TemporaryDirectory() as out:
    start = time.perf_counter()
    summary = prepare.run_prepare(
        prepare.PrepareConfig(source="phrasecut", root=root, split="train", out=out, shard_samples=1000),
        log=lambda _: None)
    seconds = time.perf_counter() - start
ray.shutdown()
print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "rss_after_ray_init_mb": base_rss / 1024, "seconds": seconds,
                  "images": summary["images"], "tasks": summary["tasks"],
                  "module": prepare.__file__}))
"""


def measure(root: str, cpus: int, tree: str | None) -> dict[str, Any]:
    env = dict(os.environ, RAY_DEDUP_LOGS="0", PYTHONWARNINGS="ignore")
    if tree:
        env["PYTHONPATH"] = os.pathsep.join([tree, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    # `python -c` puts the working folder first on sys.path: run in the tree whose `pipeline` is measured
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run(
        [sys.executable, "-c", CHILD, root, str(cpus)],
        env=env,
        cwd=tree or here,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"child run failed ({tree or 'this tree'}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def extrapolate(small: tuple[int, float], large: tuple[int, float], n: int) -> float:
    slope = (large[1] - small[1]) / (large[0] - small[0])
    return small[1] + (n - small[0]) * slope


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs=2, default=[4000, 16000], metavar=("SMALL", "LARGE"))
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--baseline-tree", default=None, help="checkout of an older commit to measure too")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    small, large = sorted(args.sizes)
    trees = [("this tree", None)] + ([("baseline", args.baseline_tree)] if args.baseline_tree else [])
    results: dict[str, dict[int, dict[str, Any]]] = {}
    for size in (small, large):
        root = phrasecut_folder(size)
        for label, tree in trees:  # alternate, so both sides see the same machine state
            print(f"{label}: {size} images ...", file=sys.stderr, flush=True)
            results.setdefault(label, {})[size] = measure(root, args.cpus, tree)
    report: dict[str, Any] = {
        "sizes": [small, large],
        "cpus": args.cpus,
        "phrasecut_images": PHRASECUT_IMAGES,
    }
    for label, by_size in results.items():
        a, b = by_size[small], by_size[large]
        report[label] = {
            "module": a["module"],
            "peak_rss_mb": {small: round(a["peak_rss_mb"], 1), large: round(b["peak_rss_mb"], 1)},
            "rss_after_ray_init_mb": round(a["rss_after_ray_init_mb"], 1),
            "seconds": {small: round(a["seconds"], 1), large: round(b["seconds"], 1)},
            "tasks": {small: a["tasks"], large: b["tasks"]},
            "kb_per_image": round((b["peak_rss_mb"] - a["peak_rss_mb"]) * 1024 / (large - small), 2),
            "peak_rss_mb_at_phrasecut": round(
                extrapolate((small, a["peak_rss_mb"]), (large, b["peak_rss_mb"]), PHRASECUT_IMAGES), 1
            ),
        }
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(f"prepare driver peak RSS, {args.cpus} CPUs, PhraseCut-shaped folders (tiny images)")
    print(
        f"{'':<10} {'size':>7} {'peak RSS MB':>12} {'seconds':>8} {'KB/image':>9} {f'@{PHRASECUT_IMAGES} MB':>12}"
    )
    for label, row in ((k, v) for k, v in report.items() if isinstance(v, dict) and "peak_rss_mb" in v):
        for size in (small, large):
            extra = (
                f"{row['kb_per_image']:>9.2f} {row['peak_rss_mb_at_phrasecut']:>12.0f}"
                if size == large
                else ""
            )
            print(
                f"{label:<10} {size:>7} {row['peak_rss_mb'][size]:>12.1f} {row['seconds'][size]:>8.1f} {extra}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
