"""``segvlm eval`` across datasets: the ``--data`` forms, the protocol a dataset is scored by, the table, and
(slow) one checkpoint evaluated on two shard sets in one Ray session, logged to a real MLflow store."""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from jobs.eval import (
    cross_dataset_table,
    detect_protocol,
    main,
    parse_data,
    report_markdown,
    run_cross_eval,
    table_files,
)
from pipeline.schema import ImageRecord, Task
from pipeline.shards import iter_shard_set, write_shard
from segvlm.masks import encode_rle, rasterize_polygons
from tests.pipeline.test_loader import write_shards
from tests.pipeline.test_loader_rle import write_rle_shards


# ------------------------------------------------------------------------------------------ --data
def test_parse_data_forms_and_errors() -> None:
    assert parse_data(["shards/test"]) == ("shards/test", {})
    assert parse_data(["s3://b/refcoco/split=val"]) == ("s3://b/refcoco/split=val", {})  # '=' in a location
    assert parse_data(["./a=b"]) == ("./a=b", {})
    assert parse_data(["refcoco-val=s3://b/x=1", "gref_val=/data/g"]) == (
        None,
        {"refcoco-val": "s3://b/x=1", "gref_val": "/data/g"},
    )
    for values, message in [
        (["refcoco+=x"], "not a safe name"),  # MLflow metric names refuse '+'
        (["-a=x"], "not a safe name"),
        (["a=x", "a=y"], "given twice"),
        (["a="], "no location"),
        (["a=x", "shards/test"], "one bare location"),
        (["x", "y"], "one bare location"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_data(values)


def test_main_refuses_bad_dataset_names_before_starting_anything(tmp_path: Path, capsys) -> None:
    (tmp_path / "ckpt").mkdir()
    base = ["--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out")]
    assert main([*base, "--data", f"refcoco+={tmp_path}"]) == 2
    assert "not a safe name" in capsys.readouterr().out
    assert main([*base, "--data", f"a={tmp_path}", "--data", f"a={tmp_path}"]) == 2
    assert "given twice" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # argparse: not one of the protocols
        main([*base, "--data", str(tmp_path), "--protocol", "coco"])
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ protocol
def test_the_protocol_comes_from_the_shards_dataset(tmp_path: Path) -> None:
    write_rle_shards(tmp_path / "gref", 2)  # source "grefcoco"
    write_shards(tmp_path / "plain", [2], split="val")  # source "test": PhraseCut's protocol
    for source in ("refcoco", "refcoco+", "refcocog"):
        task = Task(task_id="1__0", phrase="the man", polygons=[[[[1.0, 1.0], [5.0, 1.0], [5.0, 5.0]]]])
        record = ImageRecord(source=source, image_id=1, split="val", width=8, height=8, tasks=[task])
        folder = tmp_path / source.replace("+", "plus")
        folder.mkdir()
        write_shard([(record, b"\xff\xd8")], pafs.LocalFileSystem(), str(folder / "val-000000.tar"))
        assert detect_protocol(str(folder), "val") == "refcoco"
    assert detect_protocol(str(tmp_path / "gref"), "val") == "grefcoco"
    assert detect_protocol(str(tmp_path / "plain"), "val") == "phrasecut"
    (tmp_path / "empty").mkdir()
    write_shard([], pafs.LocalFileSystem(), str(tmp_path / "empty" / "val-000000.tar"))
    with pytest.raises(ValueError, match="--protocol"):
        detect_protocol(str(tmp_path / "empty"), "val")


def test_each_dataset_is_read_at_the_one_split_its_folder_holds(tmp_path: Path, capsys) -> None:
    from pipeline.loader import folder_split

    write_shards(tmp_path / "testA", [2, 1], split="testA")  # with sizes.json
    write_shards(tmp_path / "val", [1], split="val")
    (tmp_path / "val" / "sizes.json").unlink()  # then from the folder's listing
    assert folder_split(str(tmp_path / "testA")) == "testA"
    assert folder_split(str(tmp_path / "val")) == "val"
    write_shards(tmp_path / "both", [1], split="val")
    (tmp_path / "both" / "sizes.json").unlink()
    write_shards(tmp_path / "both", [1], split="test")
    (tmp_path / "both" / "sizes.json").unlink()
    with pytest.raises(ValueError, match=r"both holds test, val; give the split"):
        folder_split(str(tmp_path / "both"))
    (tmp_path / "none").mkdir()
    with pytest.raises(ValueError, match="holds no shards"):
        folder_split(str(tmp_path / "none"))
    # the command refuses an ambiguous folder before starting anything
    (tmp_path / "ckpt").mkdir()
    args = ["--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out")]
    assert main([*args, "--data", str(tmp_path / "both")]) == 2
    assert "give the split" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ the table
