"""The ablation sweep's statistics and reports, pure: per-rung mean ± sample standard deviation over the
seeds' trials, the difference of mean IoU to the previous rung with its standard error, the markdown table and
the chart. A trial row (``jobs.ablate.run_trial``) is a flat dict: ``rung``, ``seed``, ``status`` (``ok`` |
``failed``), the evaluation metrics of :data:`TRIAL_METRICS` (fractions in [0, 1], NaN when undefined),
``best_val_mean_iou``, ``steps``, ``params_trainable``, ``run_id``; a failed one ``error`` instead.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol


class NamedRung(Protocol):
    """What the statistics read of a rung (``jobs.ablate.Rung``)."""

    name: str
    description: str


def trial_key(rung: str, seed: int) -> str:
    """How a trial is named in progress lines, ``step_hooks`` and the reports: ``+raf/seed1``."""
    return f"{rung}/seed{seed}"


# ---------------------------------------------------------------------------------------- aggregation
# metrics in [0, 1] read from each trial's evaluation report; relation-type IoU exists for PhraseCut only
TRIAL_METRICS = (
    "official/mean_iou",
    "official/relation/mean_iou",
    "official/cum_iou",
    *(f"official/pr@{t}" for t in ("0.5", "0.6", "0.7", "0.8", "0.9")),
    "boundary/f",
    "clipseg/iou_fg",
    "clipseg/ap",
)
AGGREGATED = (*TRIAL_METRICS, "best_val_mean_iou", "samples_per_s", "steps")
DELTA_KEY = "official/mean_iou"


def mean_sd(values: Sequence[float]) -> dict[str, float]:
    """``{"mean", "sd", "n"}`` of the finite ``values``: ``sd`` is the sample standard deviation (n − 1 in
    the denominator), NaN for n < 2; ``mean`` NaN for n = 0."""
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(finite)
    mean = sum(finite) / n if n else math.nan
    sd = math.sqrt(sum((v - mean) ** 2 for v in finite) / (n - 1)) if n > 1 else math.nan
    return {"mean": mean, "sd": sd, "n": n}


def difference(previous: Mapping[str, float], current: Mapping[str, float]) -> dict[str, Any]:
    """``current − previous`` of two ``mean_sd`` results, its standard error ``sqrt(s1²/n1 + s2²/n2)`` (NaN
    unless both sides have n ≥ 2) and ``significant``: ``|diff| > 2 SE``, ``None`` where SE is NaN."""
    diff = current["mean"] - previous["mean"]
    if previous["n"] > 1 and current["n"] > 1:
        se = math.sqrt(previous["sd"] ** 2 / previous["n"] + current["sd"] ** 2 / current["n"])
    else:
        se = math.nan
    significant = None if math.isnan(se) or math.isnan(diff) else abs(diff) > 2 * se
    return {"diff": diff, "se": se, "significant": significant}


def aggregate(trials: Sequence[Mapping[str, Any]], rungs: Sequence[NamedRung]) -> list[dict[str, Any]]:
    """One summary per rung of ``rungs`` (in that order) from the per-trial rows (``status`` ``ok`` or
    ``failed``): ``metrics[key] = mean_sd`` over the rung's successful trials, ``delta`` (of mean IoU) to the
    previous rung (``None`` for the first), ``failed``: the failed trials' seeds and errors, counted apart."""
    summaries: list[dict[str, Any]] = []
    for rung in rungs:
        mine = [t for t in trials if t["rung"] == rung.name]
        ok = [t for t in mine if t["status"] == "ok"]
        metrics = {k: mean_sd([t.get(k, math.nan) for t in ok]) for k in AGGREGATED}
        summaries.append(
            {
                "rung": rung.name,
                "description": rung.description,
                "trials": len(mine),
                "seeds": sorted(t["seed"] for t in ok),
                "failed": [
                    {"seed": t["seed"], "error": t.get("error", "")} for t in mine if t["status"] != "ok"
                ],
                "metrics": metrics,
                "params_total": ok[0]["params_total"] if ok else None,
                "params_trainable": ok[0]["params_trainable"] if ok else None,
                "delta": difference(summaries[-1]["metrics"][DELTA_KEY], metrics[DELTA_KEY])
                if summaries
                else None,
            }
        )
    return summaries


