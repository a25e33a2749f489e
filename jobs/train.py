"""``segvlm train``: distributed SegVLM training on Ray Train with MLflow tracking.

Launch::

    segvlm train --config configs/demo.yaml data.train_shards=runs/demo/shards/train train.steps=2000
    segvlm train --config configs/phrasecut_b16.yaml --ray-address auto --tracking-uri http://127.0.0.1:5000

Rerunning the same command with the same ``train.run_name`` and ``train.storage_path`` after the driver died
resumes from the last checkpoint, in the same MLflow run.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jobs.common import TRAIN_LOG_LEVEL, git_commit, init_ray
from jobs.config import ExperimentConfig
from jobs.environment import quiet_environment
from segvlm.config import load_config, to_dict

MIXTURE_HELP = """\
data.train_shards is one prepared folder or URI, or a weighted mixture of several: each training image
comes from source d with probability weight_d / sum of weights (whatever the sources' sizes); split
defaults to data.train_split. On the command line, a YAML list in one line (quoted for the shell):

  data.train_shards='[{path: s3://b/refcoco/train, weight: 0.8}, {path: shards/gref, weight: 0.2}]'
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="segvlm train",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=MIXTURE_HELP,
    )
    parser.add_argument("--config", help="experiment YAML (configs/*.yaml)")
    parser.add_argument(
        "overrides", nargs="*", help="key.path=value overrides (values read as YAML), e.g. train.steps=500"
    )
    parser.add_argument(
        "--workdir", help="local folder for the MLflow store, Ray results and the best checkpoint"
    )
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI (default: tracking.uri, else $MLFLOW_TRACKING_URI, else sqlite in workdir)",
    )
    parser.add_argument("--ray-address", default=None, help="Ray cluster address ('auto' on a cluster node)")
    return parser


