"""``segvlm eval``: distributed evaluation of a checkpoint on a shard set, with every metric of SPEC 6.

Launch::

    segvlm eval --checkpoint runs/demo/<run>/best --data runs/demo/shards/test --out runs/demo/eval
    segvlm eval --checkpoint CKPT --data s3://bucket/phrasecut/test --official-dir preds/ --num-workers 4 \\
        --ray-address auto --tracking-uri http://127.0.0.1:5000

Each Ray Train worker scores its share of the tasks (every task exactly once across workers); the metric sums
are merged with one all-reduce and rank 0 writes ``report.json`` and ``report.md``. With ``--official-dir``
every worker also writes ``{task_id}.png`` (binary, original image size), the layout the PhraseCut
evaluator reads; ``segvlm.metrics`` recomputes the report from those PNGs in the tests.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from jobs.common import TRAIN_LOG_LEVEL, init_ray, quiet_environment, to_json


def eval_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    import torch

    from jobs import distributed
    from jobs.common import quiet_train_worker
    from jobs.evaluation import evaluate
    from pipeline.loader import make_eval_loader
    from segvlm.checkpoint import load_checkpoint
    from segvlm.inference import checkpoint_threshold
    from segvlm.metrics import format_markdown_table

    quiet_train_worker()
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(config["threads"])
    device = distributed.worker_device(config["use_gpu"])
    model, model_cfg, meta = load_checkpoint(config["checkpoint"])
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
    if rank == 0:
        out = Path(config["out"])
        out.mkdir(parents=True, exist_ok=True)
        _write_atomic(out / "report.json", to_json(summary, indent=2, sort_keys=True))
        _write_atomic(out / "report.md", format_markdown_table(summary))
        curve = {k: [float(x) for x in v] for k, v in result.metrics.clipseg.pr_curve().items()}
        _write_atomic(out / "pr_curve.json", json.dumps(curve))
    ray.train.report({"tasks": summary.get("official/count", 0.0)})


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


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

    Masks are ``probability > threshold``; ``None`` takes the checkpoint's (chosen on validation during
    training, 0.5 for a checkpoint without one). The report states it as ``threshold``.
    """
    from segvlm.inference import check_threshold

    if threshold is not None:
        threshold = check_threshold(threshold)
    quiet_environment()
    init_ray(ray_address)
    from ray.train import LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from jobs.distributed import process_group_backend

    out_dir = Path(out).resolve()
    trainer = TorchTrainer(
        eval_loop_per_worker,
        train_loop_config={
            "checkpoint": str(Path(checkpoint).resolve()) if "://" not in checkpoint else checkpoint,
            "data": data,
            "split": split,
            "official_dir": str(Path(official_dir).resolve()) if official_dir else None,
            "out": str(out_dir),
            "batch_size": batch_size,
            "use_gpu": use_gpu,
            "threshold": threshold,
            "threads": max(1, (os.cpu_count() or 1) // max(1, num_workers)),
        },
        torch_config=TorchConfig(backend=process_group_backend(use_gpu)),
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu),
        # an evaluation keeps no Ray checkpoints; its storage is scratch space
        run_config=RunConfig(
            name=f"segvlm-eval-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=tempfile.mkdtemp(),
            logging_config=LoggingConfig(log_level=TRAIN_LOG_LEVEL),
        ),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    report = json.loads((out_dir / "report.json").read_text())
    if tracking_uri is not None:
        from jobs.tracking import RunLogger

        with RunLogger(
            enabled=True,
            tracking_uri=tracking_uri,
            experiment=experiment,
            workdir=out_dir,
            run_id=run_id,
            run_name=None if run_id else f"eval-{Path(checkpoint).name}",
        ) as logger:
            logger.log_metrics({f"{split}/{k}": v for k, v in report.items()}, step=0)
            logger.log_artifacts(out_dir, f"eval_{split}")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="segvlm eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a segvlm checkpoint folder")
    parser.add_argument("--data", required=True, help="shard folder or URI written by `segvlm prepare`")
    parser.add_argument("--split", default="test")
    parser.add_argument(
        "--out", default=None, help="where report.json goes (default: <checkpoint>/eval-<split>)"
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
    args = parser.parse_args(argv)
    if not Path(args.checkpoint).exists() and "://" not in args.checkpoint:
        print(f"segvlm eval: checkpoint not found: {args.checkpoint}")
        return 2
    if args.threshold is not None:
        from segvlm.inference import check_threshold

        try:
            check_threshold(args.threshold)
        except ValueError as err:
            print(f"segvlm eval: --{err}")
            return 2
    out = args.out or str(Path(args.checkpoint) / f"eval-{args.split}")
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
    print(f"\nreport: {Path(out) / 'report.json'}")
    return 0