def test_cross_dataset_table_files() -> None:
    reports = {
        "gref-val": {
            "protocol": "grefcoco",
            "grefcoco/giou": 0.5,
            "grefcoco/ciou": 0.25,
            "grefcoco/n_acc": 1.0,
        }
        | {"grefcoco/t_acc": None, "grefcoco/count": 4.0, "official/mean_iou": 0.125},
        "phrasecut-test": {"protocol": "phrasecut", "official/mean_iou": 0.375, "official/cum_iou": 0.5}
        | {f"official/pr@{t}": 0.0 for t in ("0.5", "0.6", "0.7", "0.8", "0.9")}
        | {"official/count": 8.0},
    }
    table = cross_dataset_table(reports)
    assert table["columns"][:4] == ["dataset", "protocol", "official/mean_iou", "official/cum_iou"]
    assert table["columns"][-5:] == [
        "grefcoco/giou",
        "grefcoco/ciou",
        "grefcoco/n_acc",
        "grefcoco/t_acc",
        "grefcoco/count",
    ]
    gref, phrasecut = table["rows"]
    assert gref == {"dataset": "gref-val", "protocol": "grefcoco"} | {
        k: v for k, v in reports["gref-val"].items() if k.startswith("grefcoco/")
    }
    assert "official/mean_iou" not in gref and phrasecut["official/count"] == 8.0
    files = table_files(table)
    assert json.loads(files["table.json"]) == table
    rows = list(csv.DictReader(io.StringIO(files["table.csv"])))
    assert [r["dataset"] for r in rows] == ["gref-val", "phrasecut-test"]
    assert (
        rows[0]["grefcoco/giou"] == "0.5"
        and rows[0]["grefcoco/t_acc"] == ""
        and rows[0]["official/count"] == ""
    )
    assert float(rows[1]["official/mean_iou"]) == 0.375
    md = files["table.md"].splitlines()
    assert md[0].startswith("| dataset | protocol | official/mean_iou |") and len(md) == 4
    assert md[2].startswith("| gref-val | grefcoco |") and md[2].endswith(
        "| 0.5000 | 0.2500 | 1.0000 | – | 4 |"
    )


def test_report_md_shows_each_phrase_type_and_the_negatives_no_target_accuracy() -> None:
    # a PhraseCut report as report.json holds it (hand-made): two phrase types seen, 4 negatives
    report = {
        "protocol": "phrasecut",
        "official/mean_iou": 0.625,
        "official/count": 2.0,
        "official/name/mean_iou": 0.5,
        "official/name/count": 1.0,
        "official/attribute/mean_iou": None,
        "official/attribute/count": 0.0,
        "official/relation/mean_iou": 0.75,
        "official/relation/count": 1.0,
        "official/verbose/mean_iou": None,
        "official/verbose/count": 0.0,
        "official/negative/count": 4.0,
        "official/negative/empty_rate": 0.75,
        "threshold": 0.3,
    }
    lines = report_markdown(report).splitlines()
    assert lines[:5] == [
        "protocol: **phrasecut**",
        "",
        "**official**",
        "",
        "| subset | mean_iou | count | empty_rate |",
    ]
    assert "| name | 0.5000 | 1 |  |" in lines and "| relation | 0.7500 | 1 |  |" in lines
    assert "| attribute | – | 0 |  |" in lines and "| verbose | – | 0 |  |" in lines
    # the negatives' row: their count and the share predicted empty (no target)
    assert "| negative |  | 4 | 0.7500 |" in lines


