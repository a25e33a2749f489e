"""``segvlm ablate``: the paper's ablation ladder, from the CLIPSeg baseline to full SegVLM, as a seeded Ray Tune
sweep under one MLflow parent run.

Launch::

    segvlm ablate --config configs/demo.yaml --demo-data runs/ablation-data --train-seconds 120
    segvlm ablate --config configs/phrasecut_b16.yaml data.train_shards=s3://b/train data.val_shards=s3://b/val \\
        --steps 20000 --seeds 3 --max-concurrent 4 --ray-address auto --tracking-uri http://127.0.0.1:5000
    segvlm ablate --config configs/demo.yaml --demo-data runs/abl --steps 4 --rungs bce,+raf --seeds 0,1 \\
        train.num_workers=1

Each rung is the base config plus the cumulative overrides of every rung before it. Every rung × seed
(``--seeds 3``: seeds 0, 1, 2 in ``train.seed``) is one Ray Tune trial; a trial trains its own Ray Train run
(``jobs.train.run_training``: its own workers, ``train.run_name``, MLflow child run of the parent) and
evaluates its best checkpoint (``jobs.eval.run_eval``) on the validation shards (``--eval-split test``: the
test shards). Trials run side by side as far as the cluster's CPUs/GPUs allow (``--max-concurrent``); the
trial itself reserves no CPU, only its Train workers do. A failing trial is retried (``--max-failures``; a
retry resumes its Ray Train run from the last checkpoint, in the same MLflow run, on top of the Train run's
own ``train.max_failures``; one that died before its first checkpoint starts over in a new child run, and the
first stays behind unfinished); a trial that still fails is reported as failed, with its error, never dropped.

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
``+relations``      decoder.relational_context=true decoder.relative_position=true (only when the config turns
                    them on)
``+convex``         decoder.upsample=convex (only when the config upsamples so)
==================  =====================================================================================

The parent run gets ``ablation.md`` (per rung: mean ± sample standard deviation over the seeds, and the
difference of mean IoU to the previous rung with its standard error; then every trial), ``ablation.json``
and ``ablation.png`` (mean IoU per rung with error bars); they are also written to ``<workdir>/<name>/``.
The registered model ``<tracking.registered_model>-ablation`` gets one version per trial; its alias ``best``
ends on the trial with the best validation mean IoU.

A ladder too long for one sitting runs in parts (``--rungs``, ``--seeds 0,1`` …, the same overrides and
evaluation shards); ``--combine A B …`` (their ``ablation.json`` files or folders) joins them into one table
with the differences computed across parts, and trains nothing::

    segvlm ablate --combine runs/ablate/ladder-a runs/ablate/ladder-b --workdir runs/ablate --name ladder
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from jobs.ablation_report import (
    DELTA_KEY,
    TRIAL_METRICS,
    aggregate,
    best_trial,
    combine,
    error_bar_chart,
    markdown_table,
    trial_key,
)
from jobs.common import init_ray, to_json
from jobs.environment import quiet_environment
from segvlm.atomic import write_bytes_atomic

SWITCHES = ("cross_attention", "projector", "deformable", "se", "residual")
RELATION_SWITCHES = ("relational_context", "relative_position")


@dataclasses.dataclass(frozen=True)
class Rung:
    """One step of the ladder: its display name, a slug for run names, and the overrides it adds."""

    name: str
    slug: str
    description: str
    adds: tuple[str, ...]


def ladder(loss: Any, decoder: Any = None) -> list[Rung]:
    """The rungs; ``loss`` (the base config's ``LossConfig``) gives the RAF weights of ``+raf`` and, when it
    uses the word losses, their weight in a rung ``+words``; rungs ``+relations`` and then ``+convex`` come
    last when ``decoder`` (the base config's ``DecoderConfig``) turns on the relation parts or the convex
    upsampling."""
    rungs = [
        Rung(
            "bce",
            "bce",
            "CLIPSeg baseline (BCE only, plain decoder)",
            (
                *(f"model.decoder.{s}=false" for s in (*SWITCHES, *RELATION_SWITCHES)),
                "model.decoder.head=convt",
                "model.decoder.upsample=bilinear",
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
    relations = [s for s in RELATION_SWITCHES if decoder is not None and getattr(decoder, s)]
    if relations:
        rungs.append(
            Rung(
                "+relations",
                "relations",
                "where the reference object lies, and attention biased by token offsets",
                tuple(f"model.decoder.{s}=true" for s in relations),
            )
        )
    if decoder is not None and decoder.upsample == "convex":
        rungs.append(
            Rung(
                "+convex",
                "convex",
                "the logits upsampled by convex weights from the image's pixels",
                ("model.decoder.upsample=convex",),
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


def parse_seeds(spec: str | int) -> list[int]:
    """``"3"`` (a count: seeds 0, 1, 2) or ``"0,1,2"`` / ``"7,"`` (the seeds themselves) → the seed list."""
    text = str(spec).strip()
    try:
        if "," not in text:
            count = int(text)
            if count <= 0:
                raise ValueError
            return list(range(count))
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(
            f"segvlm ablate: --seeds takes a positive count (3) or a list of seeds (0,1,2), got {spec!r}"
        ) from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise SystemExit(f"segvlm ablate: --seeds needs distinct non-negative seeds, got {spec!r}")
    return seeds


# ------------------------------------------------------------------------------------------- one trial
@dataclasses.dataclass(frozen=True)
class AblationPlan:
    """What every trial needs, shipped once to the trial actors (``tune.with_parameters``).

    ``base`` is the base experiment as a plain dict (``segvlm.config.to_dict``, the user's overrides applied):
    a trial builds its config from it, never from the YAML path, which may be relative to the driver's folder.
    """

    name: str
    base: dict[str, Any]
    rungs: tuple[Rung, ...]
    registered_model: str
    tracking_uri: str
    parent_run_id: str
    ray_address: str | None
    eval_data: str
    eval_split: str  # "val" | "test": the report's name for it
    eval_split_name: str  # the split the shards hold (data.val_split for "val")
    eval_batch_size: int
    out_dir: str
    # tests' fault injection: trial_key -> run_training(step_hook=...) of that trial, every attempt
    step_hooks: Mapping[str, Callable[[int, int], None]] = dataclasses.field(default_factory=dict)


def trial_config(plan: AblationPlan, index: int, seed: int) -> Any:
    """The ``ExperimentConfig`` of rung ``index`` with ``train.seed=seed``; its run name is fixed by rung and
    seed, so a retried trial resumes its own Ray Train run."""
    from jobs.config import ExperimentConfig
    from segvlm.config import from_dict

    rung = plan.rungs[index]
    return from_dict(
        ExperimentConfig,
        plan.base,
        [
            *rung_overrides(plan.rungs, index),
            f"train.seed={seed}",
            f"train.run_name={plan.name}-{index}-{rung.slug}-s{seed}",
            f"tracking.registered_model={plan.registered_model}",
        ],
    )


def run_trial(config: dict[str, Any], plan: AblationPlan) -> dict[str, Any]:
    """The Tune function trainable: train rung ``config["rung"]`` (an index into ``plan.rungs``) with seed
    ``config["seed"]`` as its own Ray Train run, evaluate its best checkpoint, return ``{"trial": row}``
    (the row of the per-trial table; Tune keeps it as the trial's last result)."""
    from mlflow import MlflowClient

    from jobs.eval import run_eval
    from jobs.train import run_training

    index, seed = int(config["rung"]), int(config["seed"])
    rung = plan.rungs[index]
    cfg = trial_config(plan, index, seed)
    trained = run_training(
        cfg,
        tracking_uri=plan.tracking_uri,
        ray_address=plan.ray_address,
        parent_run_id=plan.parent_run_id,
        step_hook=plan.step_hooks.get(trial_key(rung.name, seed)),
    )
    child = trained["run_id"]
    client = MlflowClient(plan.tracking_uri)
    client.set_tag(child, "ablation.rung", rung.name)
    client.set_tag(child, "ablation.seed", str(seed))
    report = run_eval(
        trained["best_checkpoint"],
        plan.eval_data,
        out=str(Path(plan.out_dir) / rung.slug / f"seed{seed}" / f"eval-{plan.eval_split}"),
        split=plan.eval_split_name,
        num_workers=cfg.train.num_workers,
        batch_size=plan.eval_batch_size,
        use_gpu=cfg.train.use_gpu,
        ray_address=plan.ray_address,
        tracking_uri=plan.tracking_uri,
        experiment=cfg.tracking.experiment,
        run_id=child,
    )
    total, trainable = _parameter_counts(client, child, cfg)
    row = {
        "rung": rung.name,
        "rung_index": index,
        "seed": seed,
        "status": "ok",
        "run_id": child,
        "run_name": trained["run_name"],
        # an undefined metric (no task of that kind) is null in report.json
        **{k: math.nan if report.get(k) is None else float(report[k]) for k in TRIAL_METRICS},
        "official/count": report.get("official/count"),
        "params_total": total,
        "params_trainable": trainable,
        "samples_per_s": _mean_metric(client, child, "perf/samples_per_s"),
        "steps": int(trained["steps"]),
        "train_seconds": float(trained["seconds"]),
        "best_checkpoint": trained["best_checkpoint"],
        "best_val_mean_iou": float(trained["best_score"]),
        "registered_version": trained["registered_version"],
    }
    return {"trial": row}


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


# -------------------------------------------------------------------------------------------- the sweep
# A trial's own process only drives its Train run and evaluation: it must not hold a CPU that its Train
# workers wait for. Tune refuses an all-zero request, so the trial reserves a little memory instead.
TRIAL_RESOURCES = {"cpu": 0, "memory": 256 * 2**20}


def default_concurrency(cluster: Mapping[str, float], train: Any) -> int:
    """How many trials the cluster's ``CPU``/``GPU`` (``ray.cluster_resources()``) fit side by side, each with
    ``train.num_workers`` Train workers (``TrainConfig``); at least 1."""
    need = {"CPU": train.num_workers * train.cpus_per_worker}
    if train.use_gpu:
        need["GPU"] = float(train.num_workers)
    return max(1, min(int(cluster.get(k, 0.0) // v) for k, v in need.items() if v > 0))


def _error_line(error: Any) -> str:
    """The last line of an error or its trace (``ValueError: …``), fit for one table cell."""
    lines = [line.strip() for line in str(error or "").splitlines() if line.strip()]
    return (lines[-1] if lines else "unknown error")[:300].replace("|", "\\|")


def _trial_error(trial: Any) -> str:
    """The last line of the trial's latest failure, from the error file Tune has just written beside the
    driver (``Trial.get_error`` reads the storage copy, which is synced later)."""
    path = trial.error_file
    return _error_line(Path(path).read_text() if path and Path(path).is_file() else trial.get_error())


def console(line: str) -> None:
    """The default ``log``: prints through whatever ``print`` is at call time. Tune pickles its callbacks,
    and Ray swaps ``builtins.print`` in the driver (its progress bars do), so a callback holding the
    builtin itself would fail to pickle."""
    print(line, flush=True)


def _progress_callback(
    rungs: Sequence[Rung], total: int, max_failures: int, log: Callable[[str], None]
) -> Any:
    """A Tune callback (on the driver) printing one line per trial event instead of Tune's tables; it also
    counts each trial's failed attempts (``failures``: trial_key → count)."""
    from ray import tune

    class Progress(tune.Callback):
        def __init__(self) -> None:
            self.failures: dict[str, int] = {}
            self.ended = 0

        @staticmethod
        def key(trial: Any) -> str:
            return trial_key(rungs[trial.config["rung"]].name, trial.config["seed"])

        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            attempt = f" (attempt {trial.num_failures + 1})" if trial.num_failures else ""
            log(f"[ablate] {self.key(trial)} started{attempt}")

        def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            log(
                f"[ablate] {self.key(trial)} failed ({_trial_error(trial)}); "
                f"retrying ({trial.num_failures}/{max_failures})"
            )

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.failures[self.key(trial)] = trial.num_failures
            self.ended += 1
            row = (trial.last_result or {}).get("trial", {})
            log(
                f"[ablate] {self.key(trial)} done ({self.ended}/{total}): mean IoU "
                f"{row.get('official/mean_iou', math.nan):.4f}, best validation "
                f"{row.get('best_val_mean_iou', math.nan):.4f}, {row.get('steps')} steps"
            )

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.failures[self.key(trial)] = trial.num_failures
            self.ended += 1
            log(
                f"[ablate] {self.key(trial)} FAILED ({self.ended}/{total}) after {trial.num_failures} "
                f"attempt(s): {_trial_error(trial)} (trace: {trial.error_file})"
            )

    return Progress()


def run_trials(
    plan: AblationPlan,
    chosen: Sequence[int],
    seeds: Sequence[int],
    *,
    max_concurrent: int,
    max_failures: int,
    storage: str,
    log: Callable[[str], None] = console,
) -> list[dict[str, Any]]:
    """Run the grid ``chosen`` rungs × ``seeds`` as Tune trials; return one row per trial, in ladder then
    seed order: ``run_trial``'s row (``status`` ``ok``), or ``status`` ``failed`` with its ``error``;
    ``failures``: the trial's failed attempts."""
    from ray import tune

    # Tune's own console (trial tables, experiment box) and per-result TensorBoard/CSV logs give way to
    # our lines; trials keep the driver's working folder (relative data paths stay valid)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ["RAY_CHDIR_TO_TRIAL_DIR"] = "0"
    progress = _progress_callback(plan.rungs, len(chosen) * len(seeds), max_failures, log)
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(run_trial, plan=plan), TRIAL_RESOURCES),
        param_space={"rung": tune.grid_search(list(chosen)), "seed": tune.grid_search(list(seeds))},
        tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent),
        run_config=tune.RunConfig(
            name=f"{plan.name}-tune",
            storage_path=storage,
            verbose=0,
            callbacks=[progress],
            failure_config=tune.FailureConfig(max_failures=max_failures),
        ),
    )
    tune_logger = logging.getLogger("ray.tune")
    level = tune_logger.level
    tune_logger.setLevel(logging.CRITICAL)  # every failure's traceback: our line names its trace file
    try:
        grid = tuner.fit()
    finally:
        tune_logger.setLevel(level)

    rows = []
    for result in grid:
        index, seed = int(result.config["rung"]), int(result.config["seed"])
        key = trial_key(plan.rungs[index].name, seed)
        row = (result.metrics or {}).get("trial")
        if result.error is not None or row is None:
            row = {"rung": plan.rungs[index].name, "rung_index": index, "seed": seed, "status": "failed"}
            row["error"] = _error_line(result.error or "the trial reported no result")
        rows.append({**row, "failures": progress.failures.get(key, 0)})
    return sorted(rows, key=lambda r: (r["rung_index"], r["seed"]))


# ------------------------------------------------------------------------------------------- the job
def run_ablation(
    config: str | Path | None,
    overrides: Sequence[str] = (),
    *,
    rungs: str | None = None,
    seeds: Sequence[int] = (0, 1, 2),
    steps: int | None = None,
    train_seconds: float | None = None,
    eval_split: str = "val",
    eval_data: str | None = None,
    eval_batch_size: int = 16,
    max_concurrent: int | None = None,
    max_failures: int = 1,
    name: str | None = None,
    tracking_uri: str | None = None,
    ray_address: str | None = None,
    step_hooks: Mapping[str, Callable[[int, int], None]] | None = None,
    log: Callable[[str], None] = console,
) -> dict[str, Any]:
    """Train and evaluate the selected rungs × ``seeds`` as Tune trials under one MLflow parent run; return
    ``{parent_run_id, name, tracking_uri, rows, trials, best, table, out_dir}`` (``rows``: one summary per
    rung, ``aggregate``; ``trials``: one row per trial, failed ones included; ``best``: the best trial).

    ``max_concurrent`` (default: as many as the cluster's CPUs/GPUs fit) bounds the trials running at once;
    ``max_failures`` is how often Tune retries a failed trial. ``step_hooks`` (tests): ``trial_key`` → the
    ``step_hook`` of that trial's Ray Train run.
    """
    quiet_environment()
    import ray
    from mlflow import MlflowClient

    from jobs.tracking import get_or_create_experiment, resolve_tracking_uri
    from segvlm.config import to_dict

    base, user, eval_data, eval_split_name = _base_config(
        config,
        overrides,
        steps=steps,
        train_seconds=train_seconds,
        eval_split=eval_split,
        eval_data=eval_data,
    )
    ladder_rungs = tuple(ladder(base.loss, base.model.decoder))
    chosen = select_rungs(ladder_rungs, rungs)
    name = name or time.strftime("ablation-%Y%m%d-%H%M%S")
    workdir = Path(base.workdir).resolve()
    out_dir = workdir / name
    out_dir.mkdir(parents=True, exist_ok=True)
    tracking = resolve_tracking_uri(tracking_uri if tracking_uri is not None else base.tracking.uri, workdir)
    init_ray(ray_address)
    if max_concurrent is None:
        max_concurrent = default_concurrency(ray.cluster_resources(), base.train)

    client = MlflowClient(tracking)
    experiment_id = get_or_create_experiment(tracking, base.tracking.experiment, workdir)
    parent = client.create_run(
        experiment_id,
        run_name=name,
        tags={
            "segvlm.kind": "ablation",
            "ablation.rungs": ",".join(ladder_rungs[i].name for i in chosen),
            "ablation.seeds": ",".join(map(str, seeds)),
            "ablation.config": str(config),
            "ablation.eval_split": eval_split,
        },
    )
    parent_id = parent.info.run_id
    client.log_param(parent_id, "overrides", json.dumps(user)[:6000])
    client.log_param(parent_id, "max_concurrent", max_concurrent)
    plan = AblationPlan(
        name=name,
        base=to_dict(dataclasses.replace(base, workdir=str(workdir))),
        rungs=ladder_rungs,
        registered_model=f"{base.tracking.registered_model}-ablation",
        tracking_uri=tracking,
        parent_run_id=parent_id,
        ray_address=ray_address,
        eval_data=str(eval_data),
        eval_split=eval_split,
        eval_split_name=eval_split_name,
        eval_batch_size=eval_batch_size,
        out_dir=str(out_dir),
        step_hooks=dict(step_hooks or {}),
    )
    log(
        f"[ablate] {name}: {len(chosen)} rung(s) × {len(seeds)} seed(s) = {len(chosen) * len(seeds)} trials, "
        f"{max_concurrent} at a time, under MLflow parent run {parent_id} ({tracking})"
    )
    status = "FAILED"
    try:
        trials = run_trials(
            plan,
            chosen,
            seeds,
            max_concurrent=max_concurrent,
            max_failures=max_failures,
            storage=base.train.storage_path or str(workdir / "ray_results"),
            log=log,
        )
        summaries = aggregate(trials, [ladder_rungs[i] for i in chosen])
        best = _point_best_alias(client, plan.registered_model, trials, parent_id, log)
        table = markdown_table(summaries, trials, split=eval_split)
        summary = {
            "name": name,
            "parent_run_id": parent_id,
            "tracking_uri": tracking,
            "config": str(config),
            "overrides": user,
            "seeds": list(seeds),
            "max_concurrent": max_concurrent,
            "eval_split": eval_split,
            "eval_data": str(eval_data),
            "best": best,
            "rows": summaries,
            "trials": trials,
        }
        _write_reports(client, parent_id, out_dir, summary, table, chosen)
        status = "FINISHED"
    finally:
        client.set_terminated(parent_id, status)
    return {**summary, "table": table, "out_dir": str(out_dir)}


def _base_config(
    config: str | Path | None,
    overrides: Sequence[str],
    *,
    steps: int | None,
    train_seconds: float | None,
    eval_split: str,
    eval_data: str | None,
) -> tuple[Any, list[str], str, str]:
    """The base ``ExperimentConfig``, the overrides it was built with, the shards to evaluate on and the
    split they hold; exits with a clear message when there is nothing to train or evaluate on."""
    from jobs.config import ExperimentConfig
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
        split_name = base.data.val_split
    else:
        split_name = eval_split
    if not eval_data:
        raise SystemExit(
            f"segvlm ablate: no shards to evaluate the {eval_split!r} split on "
            "(set data.val_shards, or pass --eval-data)"
        )
    return base, user, str(eval_data), split_name


def _point_best_alias(
    client: Any,
    registered: str,
    trials: Sequence[Mapping[str, Any]],
    parent_id: str,
    log: Callable[[str], None],
) -> dict[str, Any] | None:
    """Point the alias ``best`` of ``registered`` at the best trial's version (each trial's run_training
    moved it to its own: concurrent trials leave it on whichever registered last)."""
    best = best_trial(trials)
    if best is None:
        log("[ablate] no trial succeeded: the alias `best` is left as it was")
        return None
    version = best.get("registered_version")
    if version is not None:
        client.set_registered_model_alias(registered, "best", str(version))
    client.set_tag(parent_id, "ablation.best_trial", trial_key(best["rung"], best["seed"]))
    client.set_tag(parent_id, "ablation.best_run_id", best["run_id"])
    log(
        f"[ablate] best: {trial_key(best['rung'], best['seed'])} (validation mean IoU "
        f"{best['best_val_mean_iou']:.4f}): {registered}@best = version {version}"
    )
    return {"trial": trial_key(best["rung"], best["seed"]), "run_id": best["run_id"], "version": version}


def _write_reports(
    client: Any,
    parent_id: str,
    out_dir: Path,
    summary: Mapping[str, Any],
    table: str,
    chosen: Sequence[int],
) -> None:
    """ablation.md/.json/.png into ``out_dir`` and onto the parent run, with the per-rung means as its metrics
    (step: the rung's index in the ladder)."""
    write_report_files(out_dir, summary, table)
    for file in ("ablation.md", "ablation.json", "ablation.png"):
        client.log_artifact(parent_id, str(out_dir / file))
    for index, row in zip(chosen, summary["rows"]):
        stat = row["metrics"][DELTA_KEY]
        for key, value in (
            ("ablation/official_mean_iou", stat["mean"]),
            ("ablation/official_mean_iou_sd", stat["sd"]),
            ("ablation/params_trainable", row["params_trainable"]),
        ):
            if value is not None and math.isfinite(value):
                client.log_metric(parent_id, key, float(value), step=index)
    failed = sum(len(row["failed"]) for row in summary["rows"])
    client.set_tag(parent_id, "ablation.failed_trials", str(failed))


def write_report_files(out_dir: Path, summary: Mapping[str, Any], table: str) -> None:
    """``ablation.md``, ``ablation.json`` and ``ablation.png`` in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(out_dir / "ablation.md", table.encode())
    write_bytes_atomic(out_dir / "ablation.json", to_json(summary, indent=2, default=_json_default).encode())
    error_bar_chart(summary["rows"], out_dir / "ablation.png", split=summary["eval_split"])


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="segvlm ablate",
        description=__doc__.split("\n\n")[0],
        epilog="Each rung × seed is a Ray Tune trial running its own Ray Train run; see the module docstring.",
    )
    parser.add_argument("--config", help="base experiment YAML (the full SegVLM settings)")
    parser.add_argument("overrides", nargs="*", help="key.path=value overrides applied to every rung")
    parser.add_argument("--steps", type=int, default=None, help="train.steps per trial (no time budget)")
    parser.add_argument(
        "--train-seconds",
        type=float,
        default=None,
        help="per-trial training time budget (train.time_budget_s)",
    )
    parser.add_argument(
        "--rungs", default=None, help="comma-separated subset, e.g. bce,+raf (default: the whole ladder)"
    )
    parser.add_argument(
        "--seeds",
        default="3",
        help="a count (3: seeds 0,1,2) or a list (0,1,2) of train.seed values; one trial per rung and seed",
    )
    parser.add_argument(
        "--max-concurrent",
        type=int,
        default=None,
        help="trials at once (default: as many as the cluster's CPUs/GPUs fit with train.num_workers each)",
    )
    parser.add_argument(
        "--max-failures",
        type=int,
        default=1,
        help="Tune retries of a failed trial (each resumes its Train run; train.max_failures acts within)",
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
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the demo data (not of training: --seeds)"
    )
    parser.add_argument(
        "--combine",
        nargs="+",
        metavar="REPORT",
        default=None,
        help="trains nothing: join the ablation.json reports (or their folders) of parts of one ladder, run "
        "with --rungs/--seeds subsets, into one report in <workdir>/<name>/",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Exit 0 when every trial succeeded, 1 when a trial failed (the reports list it)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.combine:
        return combine_reports(args.combine, Path(args.workdir or "runs/ablate") / (args.name or "combined"))
    if not args.config:
        parser.error("--config is required (unless --combine)")
    if args.steps is not None and args.train_seconds is not None:
        raise SystemExit("segvlm ablate: give --steps or --train-seconds, not both")
    if args.max_concurrent is not None and args.max_concurrent <= 0:
        raise SystemExit("segvlm ablate: --max-concurrent must be positive")
    if args.max_failures < 0:
        raise SystemExit("segvlm ablate: --max-failures must be 0 or more")
    seeds = parse_seeds(args.seeds)
    quiet_environment()
    overrides: list[str] = []
    eval_data = args.eval_data
    if args.demo_data:
        overrides, demo_test = _demo_overrides(args)
        if args.eval_split == "test" and not eval_data:
            eval_data = demo_test
    overrides += list(args.overrides)
    if args.workdir:
        overrides.append(f"workdir={args.workdir}")
    out = run_ablation(
        args.config,
        overrides,
        rungs=args.rungs,
        seeds=seeds,
        steps=args.steps,
        train_seconds=args.train_seconds,
        eval_split=args.eval_split,
        eval_data=eval_data,
        eval_batch_size=args.eval_batch_size,
        max_concurrent=args.max_concurrent,
        max_failures=args.max_failures,
        name=args.name,
        tracking_uri=args.tracking_uri,
        ray_address=args.ray_address,
    )
    print()
    print(out["table"])
    print(f"MLflow parent run: {out['parent_run_id']} ({out['tracking_uri']})")
    print(f"reports: {out['out_dir']}")
    return 1 if any(t["status"] != "ok" for t in out["trials"]) else 0


def combine_reports(sources: Sequence[str], out_dir: Path) -> int:
    """``--combine``: read each source's ``ablation.json``, join them (``ablation_report.combine``) and write
    ``ablation.md/.json/.png`` into ``out_dir``; exit 2 with the reason when they are not one ladder."""
    reports = []
    for source in sources:
        path = Path(source)
        path = path / "ablation.json" if path.is_dir() else path
        try:
            reports.append((str(path), json.loads(path.read_text())))
        except (OSError, ValueError) as error:
            print(f"segvlm ablate: cannot read the report {path}: {error}", file=sys.stderr)
            return 2
    try:
        summary = combine(reports)
    except ValueError as error:
        print(f"segvlm ablate: {error}", file=sys.stderr)
        return 2
    table = markdown_table(summary["rows"], summary["trials"], split=summary["eval_split"])
    write_report_files(out_dir, summary, table)
    print(table)
    print(f"reports: {out_dir}")
    return 0


def _demo_overrides(args: argparse.Namespace) -> tuple[list[str], str]:
    """Build (or reuse) the demo's data; the overrides that train on it, and its test shards."""
    # the tiny CLIP it writes is local: transformers' load bars (one per Ray worker) would only add noise
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
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
    overrides = [
        f"model.backbone.pretrained={data['clip']}",
        f"data.train_shards={data['train']}",
        f"data.val_shards={data['val']}",
    ]
    return overrides, data["test"]


if __name__ == "__main__":
    import sys

    sys.exit(main())
