"""Shard PhraseCut, RefCOCO/+/g, gRefCOCO or synthetic scenes into WebDataset tars with a manifest, on Ray.

Launch::

    segvlm prepare --source phrasecut --root data/phrasecut --split train --out shards/train
    segvlm prepare --source scenes --root data/scenes --split train --out s3://bucket/segvlm/train \\
        --max-side 640 --shard-samples 500 --synthetic-prompts --prompt-rates template=1 negative=0.2 \\
        --ray-address auto
    segvlm prepare --source refcocog --split-by umd --root data/refcocog --split val --out shards/refcocog-val
    segvlm prepare --source grefcoco --root data/grefcoco --image-root /mnt/coco/train2014 --split testA \\
        --out shards/grefcoco-testA
    # or on a cluster: ray job submit --address http://HEAD:8265 --working-dir . -- python -m jobs.prepare ...

Layouts (--root):

* phrasecut, scenes: ``image_data_split.json``, ``refer_{split}.json`` (PhraseCut's tasks) and
  ``images/{image_id}.jpg``.
* refcoco, refcoco+, refcocog (the refer toolkit's ``data/<dataset>`` folder): ``refs({split_by}).p`` (a
  pickle, read as plain data only) and ``instances.json`` (COCO). --split-by: refcoco unc|google,
  refcoco+ unc, refcocog umd|google (default: the first). Splits as the dataset names them (train, val,
  testA, testB; refcocog umd: train, val, test).
* grefcoco: ``grefs(unc).json`` (refs with lists of targets, or none) and ``instances.json``.

For these four the images are COCO train2014 files, ``<image root>/<file_name>``; the image root defaults
to the toolkit's ``ROOT/../images/mscoco/images/train2014`` (--image-root overrides). One task per
referring sentence, its masks as COCO RLEs at the original size.

Without ``--ray-address`` a local Ray instance is started (all local CPUs, or ``--num-cpus``). Rerunning the
same command after a crash resumes: finished shards whose sha256 still matches are kept, the rest are
written. One run per output at a time: a second run on the same ``--out`` refuses to start (a lock file,
``_prepare.lock``; on object stores a best-effort lock object with a heartbeat, see ``--break-lock``).
The driver's memory does not grow with the dataset (the listing is streamed into SQLite under the
system temp folder, about the refer file's size; set ``TMPDIR`` to move it); a refer-layout source's
``refs`` pickle and ``instances.json`` are read whole on the driver (tens of MB). On a multi-node
cluster --root and --image-root must be paths every node sees (NFS, FSx, a mounted bucket).
"""

from __future__ import annotations

import argparse
import sys

from pipeline.prepare import DEFAULT_SHARD_SAMPLES, SOURCES, PrepareConfig, run_prepare
from pipeline.validate import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_PIXELS


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="segvlm prepare",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__[__doc__.index("Layouts (--root):") : __doc__.index("Without ``--ray-address``")],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--source", choices=SOURCES, required=True)
    parser.add_argument(
        "--root",
        required=True,
        help="dataset folder: the PhraseCut layout, or the refer toolkit's data/<dataset> (see below); "
        "on a cluster, a path every node sees",
    )
    parser.add_argument(
        "--split", required=True, help="split as the dataset names it (train, val, testA, ...)"
    )
    parser.add_argument(
        "--split-by",
        default=None,
        help="refcoco/refcoco+/refcocog/grefcoco: whose split, refs({split_by}).p (default: unc; refcocog: umd)",
    )
    parser.add_argument(
        "--image-root",
        default=None,
        help="refcoco/refcoco+/refcocog/grefcoco: folder of the COCO train2014 images (default: "
        "ROOT/../images/mscoco/images/train2014); on a cluster, a path every node sees",
    )
    parser.add_argument("--out", required=True, help="output folder or URI (s3://, gs://, memory://, ...)")
    parser.add_argument("--max-side", type=int, default=None, help="cap the longer image side (re-encodes)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--shard-samples", type=int, default=None, help=f"images per shard ({DEFAULT_SHARD_SAMPLES})"
    )
    size.add_argument("--shard-bytes", type=int, default=None, help="source image bytes per shard (estimate)")
    parser.add_argument("--synthetic-prompts", action="store_true", help="add generated prompts")
    parser.add_argument(
        "--prompt-rates", nargs="*", default=[], metavar="KIND=R", help="prompts per task and kind"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help=f"quarantine images with more pixels, checked before decoding ({DEFAULT_MAX_PIXELS})",
    )
    parser.add_argument(
        "--max-image-bytes",
        type=int,
        default=DEFAULT_MAX_IMAGE_BYTES,
        help=f"quarantine larger image files, checked before reading ({DEFAULT_MAX_IMAGE_BYTES})",
    )
    parser.add_argument(
        "--ray-address", default=None, help="'auto', 'ray://host:10001'; default: local instance"
    )
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local instance")
    parser.add_argument("--progress-every", type=float, default=5.0, help="seconds between progress lines")
    parser.add_argument(
        "--break-lock",
        action="store_true",
        help="object stores: take over the output's lock although its heartbeat is recent "
        "(only when you know that run is dead)",
    )
    return parser.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> PrepareConfig:
    rates = None
    if args.synthetic_prompts:
        from pipeline.prompts import parse_rates

        rates = parse_rates(args.prompt_rates)
    elif args.prompt_rates:
        raise SystemExit("--prompt-rates needs --synthetic-prompts")
    return PrepareConfig(
        source=args.source,
        root=args.root,
        split=args.split,
        out=args.out,
        split_by=args.split_by,
        image_root=args.image_root,
        max_side=args.max_side,
        shard_samples=args.shard_samples,
        shard_bytes=args.shard_bytes,
        synthetic_prompts=args.synthetic_prompts,
        prompt_rates=rates,
        seed=args.seed,
        max_pixels=args.max_pixels,
        max_image_bytes=args.max_image_bytes,
        progress_every=args.progress_every,
        break_lock=args.break_lock,
    )


def main(argv: list[str] | None = None) -> int:
    """Shard a PhraseCut-layout or refer-layout folder into WebDataset tars + manifest (Ray Data)."""
    args = parse_args(argv)
    try:
        config = config_from_args(args)
    except ValueError as err:  # a split-by the dataset lacks, options of another source: say so, no trace
        print(f"segvlm prepare: {err}", file=sys.stderr)
        return 2
    from pipeline.runlock import OutputLocked, RunLock
    from pipeline.shards import new_run_id, resolve

    # Refuse before starting Ray when another run holds the output (run_prepare checks again, holding it).
    fs, base = resolve(config.out)
    try:
        RunLock(fs, base, new_run_id(), break_lock=config.break_lock, settle=0.0).probe()
    except OutputLocked as err:
        print(f"segvlm prepare: {err}", file=sys.stderr)
        return 3
    import ray

    started_here = not ray.is_initialized()
    if started_here:
        if args.ray_address:
            ray.init(address=args.ray_address)
        else:
            ray.init(num_cpus=args.num_cpus, include_dashboard=False)
    try:
        cpus = ray.cluster_resources().get("CPU")
        run_prepare(config, cpus=cpus)
    except OutputLocked as err:
        print(f"segvlm prepare: {err}", file=sys.stderr)
        return 3
    finally:
        if started_here:
            ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