# what must be equal for trials of several reports to be one ladder (the workdir only says where files went)
SAME_LADDER = ("eval_split", "eval_data", "overrides")


def _comparable(report: Mapping[str, Any], key: str) -> Any:
    value = report.get(key)
    if key == "overrides":
        return [o for o in value or () if not o.startswith("workdir=")]
    return value


def combine(reports: Sequence[tuple[str, Mapping[str, Any]]]) -> dict[str, Any]:
    """One ladder from several ``ablation.json`` reports (``(source, report)`` pairs): parts of the same
    ladder run with ``--rungs``/``--seeds`` subsets, on other days or other clusters. Their trials are joined
    and aggregated again in ladder order (each trial's ``rung_index``), so every difference to the previous
    rung is computed across parts. Refuses (``ValueError`` naming the sources) reports whose evaluation
    shards or overrides differ, and a rung × seed that two reports both hold."""
    if not reports:
        raise ValueError("no ablation reports to combine")
    first_source, first = reports[0]
    for source, report in reports[1:]:
        for key in SAME_LADDER:
            if _comparable(report, key) != _comparable(first, key):
                raise ValueError(
                    f"{source}: {key} differs from {first_source} ({_comparable(report, key)!r} vs "
                    f"{_comparable(first, key)!r}): not parts of one ladder"
                )
    trials: list[dict[str, Any]] = []
    owner: dict[str, str] = {}
    rungs: dict[str, tuple[int, str]] = {}
    for source, report in reports:
        descriptions = {row["rung"]: row.get("description", "") for row in report.get("rows", ())}
        for trial in report.get("trials", ()):
            key = trial_key(trial["rung"], trial["seed"])
            if key in owner:
                raise ValueError(f"{source}: trial {key} is also in {owner[key]}")
            owner[key] = source
            index = int(trial["rung_index"])
            if rungs.setdefault(trial["rung"], (index, descriptions.get(trial["rung"], "")))[0] != index:
                raise ValueError(
                    f"{source}: rung {trial['rung']} is rung {index} here, not {rungs[trial['rung']][0]}"
                )
            trials.append({**trial, "source": source})
    order = sorted(rungs.items(), key=lambda item: item[1][0])
    named = [_ReportedRung(name, description) for name, (_, description) in order]
    trials.sort(key=lambda t: (t["rung_index"], t["seed"]))
    return {
        "eval_split": first.get("eval_split", "val"),
        "eval_data": first.get("eval_data"),
        "overrides": _comparable(first, "overrides"),
        "parts": [
            {"source": source, "name": report.get("name"), "parent_run_id": report.get("parent_run_id")}
            for source, report in reports
        ],
        "rows": aggregate(trials, named),
        "trials": trials,
        "best": _best_key(trials),
    }


class _ReportedRung(NamedTuple):
    name: str
    description: str


