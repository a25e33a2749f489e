"""The ablation sweep's pure pieces: seeds, concurrency, and the per-rung statistics against hand-computed
values (sample standard deviation, difference of means with its standard error, failed trials kept)."""

from __future__ import annotations

import math

import pytest

from jobs.ablate import Rung, default_concurrency, parse_seeds
from jobs.ablation_report import DELTA_KEY, aggregate, best_trial, difference, markdown_table, mean_sd
from jobs.config import TrainConfig

RUNGS = [Rung("bce", "bce", "baseline", ()), Rung("+raf", "raf", "RAF", ()), Rung("+se", "se", "SE", ())]


def trial(rung: str, seed: int, miou: float, best_val: float, relation: float = math.nan) -> dict:
    return {
        "rung": rung,
        "rung_index": [r.name for r in RUNGS].index(rung),
        "seed": seed,
        "status": "ok",
        "run_id": f"run-{rung}-{seed}",
        "official/mean_iou": miou,
        "official/relation/mean_iou": relation,
        "best_val_mean_iou": best_val,
        "params_total": 100,
        "params_trainable": 10,
        "steps": 4,
    }


TRIALS = [
    trial("bce", 0, 0.40, 0.41, relation=0.20),
    trial("bce", 1, 0.50, 0.52, relation=0.30),
    trial("bce", 2, 0.60, 0.58),  # no relation task in its evaluation: left out of that metric's n
    trial("+raf", 0, 0.70, 0.69),
    trial("+raf", 1, 0.80, 0.83),
    {
        "rung": "+raf",
        "rung_index": 1,
        "seed": 2,
        "status": "failed",
        "error": "ValueError: boom",
        "failures": 2,
    },
    trial("+se", 0, 0.74, 0.75),
]


def test_parse_seeds():
    assert parse_seeds("3") == [0, 1, 2]
    assert parse_seeds(1) == [0]
    assert parse_seeds("0,1,2") == [0, 1, 2]
    assert parse_seeds("7,") == [7]
    assert parse_seeds(" 4, 2 ") == [4, 2]
    for bad in ("0", "-2", "a", "1,1", "1,-1", ","):
        with pytest.raises(SystemExit, match="--seeds"):
            parse_seeds(bad)


def test_default_concurrency_fits_the_train_workers():
    cpu2 = TrainConfig(num_workers=2, cpus_per_worker=1.0)
    assert default_concurrency({"CPU": 8.0}, cpu2) == 4
    assert default_concurrency({"CPU": 7.0}, cpu2) == 3
    assert default_concurrency({"CPU": 1.0}, cpu2) == 1  # never 0: one trial waits for its workers
    gpu = TrainConfig(num_workers=1, use_gpu=True, cpus_per_worker=2.0)
    assert default_concurrency({"CPU": 16.0, "GPU": 2.0}, gpu) == 2
    assert default_concurrency({"CPU": 16.0}, gpu) == 1


def test_mean_sd_is_the_sample_standard_deviation():
    stat = mean_sd([0.4, 0.5, 0.6])
    assert stat["n"] == 3
    assert stat["mean"] == pytest.approx(0.5)
    assert stat["sd"] == pytest.approx(0.1)  # sqrt((0.01 + 0 + 0.01) / (3 - 1))
    one = mean_sd([0.7])
    assert one["mean"] == 0.7 and one["n"] == 1 and math.isnan(one["sd"])
    none = mean_sd([math.nan, None])
    assert none["n"] == 0 and math.isnan(none["mean"]) and math.isnan(none["sd"])


def test_difference_and_its_standard_error():
    d = difference({"mean": 0.5, "sd": 0.1, "n": 3}, {"mean": 0.75, "sd": math.sqrt(0.005), "n": 2})
    assert d["diff"] == pytest.approx(0.25)
    assert d["se"] == pytest.approx(math.sqrt(0.01 / 3 + 0.005 / 2))  # 0.07638
    assert d["significant"] is True  # 0.25 > 2 × 0.0764
    close = difference({"mean": 0.5, "sd": 0.1, "n": 3}, {"mean": 0.6, "sd": 0.1, "n": 3})
    assert close["se"] == pytest.approx(math.sqrt(2 * 0.01 / 3))  # 0.0816: 0.1 < 0.163
    assert close["significant"] is False
    single = difference({"mean": 0.75, "sd": 0.07, "n": 2}, {"mean": 0.74, "sd": math.nan, "n": 1})
    assert single["diff"] == pytest.approx(-0.01)
    assert math.isnan(single["se"]) and single["significant"] is None


