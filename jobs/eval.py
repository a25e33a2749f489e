"""``segvlm eval``: distributed evaluation of a checkpoint on a shard set, with every PhraseCut metric.

Launch::

    segvlm eval --checkpoint runs/demo/<run>/best --data runs/demo/shards/test --out runs/demo/eval
    segvlm eval --checkpoint s3://bucket/runs/<run>/best --data s3://bucket/phrasecut/test \\
        --out s3://bucket/runs/<run>/eval-test --official-dir s3://bucket/runs/<run>/preds --num-workers 4 \\
        --ray-address auto --tracking-uri http://127.0.0.1:5000

Each Ray Train worker scores its share of the tasks (every task exactly once across workers); the metric sums
are merged with one all-reduce and rank 0 returns the report to the driver through Ray, which writes
``report.json``, ``report.md`` and ``pr_curve.json`` to ``--out``. With ``--official-dir`` every worker also
writes ``{task_id}.png`` (binary, original image size), the layout the PhraseCut evaluator reads;
``segvlm.metrics`` recomputes the report from those PNGs in the tests. Every location (checkpoint, data,
out, official dir) is a local folder or a URI (``s3://...``): no disk shared between nodes is assumed.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from jobs.common import TRAIN_LOG_LEVEL, init_ray, quiet_environment, to_json


def eval_loop_per_worker(config: dict[str, Any]) -> dict[str, Any] | None:
    import ray.train
    import torch

    from jobs import distributed
    from jobs.common import quiet_train_worker
    from jobs.evaluation import evaluate
    from pipeline import storage
    from pipeline.loader import make_eval_loader
    from segvlm.checkpoint import load_checkpoint
    from segvlm.inference import checkpoint_threshold
    from segvlm.metrics import format_markdown_table

    quiet_train_worker()
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(config["threads"])
    device = distributed.worker_device(config["use_gpu"])
    with storage.local_copy(config["checkpoint"], prefix="segvlm-eval-ckpt-") as folder:
        model, model_cfg, meta = load_checkpoint(folder)
    threshold = config["threshold"] if config["threshold"] is not None else checkpoint_threshold(meta)
    model.to(device)
    loader = make_eval_loader(
        config["data"],
        split=config["split"],
        batch_size=config["batch_size"],
        image_size=model_cfg.backbone.image_size,
        tokenizer=model.backbone.tokenize,
        rank=rank,
        world_size=world,
        num_workers=0,
        pin_memory=device.type == "cuda",
    )
    autocast = functools.partial(distributed.autocast, "auto", device)  # bf16 on GPU, float32 on CPU
    start = time.perf_counter()
    result = evaluate(
        model,
        loader,
        device=device,
        autocast=autocast,
        threshold=threshold,
        official_dir=config["official_dir"],
    )
    summary = result.all_reduce(device).compute()
    summary["threshold"] = threshold
    summary["seconds"] = time.perf_counter() - start
    ray.train.report({"tasks": summary.get("official/count", 0.0)})
    if rank != 0:
        return None
    # the report goes back to the driver as rank 0's return value (Result.return_value): no file of this
    # node's disk is read by anyone else
    curve = {k: [float(x) for x in v] for k, v in result.metrics.clipseg.pr_curve().items()}
    return {"summary": summary, "pr_curve": curve, "markdown": format_markdown_table(summary)}


def default_out(checkpoint: str, split: str) -> str:
    """``<checkpoint's parent>/eval-<checkpoint name>-<split>``: beside the checkpoint, never inside it (it
    may be a registered model's artifacts, which an evaluation must not change)."""
    from pipeline import storage

    return storage.join(storage.parent(checkpoint), f"eval-{storage.name(checkpoint)}-{split}")


def _inside(location: str, folder: str) -> bool:
    from pipeline import storage

    if storage.is_uri(location) != storage.is_uri(folder):
        return False
    if not storage.is_uri(location):
        location, folder = str(Path(location).resolve()), str(Path(folder).resolve())
    location, folder = location.rstrip("/"), folder.rstrip("/")
    return location == folder or location.startswith(folder + "/")