def run_training(
    cfg: ExperimentConfig,
    *,
    tracking_uri: str | None = None,
    ray_address: str | None = None,
    parent_run_id: str | None = None,
    step_hook: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Run (or resume) one training run and return ``{run_id, best_checkpoint, best_score, steps, seconds}``.

    Storage is a location (``pipeline.storage``): ``train.storage_path`` (Ray Train checkpoints, default
    ``<workdir>/ray_results``) and ``train.best_path`` (the best checkpoint by validation mean IoU, a segvlm
    checkpoint folder, default ``<workdir>/<run_name>/best``) may each be a local folder or ``s3://...``;
    the best checkpoint is also registered in MLflow with the alias ``best``. On several nodes
    ``storage_path`` must be a location every node reaches (S3, or a shared mount): the workers upload
    their checkpoints there and the driver reads them back from there, never from a worker's disk.

    Runs on the driver. With ``cfg.tracking.relay`` (``auto``: a loopback tracking server) it first starts a
    tracking relay actor on this node, through which the rank-0 worker logs; it is stopped after the fit.

    ``step_hook(step, rank)``, when given, is called by every worker before each step (the tests' fault
    injection: a hook that kills one worker at one step); it travels to the workers by value.
    """
    quiet_environment()
    init_ray(ray_address)
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from jobs.distributed import process_group_backend
    from jobs.tracking import RunLogger, resolve_tracking_uri
    from jobs.tracking_relay import needs_relay, start_relay, stop_relay
    from jobs.train_loop import train_loop_per_worker
    from jobs.train_metrics import describe_mixture, mixture_hash
    from jobs.train_state import MODEL_DIR, SCORE_KEY, checkpoint_directory, read_train_state
    from pipeline import storage as locations
    from pipeline.manifest import manifest_hash

    workdir = Path(cfg.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    run_name = cfg.train.run_name or time.strftime("segvlm-%Y%m%d-%H%M%S")
    storage = _location(cfg.train.storage_path or str(workdir / "ray_results"))
    best_location = _location(cfg.train.best_path or str(workdir / run_name / "best"))
    cfg = dataclasses.replace(
        cfg,
        workdir=str(workdir),
        train=dataclasses.replace(
            cfg.train, run_name=run_name, storage_path=storage, best_path=best_location
        ),
    )
    sources = describe_mixture(cfg.data)  # reads the manifests: a missing one fails before Ray Train starts
    tracking = resolve_tracking_uri(tracking_uri if tracking_uri is not None else cfg.tracking.uri, workdir)
    # the driver runs on the head, next to a loopback-only MLflow server that the GPU nodes cannot reach
    # a local store (sqlite) lives on the driver's disk: workers on other nodes must log through the relay
    local_store = cfg.tracking.relay == "auto" and _is_local_store(tracking) and _spans_nodes(ray_address)
    relay = start_relay() if needs_relay(cfg.tracking.relay, tracking) or local_store else None

    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "experiment": to_dict(cfg),
            "tracking_uri": tracking,
            "parent_run_id": parent_run_id,
            "git_commit": git_commit(Path(__file__).parent),
            "train_manifest_hash": mixture_hash(sources),
            "train_sources": sources,
            "val_manifest_hash": manifest_hash(cfg.data.val_shards) if cfg.data.val_shards else "",
            "step_hook": step_hook,
            "tracking_relay": relay,
        },
        torch_config=TorchConfig(backend=process_group_backend(cfg.train.use_gpu)),
        scaling_config=ScalingConfig(
            num_workers=cfg.train.num_workers,
            use_gpu=cfg.train.use_gpu,
            resources_per_worker={"CPU": cfg.train.cpus_per_worker}
            | ({"GPU": 1} if cfg.train.use_gpu else {}),
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage,
            logging_config=LoggingConfig(log_level=TRAIN_LOG_LEVEL),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.train.keep_checkpoints,
                checkpoint_score_attribute=SCORE_KEY,
                checkpoint_score_order="max",
            ),
        ),
    )
    start = time.perf_counter()
    try:
        result = trainer.fit()
    finally:
        if relay is not None:
            stop_relay(relay)  # ends the MLflow run as FAILED if rank 0 could not end it
    seconds = time.perf_counter() - start
    if result.error:
        raise result.error

    best_checkpoint, best_metrics = max(
        result.best_checkpoints, key=lambda item: item[1].get(SCORE_KEY, -1.0)
    )
    # the checkpoint lives in the storage location (S3 on a cluster): as_directory downloads it here
    with checkpoint_directory(best_checkpoint) as ckpt_dir:
        state = read_train_state(Path(ckpt_dir))
        locations.upload_dir(Path(ckpt_dir) / MODEL_DIR, best_location)
        run_id = state["run_id"]
        logger = RunLogger(
            enabled=True,
            tracking_uri=tracking,
            experiment=cfg.tracking.experiment,
            workdir=workdir,
            run_id=run_id,
        )
        with logger:
            version = logger.log_checkpoint_model(
                Path(ckpt_dir) / MODEL_DIR, cfg.tracking.registered_model, alias="best"
            )
            logger.set_tags({"best_step": best_metrics.get("step"), "best_checkpoint": best_location})
    return {
        "run_id": run_id,
        "run_name": run_name,
        "tracking_uri": tracking,
        "best_checkpoint": best_location,
        "best_score": float(best_metrics.get(SCORE_KEY, -1.0)),
        "best_step": int(best_metrics.get("step", 0)),
        "registered_version": version,
        "steps": int((result.metrics or {}).get("step", state["step"])),  # the last checkpoint, not the best
        "seconds": seconds,
    }


def _is_local_store(tracking_uri: str) -> bool:
    return tracking_uri.startswith(("sqlite:", "file:")) or "://" not in tracking_uri


def _spans_nodes(ray_address: str | None) -> bool:
    """Whether workers may run on another node: a cluster we connected to (it may add nodes later, as the
    autoscaler does), or a running instance with more than one node."""
    import ray

    return bool(ray_address) or sum(1 for node in ray.nodes() if node.get("Alive")) > 1


def _location(location: str) -> str:
    """A URI as given, a local path made absolute (Ray workers run in other folders)."""
    from pipeline import storage

    storage.check_location(location)
    return location if storage.is_uri(location) else str(Path(location).resolve())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = list(args.overrides)
    if args.workdir:
        overrides.append(f"workdir={args.workdir}")
    cfg = load_config(ExperimentConfig, args.config, overrides)
    if not cfg.data.train_shards:
        raise SystemExit(
            "segvlm train: data.train_shards is empty; run `segvlm prepare` first and pass its folder"
        )
    out = run_training(cfg, tracking_uri=args.tracking_uri, ray_address=args.ray_address)
    print(
        f"\nrun {out['run_name']} finished: {out['steps']} steps in {out['seconds']:.0f} s; best validation mean IoU "
        f"{out['best_score']:.4f} at step {out['best_step']}\n"
        f"best checkpoint: {out['best_checkpoint']}\nMLflow run: {out['run_id']} ({out['tracking_uri']})"
    )
    return 0