def test_aggregate_per_rung_with_failed_trials_reported():
    rows = aggregate(TRIALS, RUNGS)
    assert [r["rung"] for r in rows] == ["bce", "+raf", "+se"]
    bce, raf, se = rows
    assert bce["metrics"]["official/mean_iou"]["mean"] == pytest.approx(0.5)
    assert bce["metrics"]["official/mean_iou"]["sd"] == pytest.approx(0.1)
    assert bce["metrics"]["best_val_mean_iou"]["mean"] == pytest.approx((0.41 + 0.52 + 0.58) / 3)
    relation = bce["metrics"]["official/relation/mean_iou"]
    assert relation["n"] == 2 and relation["mean"] == pytest.approx(0.25)
    assert relation["sd"] == pytest.approx(math.sqrt(0.005))
    assert bce["delta"] is None and bce["failed"] == [] and bce["seeds"] == [0, 1, 2]

    # the failed seed is neither averaged nor dropped
    assert raf["trials"] == 3 and raf["seeds"] == [0, 1]
    assert raf["failed"] == [{"seed": 2, "error": "ValueError: boom"}]
    assert raf["metrics"]["official/mean_iou"]["mean"] == pytest.approx(0.75)
    assert raf["metrics"]["official/mean_iou"]["sd"] == pytest.approx(math.sqrt(0.005))
    assert raf["delta"]["diff"] == pytest.approx(0.25)
    assert raf["delta"]["se"] == pytest.approx(math.sqrt(0.01 / 3 + 0.005 / 2))
    assert raf["delta"]["significant"] is True

    assert se["metrics"]["official/mean_iou"]["n"] == 1
    assert math.isnan(se["metrics"]["official/mean_iou"]["sd"])
    assert se["delta"]["diff"] == pytest.approx(-0.01) and se["delta"]["significant"] is None
    assert best_trial(TRIALS)["run_id"] == "run-+raf-1"  # best validation mean IoU 0.83
    assert best_trial([TRIALS[5]]) is None

    table = markdown_table(rows, TRIALS)
    lines = table.splitlines()
    assert "| `bce` | 3/3 | 50.00 ± 10.00 |  | 25.00 ± 7.07 |" in table  # relation: n = 2
    assert "| `+raf` | 2/3 | 75.00 ± 7.07 | +25.00 ± 7.64 (> 2 SE) |" in table
    assert "| `+se` | 1/1 | 74.00 ± n/a | -1.00 ± n/a |" in table
    raf_row = next(line for line in lines if line.startswith("| `+raf` |"))
    assert raf_row.endswith("| seed 2 |")
    assert "| `+raf/seed2` | failed | – | – | – | 2 | – | ValueError: boom |" in table
    assert "| `bce/seed1` | ok | 50.00 | 52.00 | 4 | 0 | run-bce-1 |  |" in table
    assert "n/a with one seed" in table


def test_markdown_table_leaves_out_a_metric_no_trial_has():
    no_relation = [{**t, "official/relation/mean_iou": math.nan} for t in TRIALS]
    assert "relation mIoU" not in markdown_table(aggregate(no_relation, RUNGS), no_relation)
    assert "relation mIoU" in markdown_table(aggregate(TRIALS, RUNGS), TRIALS)


def test_main_refuses_bad_sweep_arguments_before_starting_anything(capsys):
    from jobs.ablate import build_parser, main

    config = ["--config", "configs/demo.yaml"]
    for argv, message in (
        (["--seeds", "0"], "--seeds"),
        (["--seeds", "1,x"], "--seeds"),
        (["--max-concurrent", "0"], "--max-concurrent"),
        (["--max-failures", "-1"], "--max-failures"),
        (["--steps", "4", "--train-seconds", "9"], "not both"),
    ):
        with pytest.raises(SystemExit, match=message):
            main(config + argv)
    help_text = build_parser().format_help()
    assert "--seeds" in help_text and "--max-concurrent" in help_text and "--max-failures" in help_text


def test_progress_callback_pickles_after_ray_swaps_print(monkeypatch, capsys):
    """Tune pickles its callbacks; Ray's progress bars replace ``builtins.print`` in the driver, and a
    callback holding the builtin then fails with "not the same object as builtins.print"."""
    import builtins
    import inspect
    import types

    from ray import cloudpickle

    from jobs.ablate import _progress_callback, run_ablation, run_trials

    default = inspect.signature(run_trials).parameters["log"].default
    assert inspect.signature(run_ablation).parameters["log"].default is default
    original = builtins.print
    lines: list[str] = []
    monkeypatch.setattr(builtins, "print", lambda *a, **k: lines.append(" ".join(map(str, a))))
    with pytest.raises(Exception, match=r"builtins\.print"):
        cloudpickle.dumps(_progress_callback(RUNGS, 3, 1, original))
    callback = cloudpickle.loads(cloudpickle.dumps(_progress_callback(RUNGS, 3, 1, default)))

    trial = types.SimpleNamespace(config={"rung": 1, "seed": 2}, num_failures=1)
    callback.on_trial_start(0, [], trial)
    assert lines == ["[ablate] +raf/seed2 started (attempt 2)"]