def _best_key(trials: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    best = best_trial(trials)
    if best is None:
        return None
    return {
        "trial": trial_key(best["rung"], best["seed"]),
        "run_id": best.get("run_id"),
        "source": best["source"],
    }


def best_trial(trials: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The successful trial with the highest best validation mean IoU (the first of equals), if any."""
    ok = [t for t in trials if t["status"] == "ok"]
    return max(ok, key=lambda t: t["best_val_mean_iou"]) if ok else None


# ------------------------------------------------------------------------------------------ reporting
SUMMARY_COLUMNS: tuple[tuple[str, str], ...] = (
    ("official/mean_iou", "mIoU"),
    ("official/relation/mean_iou", "relation mIoU"),
    ("official/cum_iou", "cum IoU"),
    ("official/pr@0.5", "Pr@0.5"),
    ("official/pr@0.9", "Pr@0.9"),
    ("boundary/f", "boundary F"),
    ("best_val_mean_iou", "best val mIoU"),
)


def _pct(value: Any, sign: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{100 * value:{sign}.2f}"


def _mean_sd_cell(stat: Mapping[str, float]) -> str:
    if stat["n"] == 0:
        return "–"
    return f"{_pct(stat['mean'])} ± {_pct(stat['sd']) if stat['n'] > 1 else 'n/a'}"


def _delta_cell(delta: Mapping[str, Any] | None) -> str:
    if delta is None:
        return ""
    if math.isnan(delta["se"]):
        return f"{_pct(delta['diff'], '+')} ± n/a"
    mark = " (> 2 SE)" if delta["significant"] else ""
    return f"{_pct(delta['diff'], '+')} ± {_pct(delta['se'])}{mark}"


def markdown_table(
    summaries: Sequence[Mapping[str, Any]], trials: Sequence[Mapping[str, Any]], *, split: str = "val"
) -> str:
    """Per rung: mean ± sample sd over seeds, Δ mIoU ± SE against the previous rung; then one row per trial
    (failed ones with their error). Metrics in percent on the ``split`` shards."""
    present = [
        (k, h) for k, h in SUMMARY_COLUMNS if any(s["metrics"][k]["n"] for s in summaries) or k == DELTA_KEY
    ]
    header = ["rung", "seeds", *(h for _, h in present[:1]), "Δ mIoU ± SE", *(h for _, h in present[1:])]
    header += ["trainable", "failed"]
    lines = [
        f"Ablation ({split} split; metrics in %, mean ± sample standard deviation over seeds)",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---", "---:"] + ["---:"] * (len(header) - 3) + ["---"]) + "|",
    ]
    for s in summaries:
        cells = [f"`{s['rung']}`", f"{len(s['seeds'])}/{s['trials']}"]
        cells += [_mean_sd_cell(s["metrics"][present[0][0]]), _delta_cell(s["delta"])]
        cells += [_mean_sd_cell(s["metrics"][k]) for k, _ in present[1:]]
        cells += [f"{s['params_trainable']:,}" if s["params_trainable"] is not None else "–"]
        cells += [", ".join(f"seed {f['seed']}" for f in s["failed"]) or "–"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "sd: sample standard deviation (n − 1); n/a with one seed. Δ: difference of mean mIoU to the previous "
        "rung ± its standard error sqrt(s1²/n1 + s2²/n2); (> 2 SE) where |Δ| exceeds two standard errors.",
        "",
        "| trial | status | mIoU | best val mIoU | steps | failed attempts | MLflow run | error |",
        "|---|---|---:|---:|---:|---:|---|---|",
    ]
    for t in trials:
        ok = t["status"] == "ok"
        lines.append(
            f"| `{trial_key(t['rung'], t['seed'])}` | {t['status']} | "
            f"{_pct(t.get('official/mean_iou')) if ok else '–'} | "
            f"{_pct(t.get('best_val_mean_iou')) if ok else '–'} | {t.get('steps', '–')} | "
            f"{t.get('failures', 0)} | {t.get('run_id') or '–'} | {t.get('error', '') or ''} |"
        )
    return "\n".join(lines) + "\n"


def error_bar_chart(summaries: Sequence[Mapping[str, Any]], path: str | Path, *, split: str = "val") -> Path:
    """``ablation.png``: mean IoU per rung (bar), ± one sample sd (error bar, none with one seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats = [s["metrics"][DELTA_KEY] for s in summaries]
    means = [100 * st["mean"] if st["n"] else 0.0 for st in stats]
    sds = [100 * st["sd"] if st["n"] > 1 else 0.0 for st in stats]
    figure, axis = plt.subplots(figsize=(max(5.0, 1.3 * len(summaries) + 1), 4))
    axis.bar(range(len(summaries)), means, yerr=sds, capsize=6, color="#4C72B0")
    for i, (mean, sd, st) in enumerate(zip(means, sds, stats)):
        axis.annotate(
            f"{mean:.2f}" + (f"±{sd:.2f}" if st["n"] > 1 else ""),
            (i, mean + sd),
            xytext=(0, 3),
            textcoords="offset points",
            ha="center",
            va="bottom",
            fontsize=8,
        )
    axis.set_xticks(range(len(summaries)), [s["rung"] for s in summaries], rotation=20, ha="right")
    axis.set_ylabel(f"official mean IoU on {split} (%), mean ± sd")
    axis.set_ylim(0, max([1.0, *(m + s for m, s in zip(means, sds))]) * 1.2)
    axis.set_title("SegVLM ablation ladder")
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
