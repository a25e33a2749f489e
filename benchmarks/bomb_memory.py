"""Peak memory of the per-record path of ``prepare`` (``load_image_record``) on a decompression bomb.

Launch::

    python benchmarks/bomb_memory.py            # table
    python benchmarks/bomb_memory.py --json

Cases, side by side, each in a fresh child process (peak RSS only grows, so one process per case):

* ``normal``: a 1024 × 768 JPEG photo-like image, the ordinary record;
* ``bomb``: a 10000 × 10000 grayscale PNG of zeros (~100 KB on disk, 100 MP decoded; Pillow only warns
  below 179 MP and would decode it) whose metadata row tells the truth: refused from the metadata;
* ``bomb_lying_meta``: the same file, metadata says 1024 × 768: refused from the image header;
* ``bomb_200mp``: a 20000 × 10000 PNG, past Pillow's own refusal;
* ``unguarded``: what the reader did before the pixel limit, on ``bomb_lying_meta``: ``Image.open`` +
  ``load()`` (the baseline the guard is measured against).

Reported: peak RSS of the child after the call, and its growth over the child's peak before the call
(imports and the file read included in the former only).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile

CASES = ("normal", "bomb", "bomb_lying_meta", "bomb_200mp", "unguarded")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _write_dataset(root: str, case: str) -> None:
    import io

    import numpy as np
    from PIL import Image

    from tests.fixtures_hostile import png_bomb

    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    if case == "normal":
        rng = np.random.default_rng(0)
        pixels = (rng.random((768, 1024, 3)) * 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        data, size = buffer.getvalue(), (1024, 768)
    elif case == "bomb_200mp":
        data, size = png_bomb(20_000, 10_000), (1024, 768)
    else:
        data = png_bomb(10_000, 10_000)
        size = (10_000, 10_000) if case == "bomb" else (1024, 768)
    with open(os.path.join(root, "images", "1.jpg"), "wb") as f:
        f.write(data)
    task = {
        "task_id": "1__1",
        "image_id": 1,
        "ann_ids": [1],
        "Polygons": [[[[10, 10], [500, 10], [500, 500], [10, 500]]]],
        "instance_boxes": [[10, 10, 490, 490]],
        "phrase": "thing",
        "phrase_structure": None,
    }
    with open(os.path.join(root, "image_data_split.json"), "w") as f:
        json.dump([{"image_id": 1, "width": size[0], "height": size[1], "split": "train"}], f)
    with open(os.path.join(root, "refer_train.json"), "w") as f:
        json.dump([task], f)


def run_case(case: str, root: str) -> dict[str, object]:
    """In the child: the one-record dataset at ``root`` (written by the parent); measure the call alone."""
    import io
    import warnings

    from PIL import Image

    from pipeline.phrasecut import list_images, load_image_record

    (entry,) = list_images(root, "train")
    with open(os.path.join(root, "images", "1.jpg"), "rb") as f:
        data = f.read()
    before = _peak_mb()
    if case == "unguarded":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = Image.open(io.BytesIO(data))
            image.load()
        outcome = f"decoded {image.size[0]}x{image.size[1]} {image.mode}"
    else:
        record, _, bad, _ = load_image_record(root, entry)
        outcome = "kept" if record is not None else f"quarantined: {bad[0].reason}"
    after = _peak_mb()
    return {"case": case, "file_kb": round(len(data) / 1024, 1), "outcome": outcome,
            "peak_rss_mb": round(after, 1), "growth_mb": round(after - before, 1)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)  # the child's entry
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(args.case, args.root)))
        return 0
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, repo)
    env = {**os.environ, "PYTHONPATH": repo}
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in CASES:
            root = os.path.join(tmp, case)
            _write_dataset(root, "bomb_lying_meta" if case == "unguarded" else case)
            child = subprocess.run(
                [sys.executable, os.path.abspath(__file__), "--case", case, "--root", root],
                env=env, capture_output=True, text=True, check=True,
            )  # fmt: skip
            results.append(json.loads(child.stdout.strip().splitlines()[-1]))
    normal = next(r for r in results if r["case"] == "normal")
    for r in results:
        r["growth_vs_normal"] = (
            round(r["growth_mb"] / normal["growth_mb"], 2) if normal["growth_mb"] else None
        )
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        print(f"{'case':<17}{'file KB':>9}{'peak RSS MB':>13}{'growth MB':>11}{'x normal':>10}  outcome")
        for r in results:
            print(
                f"{r['case']:<17}{r['file_kb']:>9}{r['peak_rss_mb']:>13}{r['growth_mb']:>11}"
                f"{r['growth_vs_normal']!s:>10}  {r['outcome']}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