def report(trials: list[dict], *, name: str, overrides: tuple[str, ...] = ("train.steps=4",)) -> dict:
    """An ``ablation.json`` as ``segvlm ablate`` writes it, for the rungs its trials cover."""
    rungs = [r for r in RUNGS if any(t["rung"] == r.name for t in trials)]
    return {
        "name": name,
        "parent_run_id": f"parent-{name}",
        "eval_split": "test",
        "eval_data": "/data/test",
        "overrides": [*overrides, f"workdir=/runs/{name}"],
        "rows": aggregate(trials, rungs),
        "trials": trials,
    }


def test_combine_joins_parts_of_a_ladder_and_computes_differences_across_them():
    from jobs.ablation_report import combine

    first = [t for t in TRIALS if t["rung"] != "+se"]
    second = [t for t in TRIALS if t["rung"] == "+se"]
    joined = combine([("b.json", report(second, name="b")), ("a.json", report(first, name="a"))])
    assert [row["rung"] for row in joined["rows"]] == ["bce", "+raf", "+se"]
    assert [row["description"] for row in joined["rows"]] == ["baseline", "RAF", "SE"]
    whole = aggregate(TRIALS, RUNGS)
    for mine, expected in zip(joined["rows"], whole):
        assert mine["metrics"][DELTA_KEY] == pytest.approx(expected["metrics"][DELTA_KEY], nan_ok=True)
        assert mine["failed"] == expected["failed"]
    # +se (one seed, 0.74) against +raf (0.70, 0.80): the difference spans the two parts
    assert joined["rows"][2]["delta"]["diff"] == pytest.approx(0.74 - 0.75)
    assert len(joined["trials"]) == len(TRIALS) and joined["trials"][0]["source"] == "a.json"
    assert joined["best"] == {"trial": "+raf/seed1", "run_id": "run-+raf-1", "source": "a.json"}
    assert joined["overrides"] == ["train.steps=4"]  # the workdirs differed; nothing else did


def test_combine_refuses_parts_of_different_ladders_and_a_trial_held_twice():
    from jobs.ablation_report import combine

    first = [t for t in TRIALS if t["rung"] == "bce"]
    with pytest.raises(ValueError, match=r"b\.json: overrides differs from a\.json"):
        combine(
            [
                ("a.json", report(first, name="a")),
                ("b.json", report(TRIALS[3:4], name="b", overrides=("train.steps=8",))),
            ]
        )
    with pytest.raises(ValueError, match=r"b\.json: trial bce/seed1 is also in a\.json"):
        combine([("a.json", report(first, name="a")), ("b.json", report(first[1:2], name="b"))])
    with pytest.raises(ValueError, match="no ablation reports"):
        combine([])


def test_main_combine_writes_the_joined_reports(tmp_path, capsys):
    import json

    from jobs.ablate import main
    from jobs.common import to_json

    part_a, part_b = tmp_path / "a", tmp_path / "b.json"
    part_a.mkdir()
    (part_a / "ablation.json").write_text(to_json(report(TRIALS[:5], name="a")))
    part_b.write_text(to_json(report(TRIALS[5:], name="b")))
    assert main(["--combine", str(part_a), str(part_b), "--workdir", str(tmp_path), "--name", "all"]) == 0
    out = tmp_path / "all"
    assert sorted(p.name for p in out.iterdir()) == ["ablation.json", "ablation.md", "ablation.png"]
    written = json.loads((out / "ablation.json").read_text())
    assert [row["rung"] for row in written["rows"]] == ["bce", "+raf", "+se"]
    assert written["rows"][1]["failed"] == [{"seed": 2, "error": "ValueError: boom"}]
    assert "| `+se` | 1/1 | 74.00 ± n/a | -1.00 ± n/a |" in (out / "ablation.md").read_text()
    assert "| `+se` | 1/1 |" in capsys.readouterr().out

    (tmp_path / "broken.json").write_text('{"trials": [')
    assert main(["--combine", str(part_a), str(tmp_path / "broken.json")]) == 2
    assert f"cannot read the report {tmp_path / 'broken.json'}" in capsys.readouterr().err