# ------------------------------------------------------------------------------------------ end to end
def _as_grefcoco(source: Path, out: Path) -> int:
    """The scene shards rewritten as a gRefCOCO set: every target as COCO RLEs (one per instance, at the
    original size), plus one no-target expression per image. Returns the number of images."""
    samples = []
    for record, jpg in iter_shard_set(source, "test"):
        w, h = int(record.orig_width), int(record.orig_height)
        assert (w, h) == (record.width, record.height)  # scenes are stored at their original size
        tasks = [
            Task(
                task_id=task.task_id,
                phrase=task.phrase,
                polygons=[],
                rles=[encode_rle(rasterize_polygons([instance], w, h)) for instance in task.polygons],
                phrase_structure=task.phrase_structure,
            )
            for task in record.tasks
        ]
        tasks.append(Task(task_id=f"{record.image_id}__none", phrase="the purple star", polygons=[]))
        gref = ImageRecord(
            source="grefcoco",
            image_id=record.image_id,
            split="test",
            width=w,
            height=h,
            orig_width=w,
            orig_height=h,
            tasks=tasks,
        )
        samples.append((gref, jpg))
    out.mkdir(parents=True)
    write_shard(samples, pafs.LocalFileSystem(), str(out / "test-000000.tar"))
    return len(samples)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_one_checkpoint_on_two_datasets_in_one_table_and_one_mlflow_run(ray_local, tmp_path: Path) -> None:
    import torch
    from mlflow import MlflowClient

    from pipeline.prepare import PrepareConfig, run_prepare
    from pipeline.scenes import SCENE_WORDS, write_scenes
    from segvlm.backbone import make_tiny_clip
    from segvlm.checkpoint import save_checkpoint
    from segvlm.registry import build_model
    from segvlm.tokenizer import DEFAULT_TINY_WORDS
    from tests.fixtures_train import IMAGE_SIZE, tiny_experiment

    started = time.perf_counter()
    write_scenes(
        tmp_path / "scenes", n_images=12, seed=3, size=IMAGE_SIZE, splits={"train": 0.5, "test": 0.5}
    )
    config = PrepareConfig(
        source="scenes",
        root=str(tmp_path / "scenes"),
        split="test",
        out=str(tmp_path / "scenes-test"),
        shard_samples=4,
        seed=0,
        progress_every=60.0,
    )
    run_prepare(config, log=lambda _: None)
    images = _as_grefcoco(tmp_path / "scenes-test", tmp_path / "gref-test")
    clip = make_tiny_clip(tmp_path / "clip", words=sorted(set(SCENE_WORDS) | set(DEFAULT_TINY_WORDS)))
    torch.manual_seed(0)
    model_cfg = tiny_experiment(tmp_path, clip, tmp_path / "work").model
    save_checkpoint(build_model(model_cfg), model_cfg, tmp_path / "ckpt", extra={"threshold": 0.5})

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "out"
    table = run_cross_eval(
        str(tmp_path / "ckpt"),
        {"scenes-test": str(tmp_path / "scenes-test"), "gref-test": str(tmp_path / "gref-test")},
        out=str(out),
        split=None,  # each dataset at the one split its folder holds
        official_dir=str(tmp_path / "pngs"),
        num_workers=2,
        batch_size=4,
        tracking_uri=uri,
        experiment="cross-eval",
    )
    elapsed = time.perf_counter() - started

    # the table: one row per dataset, each equal to that dataset's own report
    assert json.loads((out / "table.json").read_text()) == table
    reports = {
        name: json.loads((out / name / "report.json").read_text()) for name in ("scenes-test", "gref-test")
    }
    assert [(r["dataset"], r["protocol"]) for r in table["rows"]] == [
        ("scenes-test", "phrasecut"),
        ("gref-test", "grefcoco"),
    ]
    csv_rows = list(csv.DictReader(io.StringIO((out / "table.csv").read_text())))
    for row, csv_row in zip(table["rows"], csv_rows):
        report = reports[row["dataset"]]
        assert report["protocol"] == row["protocol"]
        metrics = [k for k in row if k not in ("dataset", "protocol")]
        assert metrics and metrics[-1].endswith("/count")
        for key in metrics:
            assert row[key] == report[key], key
            assert (csv_row[key] == "") if report[key] is None else float(csv_row[key]) == report[key], key
    assert (out / "table.md").read_text().count("\n") == 4
    assert (out / "gref-test" / "report.md").read_text().startswith("protocol: **grefcoco**\n\n**grefcoco**")
    assert {p.name for p in (tmp_path / "pngs").iterdir()} == {"scenes-test", "gref-test"}

    # the same predictions, the same ground truth (RLEs of the polygons): RefCOCO's numbers agree
    scenes, gref = reports["scenes-test"], reports["gref-test"]
    for key in ("refcoco/overall_iou", "refcoco/mean_iou", "refcoco/pr@0.5", "refcoco/count"):
        assert gref[key] == pytest.approx(scenes[key], rel=1e-12), key
    assert gref["grefcoco/no_target_count"] == images == gref["refcoco/no_target_count"]
    assert gref["grefcoco/count"] == scenes["refcoco/count"] + images
    assert scenes["grefcoco/no_target_count"] == 0

    # MLflow: one run, every metric as <name>/<metric>, the table files and MLflow's table
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("cross-eval").experiment_id])
    logged = run.data.metrics
    assert logged["scenes-test/official/mean_iou"] == pytest.approx(scenes["official/mean_iou"])
    assert logged["gref-test/grefcoco/giou"] == pytest.approx(gref["grefcoco/giou"])
    assert logged["gref-test/refcoco/pr_at_0.5"] == pytest.approx(gref["refcoco/pr@0.5"])
    assert run.data.params["eval/gref-test/protocol"] == "grefcoco"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "eval")}
    assert {
        "eval/table.json",
        "eval/table.md",
        "eval/table.csv",
        "eval/scenes-test",
        "eval/gref-test",
    } <= artifacts
    assert "eval_table.json" in {a.path for a in client.list_artifacts(run.info.run_id)}
    logged_table = json.loads(
        Path(client.download_artifacts(run.info.run_id, "eval_table.json", str(tmp_path))).read_text()
    )
    assert logged_table["columns"] == table["columns"] and len(logged_table["data"]) == 2
    assert elapsed < 120, f"took {elapsed:.0f} s"
