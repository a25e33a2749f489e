"""``segvlm ablate``: the paper's ablation ladder, from the CLIPSeg baseline to full SegVLM, under one MLflow run.

Launch::

    segvlm ablate --config configs/demo.yaml --demo-data runs/ablation-data --train-seconds 120
    segvlm ablate --config configs/phrasecut_b16.yaml data.train_shards=s3://b/train data.val_shards=s3://b/val \\
        --steps 20000 --ray-address auto --tracking-uri http://127.0.0.1:5000
    segvlm ablate --config configs/demo.yaml --demo-data runs/abl --steps 4 --rungs bce,+raf train.num_workers=1

Each rung is the base config plus the cumulative overrides of every rung before it, trained as its own Ray Train
run (``jobs.train.run_training``: own ``train.run_name``, same seed and data) nested under one MLflow parent run,
then evaluated (``jobs.eval.run_eval``) on the validation shards (``--eval-split test``: the test shards):

==================  =====================================================================================
``bce``             CLIPSeg baseline: every decoder switch off, loss bce=1 focal=0 dice=0
``+raf``            the RAF loss (bce/focal/dice weights from the config)
``+deformable``     decoder.deformable=true
``+residual``       decoder.residual=true
``+se``             decoder.se=true
``+xattn+projector`` decoder.cross_attention=true decoder.projector=true (the paper's SegVLM)
``+text_kernel``    decoder.head=text_kernel
``+words``          loss.words=<the config's> (the word objective brings its head; only when the config uses the
                    word losses; the demo's model)
==================  =====================================================================================

The parent run gets ``ablation.md`` (the comparison table), ``ablation.json`` and ``ablation.png`` (official mean
IoU per rung); the table is also printed and written to ``<workdir>/<name>/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from jobs.common import init_ray, to_json
from jobs.environment import quiet_environment

SWITCHES = ("cross_attention", "projector", "deformable", "se", "residual")


@dataclasses.dataclass(frozen=True)
class Rung:
    """One step of the ladder: its display name, a slug for run names, and the overrides it adds."""

    name: str
    slug: str
    description: str
    adds: tuple[str, ...]


def ladder(loss: Any) -> list[Rung]:
    """The rungs; ``loss`` (the base config's ``LossConfig``) gives the RAF weights of ``+raf`` and, when it
    uses the word losses, their weight in an eighth rung ``+words``."""
    rungs = [
        Rung(
            "bce",
            "bce",
            "CLIPSeg baseline (BCE only, plain decoder)",
            (
                *(f"model.decoder.{s}=false" for s in SWITCHES),
                "model.decoder.head=convt",
                "loss.bce=1.0",
                "loss.focal=0.0",
                "loss.dice=0.0",
                "loss.words=0.0",
            ),
        ),
        Rung(
            "+raf",
            "raf",
            "RAF loss",
            (f"loss.bce={loss.bce!r}", f"loss.focal={loss.focal!r}", f"loss.dice={loss.dice!r}"),
        ),
        Rung("+deformable", "deformable", "deformable convolutions", ("model.decoder.deformable=true",)),
        Rung("+residual", "residual", "residual blocks", ("model.decoder.residual=true",)),
        Rung("+se", "se", "squeeze-and-excitation", ("model.decoder.se=true",)),
        Rung(
            "+xattn+projector",
            "xattn-projector",
            "cross-attention + projector (full SegVLM)",
            ("model.decoder.cross_attention=true", "model.decoder.projector=true"),
        ),
        Rung(
            "+text_kernel",
            "text-kernel",
            "the phrase's kernel as the head's last layer",
            ("model.decoder.head=text_kernel",),
        ),
    ]
    if loss.words > 0:
        rungs.append(
            Rung(
                "+words",
                "words",
                "word losses: the target region and the phrase name the subject's words",
                (f"loss.words={loss.words!r}",),
            )
        )
    return rungs


def rung_overrides(rungs: Sequence[Rung], index: int) -> list[str]:
    """The cumulative overrides of rung ``index`` (every rung up to and including it)."""
    return [o for rung in rungs[: index + 1] for o in rung.adds]


def select_rungs(rungs: Sequence[Rung], spec: str | None) -> list[int]:
    """Indices of the rungs named in ``spec`` (``"bce,+raf"``; names or slugs), in ladder order; all if empty."""
    if not spec:
        return list(range(len(rungs)))
    wanted = [s.strip() for s in spec.split(",") if s.strip()]
    known = {r.name: i for i, r in enumerate(rungs)} | {r.slug: i for i, r in enumerate(rungs)}
    unknown = [w for w in wanted if w not in known]
    if unknown:
        raise SystemExit(f"segvlm ablate: unknown rung(s) {unknown}; known: {[r.name for r in rungs]}")
    return sorted({known[w] for w in wanted})


# ------------------------------------------------------------------------------------------ reporting
COLUMNS: tuple[tuple[str, str, str], ...] = (
    # (row key, header, format)   metrics in [0, 1] are shown in percent
    ("official/mean_iou", "mIoU", "pct"),
    ("delta_mean_iou", "Δ mIoU", "dpct"),
    ("official/cum_iou", "cum IoU", "pct"),
    ("official/pr@0.5", "Pr@0.5", "pct"),
    ("official/pr@0.6", "Pr@0.6", "pct"),
    ("official/pr@0.7", "Pr@0.7", "pct"),
    ("official/pr@0.8", "Pr@0.8", "pct"),
    ("official/pr@0.9", "Pr@0.9", "pct"),
    ("boundary/f", "boundary F", "pct"),
    ("clipseg/iou_fg", "IoU_FG", "pct"),
    ("clipseg/ap", "AP", "pct"),
    ("params_total", "params", "int"),
    ("params_trainable", "trainable", "int"),
    ("samples_per_s", "samples/s", "f1"),
    ("steps", "steps", "int"),
)
METRIC_KEYS = tuple(k for k, _, f in COLUMNS if f == "pct")


def _cell(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if fmt == "pct":
        return f"{100 * value:.2f}"
    if fmt == "dpct":
        return f"{100 * value:+.2f}"
    if fmt == "int":
        return f"{int(value):,}"
    return f"{value:.1f}"


def markdown_table(rows: Sequence[dict[str, Any]], *, split: str = "val") -> str:
    """The comparison table: one row per rung; metrics in percent on the ``split`` shards."""
    header = ["rung", *(h for _, h, _ in COLUMNS)]
    lines = [
        f"Ablation ({split} split; metrics in %; Δ mIoU against the previous rung)",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * len(COLUMNS)) + "|",
    ]
    for row in rows:
        cells = [f"`{row['rung']}`", *(_cell(row.get(k), f) for k, _, f in COLUMNS)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def bar_chart(rows: Sequence[dict[str, Any]], path: str | Path, *, split: str = "val") -> Path:
    """``ablation.png``: official mean IoU per rung, the value printed on each bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [row["rung"] for row in rows]
    values = [100 * float(row["official/mean_iou"]) for row in rows]
    figure, axis = plt.subplots(figsize=(max(5.0, 1.3 * len(rows) + 1), 4))
    bars = axis.bar(range(len(rows)), values, color="#4C72B0")
    for bar, value in zip(bars, values):
        axis.annotate(
            f"{value:.2f}",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            xytext=(0, 3),
            textcoords="offset points",
            ha="center",
            va="bottom",
            fontsize=9,
        )
    axis.set_xticks(range(len(rows)), names, rotation=20, ha="right")
    axis.set_ylabel(f"official mean IoU on {split} (%)")
    axis.set_ylim(0, max([1.0, *values]) * 1.18)
    axis.set_title("SegVLM ablation ladder")
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def _mean_metric(client: Any, run_id: str, key: str) -> float:
    history = client.get_metric_history(run_id, key)
    return float(sum(m.value for m in history) / len(history)) if history else math.nan


def _parameter_counts(client: Any, run_id: str, cfg: Any) -> tuple[int, int]:
    """From the child run's params (logged by the worker loop), else by building the model."""
    params = client.get_run(run_id).data.params
    if "params.total" in params and "params.trainable" in params:
        return int(params["params.total"]), int(params["params.trainable"])
    from segvlm.registry import build_model

    counts = build_model(cfg.model).num_parameters()
    return int(counts["total"]), int(counts["trainable"])


# ------------------------------------------------------------------------------------------- the job
def run_ablation(
    config: str | Path | None,
    overrides: Sequence[str] = (),
    *,
    rungs: str | None = None,
    steps: int | None = None,
    train_seconds: float | None = None,
    eval_split: str = "val",
    eval_data: str | None = None,
    eval_batch_size: int = 16,
    name: str | None = None,
    tracking_uri: str | None = None,
    ray_address: str | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train and evaluate the selected rungs under one MLflow parent run; return
    ``{parent_run_id, name, tracking_uri, rows, table, out_dir}`` (``rows``: one dict per rung)."""
    quiet_environment()
    from mlflow import MlflowClient

    from jobs.config import ExperimentConfig
    from jobs.eval import run_eval
    from jobs.tracking import get_or_create_experiment, resolve_tracking_uri
    from jobs.train import run_training
    from segvlm.config import load_config

    user = list(overrides)
    if steps is not None:
        user += [f"train.steps={int(steps)}", "train.time_budget_s=0"]
    elif train_seconds is not None:
        user += [f"train.time_budget_s={float(train_seconds)}"]
    base = load_config(ExperimentConfig, config, user)
    if not base.data.train_shards:
        raise SystemExit("segvlm ablate: data.train_shards is empty (set it, or pass --demo-data DIR)")
    if eval_split == "val":
        eval_data = eval_data or base.data.val_shards
        eval_split_name = base.data.val_split
    else:
        eval_split_name = eval_split
    if not eval_data:
        raise SystemExit(
            f"segvlm ablate: no shards to evaluate the {eval_split!r} split on "
            "(set data.val_shards, or pass --eval-data)"
        )

    ladder_rungs = ladder(base.loss)
    chosen = select_rungs(ladder_rungs, rungs)
    name = name or time.strftime("ablation-%Y%m%d-%H%M%S")
    workdir = Path(base.workdir).resolve()
    out_dir = workdir / name
    out_dir.mkdir(parents=True, exist_ok=True)
    tracking = resolve_tracking_uri(tracking_uri if tracking_uri is not None else base.tracking.uri, workdir)
    init_ray(ray_address)

    client = MlflowClient(tracking)
    experiment_id = get_or_create_experiment(tracking, base.tracking.experiment, workdir)
    parent = client.create_run(
        experiment_id,
        run_name=name,
        tags={
            "segvlm.kind": "ablation",
            "ablation.rungs": ",".join(ladder_rungs[i].name for i in chosen),
            "ablation.config": str(config),
            "ablation.eval_split": eval_split,
        },
    )
    parent_id = parent.info.run_id
    client.log_param(parent_id, "overrides", json.dumps(user)[:6000])
    log(f"[ablate] {name}: {len(chosen)} rung(s) under MLflow parent run {parent_id} ({tracking})")

    rows: list[dict[str, Any]] = []
    status = "FAILED"
    try:
        for position, index in enumerate(chosen):
            rung = ladder_rungs[index]
            cfg = load_config(
                ExperimentConfig,
                config,
                [
                    *user,
                    *rung_overrides(ladder_rungs, index),
                    f"train.run_name={name}-{index}-{rung.slug}",
                    f"tracking.registered_model={base.tracking.registered_model}-ablation",
                ],
            )
            log(f"[ablate] rung {position + 1}/{len(chosen)} {rung.name}: {rung.description}")
            trained = run_training(
                cfg, tracking_uri=tracking, ray_address=ray_address, parent_run_id=parent_id
            )
            child = trained["run_id"]
            client.set_tag(child, "ablation.rung", rung.name)
            report = run_eval(
                trained["best_checkpoint"],
                eval_data,
                out=str(out_dir / rung.slug / f"eval-{eval_split}"),
                split=eval_split_name,
                num_workers=cfg.train.num_workers,
                batch_size=eval_batch_size,
                use_gpu=cfg.train.use_gpu,
                ray_address=ray_address,
                tracking_uri=tracking,
                experiment=cfg.tracking.experiment,
                run_id=child,
            )
            total, trainable = _parameter_counts(client, child, cfg)
            row: dict[str, Any] = {
                "rung": rung.name,
                "description": rung.description,
                "run_id": child,
                "run_name": trained["run_name"],
                "overrides": rung_overrides(ladder_rungs, index),
                # an undefined metric is null in report.json
                **{k: math.nan if report.get(k) is None else float(report[k]) for k in METRIC_KEYS},
                "official/count": report.get("official/count"),
                "params_total": total,
                "params_trainable": trainable,
                "samples_per_s": _mean_metric(client, child, "perf/samples_per_s"),
                "steps": int(trained["steps"]),
                "train_seconds": float(trained["seconds"]),
                "best_checkpoint": trained["best_checkpoint"],
                "best_val_mean_iou": trained["best_score"],
            }
            previous = rows[-1]["official/mean_iou"] if rows else math.nan
            row["delta_mean_iou"] = row["official/mean_iou"] - previous if rows else math.nan
            rows.append(row)
            client.log_metric(parent_id, "ablation/official_mean_iou", row["official/mean_iou"], step=index)
            client.log_metric(parent_id, "ablation/params_trainable", float(trainable), step=index)
            log(
                f"[ablate] {rung.name}: mean IoU {row['official/mean_iou']:.4f} "
                f"({row['steps']} steps, {row['samples_per_s']:.1f} samples/s, {trainable:,} trainable)"
            )

        table = markdown_table(rows, split=eval_split)
        (out_dir / "ablation.md").write_text(table)
        summary = {
            "name": name,
            "parent_run_id": parent_id,
            "tracking_uri": tracking,
            "config": str(config),
            "overrides": user,
            "eval_split": eval_split,
            "eval_data": str(eval_data),
            "rows": rows,
        }
        (out_dir / "ablation.json").write_text(to_json(summary, indent=2, default=_json_default))
        bar_chart(rows, out_dir / "ablation.png", split=eval_split)
        for file in ("ablation.md", "ablation.json", "ablation.png"):
            client.log_artifact(parent_id, str(out_dir / file))
        status = "FINISHED"
    finally:
        client.set_terminated(parent_id, status)
    return {
        "parent_run_id": parent_id,
        "name": name,
        "tracking_uri": tracking,
        "rows": rows,
        "table": table,
        "out_dir": str(out_dir),
    }


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="segvlm ablate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="base experiment YAML (the full SegVLM settings)")
    parser.add_argument("overrides", nargs="*", help="key.path=value overrides applied to every rung")
    parser.add_argument("--steps", type=int, default=None, help="train.steps per rung (no time budget)")
    parser.add_argument(
        "--train-seconds",
        type=float,
        default=None,
        help="per-rung training time budget (train.time_budget_s)",
    )
    parser.add_argument(
        "--rungs", default=None, help="comma-separated subset, e.g. bce,+raf (default: all seven)"
    )
    parser.add_argument("--eval-split", default="val", help="val (data.val_shards) or test (--eval-data)")
    parser.add_argument(
        "--eval-data", default=None, help="shards to evaluate on (default: the split's shards)"
    )
    parser.add_argument("--eval-batch-size", type=int, default=16)
    parser.add_argument(
        "--name", default=None, help="parent run name and run-name prefix (default: timestamp)"
    )
    parser.add_argument("--workdir", default=None, help="MLflow store, Ray results, reports")
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI (default: tracking.uri, else $MLFLOW_TRACKING_URI, else sqlite in workdir)",
    )
    parser.add_argument("--ray-address", default=None, help="Ray cluster address ('auto' on a cluster node)")
    parser.add_argument("--demo-data", default=None, help="build (or reuse) the demo's synthetic data here")
    parser.add_argument("--demo-images", type=int, default=2000, help="scenes to render with --demo-data")
    parser.add_argument(
        "--demo-image-size", type=int, default=128, help="scene size in pixels with --demo-data"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the demo data (train.seed: an override)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.steps is not None and args.train_seconds is not None:
        raise SystemExit("segvlm ablate: give --steps or --train-seconds, not both")
    quiet_environment()
    overrides: list[str] = []
    eval_data = args.eval_data
    if args.demo_data:
        init_ray(args.ray_address, num_cpus=None if args.ray_address else os.cpu_count())
        from jobs.demo_data import build_demo_data

        data = build_demo_data(
            args.demo_data,
            images=args.demo_images,
            image_size=args.demo_image_size,
            seed=args.seed,
            progress_every=60.0,
            reuse=True,
            label="ablate",
        )
        overrides += [
            f"model.backbone.pretrained={data['clip']}",
            f"data.train_shards={data['train']}",
            f"data.val_shards={data['val']}",
        ]
        if args.eval_split == "test" and not eval_data:
            eval_data = data["test"]
    overrides += list(args.overrides)
    if args.workdir:
        overrides.append(f"workdir={args.workdir}")
    out = run_ablation(
        args.config,
        overrides,
        rungs=args.rungs,
        steps=args.steps,
        train_seconds=args.train_seconds,
        eval_split=args.eval_split,
        eval_data=eval_data,
        eval_batch_size=args.eval_batch_size,
        name=args.name,
        tracking_uri=args.tracking_uri,
        ray_address=args.ray_address,
    )
    print()
    print(out["table"])
    print(f"MLflow parent run: {out['parent_run_id']} ({out['tracking_uri']})")
    print(f"reports: {out['out_dir']}")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
