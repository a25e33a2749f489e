"""Generate a synthetic-scenes dataset in the PhraseCut folder layout.

Launch::

    segvlm synth-scenes --out data/scenes --images 3000 --seed 0 [--size 128] \\
        [--splits train=0.8,val=0.1,test=0.1]

The folder then goes through the same reader as PhraseCut (``segvlm prepare ... --source scenes``).
"""

from __future__ import annotations

import argparse
import sys

from pipeline.scenes import parse_splits, write_scenes
from pipeline.schema import PHRASE_TYPES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="segvlm synth-scenes", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", required=True, help="output folder (images/, image_data_split.json, refer_*.json)"
    )
    parser.add_argument("--images", type=int, required=True, help="number of images")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same bytes")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--splits", default="train=0.8,val=0.1,test=0.1", help="name=fraction,...")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.images < 1 or args.size < 32:
        print("synth-scenes: --images must be >= 1 and --size >= 32", file=sys.stderr)
        return 2
    try:
        splits = parse_splits(args.splits)
    except ValueError as err:
        print(f"synth-scenes: {err}", file=sys.stderr)
        return 2
    summary = write_scenes(args.out, args.images, args.seed, size=args.size, splits=splits)
    n = sum(summary["images"].values())
    print(
        f"wrote {n} images to {summary['out']} in {summary['seconds']:.1f}s ({n / summary['seconds']:.0f}/s)"
    )
    for split in splits:
        types = summary["phrase_types"][split]
        total = max(1, summary["tasks"][split])
        mix = ", ".join(f"{t} {types[t]} ({100 * types[t] / total:.0f}%)" for t in PHRASE_TYPES)
        print(f"  {split}: {summary['images'].get(split, 0)} images, {summary['tasks'][split]} tasks: {mix}")
    print(f"  multi-instance tasks: {summary['multi_instance_tasks']}")
    floor = ", ".join(f"{split} {v:.3f}" for split, v in summary["every_shape_mean_iou"].items())
    print(f"  mean IoU of marking every shape (a model that ignores the phrase): {floor}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