def run_eval(
    checkpoint: str,
    data: str,
    *,
    out: str,
    split: str = "test",
    official_dir: str | None = None,
    num_workers: int = 1,
    batch_size: int = 16,
    use_gpu: bool = False,
    ray_address: str | None = None,
    tracking_uri: str | None = None,
    experiment: str = "segvlm",
    run_id: str | None = None,
    threshold: float | None = None,
) -> dict[str, float]:
    """Evaluate ``checkpoint`` on the shards at ``data`` and return the report (also written to ``out``).

    ``checkpoint``, ``data``, ``out`` and ``official_dir`` are local folders or URIs (``s3://...``). Each
    worker downloads a URI checkpoint into a temporary folder of its own; the report reaches this process
    through Ray and is written to ``out`` from here. ``out`` must not lie inside ``checkpoint``.

    Masks are ``probability > threshold``; ``None`` takes the checkpoint's (chosen on validation during
    training, 0.5 for a checkpoint without one). The report states it as ``threshold``.
    """
    from pipeline import storage
    from segvlm.inference import check_threshold

    if threshold is not None:
        threshold = check_threshold(threshold)
    checkpoint, data, out = (_absolute(x) for x in (checkpoint, data, out))
    official_dir = _absolute(official_dir) if official_dir else None
    for location in (out, official_dir):
        if location and _inside(location, checkpoint):
            raise ValueError(
                f"{location}: an evaluation output may not lie inside the checkpoint {checkpoint}"
            )
    quiet_environment()
    init_ray(ray_address)
    from ray.train import LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from jobs.distributed import process_group_backend

    # an evaluation keeps no Ray checkpoints: Ray's run folder is scratch space on this node
    scratch = tempfile.mkdtemp(prefix="segvlm-eval-ray-")
    trainer = TorchTrainer(
        eval_loop_per_worker,
        train_loop_config={
            "checkpoint": checkpoint,
            "data": data,
            "split": split,
            "official_dir": official_dir,
            "batch_size": batch_size,
            "use_gpu": use_gpu,
            "threshold": threshold,
            "threads": max(1, (os.cpu_count() or 1) // max(1, num_workers)),
        },
        torch_config=TorchConfig(backend=process_group_backend(use_gpu)),
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu),
        run_config=RunConfig(
            name=f"segvlm-eval-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=scratch,
            logging_config=LoggingConfig(log_level=TRAIN_LOG_LEVEL),
        ),
    )
    try:
        result = trainer.fit()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if result.error:
        raise result.error
    payload = result.return_value
    if not payload:
        raise RuntimeError("segvlm eval: rank 0 returned no report")
    # what report.json holds, undefined metrics (NaN: an empty subset) as None, is what we return
    report = json.loads(to_json(payload["summary"]))
    files = {
        "report.json": to_json(report, indent=2, sort_keys=True),
        "report.md": payload["markdown"],
        "pr_curve.json": json.dumps(payload["pr_curve"]),
    }
    for filename, text in files.items():
        storage.write_bytes(storage.join(out, filename), text.encode())
    if tracking_uri is not None:
        from jobs.tracking import RunLogger

        with tempfile.TemporaryDirectory(prefix="segvlm-eval-report-") as tmp:
            for filename, text in files.items():
                Path(tmp, filename).write_text(text)
            with RunLogger(
                enabled=True,
                tracking_uri=tracking_uri,
                experiment=experiment,
                # a new experiment of a local sqlite store keeps its artifacts under workdir: not in tmp
                workdir=str(Path("runs").resolve()) if storage.is_uri(out) else out,
                run_id=run_id,
                run_name=None if run_id else f"eval-{storage.name(checkpoint)}",
            ) as logger:
                logger.log_metrics({f"{split}/{k}": v for k, v in report.items()}, step=0)
                logger.log_artifacts(tmp, f"eval_{split}")
    return report


def _absolute(location: str) -> str:
    """URIs as given; local paths absolute, since the workers run in other folders."""
    from pipeline import storage

    storage.check_location(location)
    return location if storage.is_uri(location) else str(Path(location).resolve())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="segvlm eval",
        description=__doc__.split("\n\n")[0],
        epilog="Every location may be a local folder or a URI (s3://bucket/path; S3 settings from the "
        "standard AWS environment: AWS_ENDPOINT_URL, credentials, AWS_REGION).",
    )
    parser.add_argument("--checkpoint", required=True, help="a segvlm checkpoint folder (local or s3://...)")
    parser.add_argument("--data", required=True, help="shard folder or URI written by `segvlm prepare`")
    parser.add_argument("--split", default="test")
    parser.add_argument(
        "--out",
        default=None,
        help="where report.json, report.md and pr_curve.json go (default: beside the checkpoint, "
        "<checkpoint parent>/eval-<checkpoint name>-<split>; never inside the checkpoint)",
    )
    parser.add_argument("--official-dir", default=None, help="also write {task_id}.png per task here")
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--gpu", action="store_true", help="one GPU per worker, bf16 autocast")
    parser.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="foreground if probability > T (default: the checkpoint's, chosen on validation; else 0.5)",
    )
    parser.add_argument("--ray-address", default=None)
    parser.add_argument(
        "--tracking-uri",
        default=os.environ.get("MLFLOW_TRACKING_URI") or None,
        help="log the report to this MLflow store (default: $MLFLOW_TRACKING_URI; unset: no logging)",
    )
    parser.add_argument("--run-id", default=None, help="append to this MLflow run instead of a new one")
    return parser


def argument_error(args: argparse.Namespace) -> str | None:
    """What is wrong with the arguments, checked before Ray starts; None when nothing is."""
    from pipeline import storage

    try:
        if not storage.is_dir(args.checkpoint):
            return f"checkpoint not found: {args.checkpoint}"
    except storage.StorageError as err:
        return f"--checkpoint {err}"
    if args.threshold is not None:
        from segvlm.inference import check_threshold

        try:
            check_threshold(args.threshold)
        except ValueError as err:
            return f"--{err}"
    out = args.out or default_out(_absolute(args.checkpoint), args.split)
    if _inside(_absolute(out), _absolute(args.checkpoint)):
        return f"--out {out} lies inside the checkpoint {args.checkpoint}; pick another folder"
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if (error := argument_error(args)) is not None:
        print(f"segvlm eval: {error}")
        return 2
    out = args.out or default_out(_absolute(args.checkpoint), args.split)
    from pipeline import storage

    report = run_eval(
        args.checkpoint,
        args.data,
        out=out,
        split=args.split,
        official_dir=args.official_dir,
        num_workers=args.num_workers,
        batch_size=args.batch_size,
        use_gpu=args.gpu,
        ray_address=args.ray_address,
        tracking_uri=args.tracking_uri,
        run_id=args.run_id,
        threshold=args.threshold,
    )
    from segvlm.metrics import format_markdown_table

    print(format_markdown_table(report))
    print(f"\nreport: {storage.join(out, 'report.json')}")
    return 0
