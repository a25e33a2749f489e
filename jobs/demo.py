"""``segvlm demo``: the whole pipeline on the embedded default, on this machine, in about ten minutes.

Launch::

    segvlm demo                       # or: make demo
    segvlm demo --workdir runs/demo --train-seconds 480 --images 2000

Synthetic scenes → ``prepare`` (train with synthetic prompts; val; test with negative prompts) → a tiny CLIP
saved with ``save_pretrained`` and loaded back with ``from_pretrained`` → ``train`` on a local Ray instance
with 2 CPU workers → ``eval`` on the test split → MLflow. Prints the test metrics (mean IoU by phrase type and
the negatives' no-target accuracy among them), the MLflow run id and the command that opens the UI, and
writes ``<workdir>/summary.json``.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path
from typing import Any

from jobs.common import init_ray, to_json
from jobs.environment import quiet_environment
from segvlm.atomic import write_bytes_atomic

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
# Everything the demo loads is local (a tiny CLIP it writes itself), so it never needs the hub, and
# transformers' save_pretrained progress bar would only clutter its console. The demo alone sets these:
# every other job leaves the hub to the user.
LOCAL_ONLY_ENV = {"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
HEADLINE = (
    "official/mean_iou",
    "official/cum_iou",
    "official/pr@0.5",
    "official/pr@0.7",
    "official/pr@0.9",
    "clipseg/iou_fg",
    "clipseg/miou",
    "clipseg/ap",
    "boundary/f",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="segvlm demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="runs/demo")
    parser.add_argument(
        "--images", type=int, default=2000, help="synthetic scenes to render (80/10/10 split)"
    )
    parser.add_argument("--train-seconds", type=float, default=480.0, help="training time budget")
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("overrides", nargs="*", help="experiment overrides, e.g. train.batch_size=16")
    return parser


def local_only_environment() -> None:
    """The quiet defaults plus no hub access (the user's own values win)."""
    for key, value in LOCAL_ONLY_ENV.items():
        os.environ.setdefault(key, value)
    quiet_environment()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    local_only_environment()
    summary = run_demo(args)
    print_summary(summary, workdir_arg=args.workdir)
    return 0


def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    """Data, training and evaluation; writes and returns ``<workdir>/summary.json``'s content."""

    from jobs.config import ExperimentConfig
    from jobs.demo_data import build_demo_data
    from jobs.eval import run_eval
    from jobs.train import run_training
    from segvlm.config import load_config

    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    start = time.perf_counter()

    def stage(name: str) -> None:
        timings[name] = round(time.perf_counter() - start - sum(timings.values()), 1)
        print(f"[demo] {name} done in {timings[name]:.0f} s", flush=True)

    init_ray(None, num_cpus=os.cpu_count())
    data = build_demo_data(workdir, images=args.images, seed=args.seed, log=print, stage=stage)
    shards = workdir / "shards"
    clip_dir = data["clip"]
    scene_summary = data["scene_summary"]

    cfg = load_config(
        ExperimentConfig,
        CONFIG,
        [
            f"model.backbone.pretrained={clip_dir}",
            f"data.train_shards={shards / 'train'}",
            f"data.val_shards={shards / 'val'}",
            f"workdir={workdir}",
            f"train.num_workers={args.workers}",
            f"train.time_budget_s={args.train_seconds}",
            f"train.seed={args.seed}",
            f"train.run_name=demo-{time.strftime('%Y%m%d-%H%M%S')}",
            *args.overrides,
        ],
    )
    trained = run_training(cfg)
    stage("train")

    report = run_eval(
        trained["best_checkpoint"],
        str(shards / "test"),
        out=str(workdir / "eval-test"),
        split="test",
        num_workers=args.workers,
        tracking_uri=trained["tracking_uri"],
        run_id=trained["run_id"],
        experiment=cfg.tracking.experiment,
    )
    stage("eval")

    summary = {
        "test": report,
        "timings_s": timings | {"total": round(time.perf_counter() - start, 1)},
        "train": {
            k: trained[k]
            for k in ("run_id", "run_name", "steps", "best_score", "best_step", "best_checkpoint")
        },
        "tracking_uri": trained["tracking_uri"],
        **type_and_negative_metrics(report),
        # the floor: marking every shape whatever the phrase
        "test_every_shape_mean_iou": scene_summary["every_shape_mean_iou"]["test"],
    }
    write_bytes_atomic(workdir / "summary.json", to_json(summary, indent=2, sort_keys=True).encode())
    return summary | {"experiment": cfg.tracking.experiment, "path": str(workdir / "summary.json")}


def type_and_negative_metrics(report: dict[str, Any]) -> dict[str, Any]:
    """summary.json's explicit blocks: ``by_type`` (mean IoU of each phrase type; null for a type the test
    split lacks) and ``negatives`` (the negative prompts: their count and the share predicted empty, null
    without any). Values as the report holds them (strict JSON: null, never NaN)."""
    from segvlm.vocabulary import PHRASE_TYPES

    def value(key: str) -> float | None:
        v = report.get(key)
        return None if v is None or math.isnan(v) else float(v)

    return {
        "by_type": {t: value(f"official/{t}/mean_iou") for t in PHRASE_TYPES},
        "negatives": {
            "count": round(report.get("official/negative/count") or 0),
            "no_target_accuracy": value("official/negative/empty_rate"),
        },
    }


def format_type_and_negative_lines(summary: dict[str, Any]) -> list[str]:
    """Two lines: mean IoU by phrase type, and how many negatives were predicted empty."""
    by_type = "  ".join(f"{t} {'–' if v is None else f'{v:.2f}'}" for t, v in summary["by_type"].items())
    negatives = summary["negatives"]
    count, accuracy = negatives["count"], negatives["no_target_accuracy"]
    if count and accuracy is not None:
        empty = f"{round(accuracy * count)} of {count} ({100 * accuracy:.0f}%)"
    else:
        empty = "– (no negative prompts in this test split)"
    return [
        f"mean IoU by phrase type: {by_type}",
        f"no-target accuracy (negatives predicted empty): {empty}",
    ]


def print_summary(summary: dict[str, Any], *, workdir_arg: str) -> None:
    """The test metrics, the floor, the timings, the MLflow run and how to open the UI."""
    from pipeline.progress import format_table

    report, trained, timings = summary["test"], summary["train"], summary["timings_s"]
    print()
    print(
        format_table(
            [(k, report[k]) for k in HEADLINE if k in report], title="test metrics (synthetic scenes)"
        )
    )
    print(
        f"(masks are probability > {report['threshold']:g}, the threshold chosen on validation; a model that "
        f"marks every shape, ignoring the phrase, scores mean IoU {summary['test_every_shape_mean_iou']:.2f} "
        "on this test split)"
    )
    print("\n".join(format_type_and_negative_lines(summary)))
    stages = {k: v for k, v in timings.items() if k != "total"}
    print(f"\nsteps trained: {trained['steps']}  total time: {timings['total']:.0f} s  {stages}")
    print(f"MLflow run: {trained['run_id']}  (experiment {summary['experiment']!r})")
    if summary["tracking_uri"].startswith(("http://", "https://")):
        print(f"open the UI:  {summary['tracking_uri']}")
    else:
        print(f"open the UI:  segvlm ui --workdir {workdir_arg}   then browse http://127.0.0.1:5000")
    print(f"summary: {summary['path']}")
