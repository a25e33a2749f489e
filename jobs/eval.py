"""``segvlm eval``: distributed evaluation of a checkpoint on one or several shard sets, with every protocol.

Launch::

    segvlm eval --checkpoint runs/demo/<run>/best --data runs/demo/shards/test --out runs/demo/eval
    segvlm eval --checkpoint s3://bucket/runs/<run>/best --data s3://bucket/phrasecut/test \\
        --out s3://bucket/runs/<run>/eval-test --official-dir s3://bucket/runs/<run>/preds --num-workers 4 \\
        --ray-address auto --tracking-uri http://127.0.0.1:5000
    segvlm eval --checkpoint C --split val --data refcoco-val=shards/refcoco/val \\
        --data grefcoco-val=shards/grefcoco/val --out runs/eval-cross

Each Ray Train worker scores its share of the tasks (every task exactly once across workers); the metric sums
are merged with one all-reduce and rank 0 returns the report to the driver through Ray, which writes
``report.json``, ``report.md`` and ``pr_curve.json`` to ``--out``. With ``--official-dir`` every worker also
writes ``{task_id}.png`` (binary, original image size), the layout the PhraseCut evaluator reads;
``segvlm.metrics`` recomputes the report from those PNGs in the tests. Every location (checkpoint, data,
out, official dir) is a local folder or a URI (``s3://...``): no disk shared between nodes is assumed.

Every report holds every protocol's metrics and names the one its dataset is published under
(``"protocol"``: ``phrasecut``, ``refcoco`` or ``grefcoco``; ``--protocol auto`` reads it from the shards'
``ImageRecord.source``); ``report.md`` shows that protocol first.

Several datasets (``--data NAME=LOCATION``, repeated) are evaluated in one Ray session by one set of workers
(the checkpoint is loaded once): each gets its report under ``OUT/NAME/``, and ``OUT/table.json``,
``table.md`` and ``table.csv`` hold one row per dataset with its protocol's headline metrics. MLflow gets one
run with the metrics as ``NAME/<metric>`` and the table.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import io
import json
import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jobs.common import TRAIN_LOG_LEVEL, init_ray, to_json
from jobs.environment import quiet_environment

if TYPE_CHECKING:
    from jobs.tracking import TrackingLogger


def eval_loop_per_worker(config: dict[str, Any]) -> list[dict[str, Any]] | None:
    """One Train worker: load the checkpoint once, then score its share of every dataset of
    ``config["datasets"]`` in turn (one all-reduce each); rank 0 returns one payload per dataset."""
    import ray.train
    import torch

    from jobs import distributed
    from jobs.common import quiet_train_worker
    from jobs.evaluation import evaluate
    from pipeline import storage
    from pipeline.loader import make_eval_loader
    from segvlm.checkpoint import load_checkpoint
    from segvlm.inference import checkpoint_threshold

    quiet_train_worker()
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(config["threads"])
    device = distributed.worker_device(config["use_gpu"])
    with storage.local_copy(config["checkpoint"], prefix="segvlm-eval-ckpt-") as folder:
        model, model_cfg, meta = load_checkpoint(folder)
    threshold = config["threshold"] if config["threshold"] is not None else checkpoint_threshold(meta)
    model.to(device)
    autocast = functools.partial(distributed.autocast, "auto", device)  # bf16 on GPU, float32 on CPU
    payloads = []
    for dataset in config["datasets"]:
        loader = make_eval_loader(
            dataset["data"],
            split=dataset["split"],
            batch_size=config["batch_size"],
            image_size=model_cfg.backbone.image_size,
            tokenizer=model.backbone.tokenize,
            rank=rank,
            world_size=world,
            num_workers=0,
            pin_memory=device.type == "cuda",
        )
        start = time.perf_counter()
        result = evaluate(
            model,
            loader,
            device=device,
            autocast=autocast,
            threshold=threshold,
            official_dir=dataset["official_dir"],
        )
        summary = result.all_reduce(device).compute()
        summary["threshold"] = threshold
        summary["seconds"] = time.perf_counter() - start
        ray.train.report({"tasks": summary.get("official/count", 0.0)})
        # the reports go back to the driver as rank 0's return value (Result.return_value): no file of this
        # node's disk is read by anyone else
        curve = {k: [float(x) for x in v] for k, v in result.metrics.clipseg.pr_curve().items()}
        payloads.append({"summary": summary, "pr_curve": curve})
    return payloads if rank == 0 else None


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


def detect_protocol(data: str, split: str) -> str:
    """The protocol of the dataset in the shards at ``data``: from the ``source`` of the split's first record
    (a shard set holds one dataset: ``segvlm prepare`` writes one source)."""
    from pipeline import storage
    from pipeline.loader import list_shards
    from pipeline.shards import iter_shard
    from segvlm.metrics import protocol_for_source

    urls, _ = list_shards(data, split)
    for url in urls:
        with contextlib.closing(iter_shard(*storage.resolve(url))) as samples:
            first = next(samples, None)
        if first is not None:
            return protocol_for_source(first[0].source)
    raise ValueError(f"{data}: no {split!r} sample to tell the dataset by; pass --protocol")


def _resolve_protocol(protocol: str, data: str, split: str) -> str:
    from segvlm.metrics import PROTOCOLS

    if protocol == "auto":
        return detect_protocol(data, split)
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be auto or one of {PROTOCOLS}, got {protocol!r}")
    return protocol


def _evaluate_on_ray(
    checkpoint: str,
    datasets: Sequence[Mapping[str, Any]],
    *,
    num_workers: int,
    batch_size: int,
    use_gpu: bool,
    ray_address: str | None,
    threshold: float | None,
) -> list[dict[str, Any]]:
    """One Ray Train run scoring ``checkpoint`` on every dataset (``{"data", "split", "official_dir"}``,
    absolute locations); returns rank 0's payloads (``summary``, ``pr_curve``), one per dataset, in order."""
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
            "datasets": [dict(d) for d in datasets],
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
    payloads = result.return_value
    if not payloads or len(payloads) != len(datasets):
        raise RuntimeError("segvlm eval: rank 0 returned no report")
    return payloads


def report_markdown(report: Mapping[str, Any]) -> str:
    """``report.md``: the protocol named first, then every metric table, that protocol's on top."""
    from segvlm.metrics import format_markdown_table, lead_with_protocol

    protocol = report.get("protocol", "phrasecut")
    metrics = {k: v for k, v in report.items() if k != "protocol"}
    return f"protocol: **{protocol}**\n\n" + format_markdown_table(lead_with_protocol(metrics, protocol))


def _report_files(payload: Mapping[str, Any], protocol: str) -> tuple[dict[str, Any], dict[str, str]]:
    """The report (what report.json holds: undefined metrics, NaN, as None) and the files of one dataset."""
    report = json.loads(to_json({"protocol": protocol, **payload["summary"]}))
    files = {
        "report.json": to_json(report, indent=2, sort_keys=True),
        "report.md": report_markdown(report),
        "pr_curve.json": json.dumps(payload["pr_curve"]),
    }
    return report, files


def _metric_values(report: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of a report, without its protocol name (None, an undefined metric, the logger skips)."""
    return {k: v for k, v in report.items() if k != "protocol"}


def _check_outputs(checkpoint: str, *locations: str | None) -> None:
    for location in locations:
        if location and _inside(location, checkpoint):
            raise ValueError(
                f"{location}: an evaluation output may not lie inside the checkpoint {checkpoint}"
            )


def _tracking_logger(
    tracking_uri: str, experiment: str, out: str, run_id: str | None, checkpoint: str
) -> TrackingLogger:
    from jobs.tracking import RunLogger
    from pipeline import storage

    return RunLogger(
        enabled=True,
        tracking_uri=tracking_uri,
        experiment=experiment,
        # a new experiment of a local sqlite store keeps its artifacts under workdir: not in tmp
        workdir=str(Path("runs").resolve()) if storage.is_uri(out) else out,
        run_id=run_id,
        run_name=None if run_id else f"eval-{storage.name(checkpoint)}",
    )


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
    protocol: str = "auto",
) -> dict[str, Any]:
    """Evaluate ``checkpoint`` on the shards at ``data`` and return the report (also written to ``out``).

    ``checkpoint``, ``data``, ``out`` and ``official_dir`` are local folders or URIs (``s3://...``). Each
    worker downloads a URI checkpoint into a temporary folder of its own; the report reaches this process
    through Ray and is written to ``out`` from here. ``out`` must not lie inside ``checkpoint``.

    Masks are ``probability > threshold``; ``None`` takes the checkpoint's (chosen on validation during
    training, 0.5 for a checkpoint without one). The report states it as ``threshold``, and the protocol
    (``auto``: from the dataset, see ``detect_protocol``) as ``protocol``.
    """
    from pipeline import storage
    from segvlm.inference import check_threshold

    if threshold is not None:
        threshold = check_threshold(threshold)
    checkpoint, data, out = (_absolute(x) for x in (checkpoint, data, out))
    official_dir = _absolute(official_dir) if official_dir else None
    _check_outputs(checkpoint, out, official_dir)
    protocol = _resolve_protocol(protocol, data, split)
    (payload,) = _evaluate_on_ray(
        checkpoint,
        [{"data": data, "split": split, "official_dir": official_dir}],
        num_workers=num_workers,
        batch_size=batch_size,
        use_gpu=use_gpu,
        ray_address=ray_address,
        threshold=threshold,
    )
    report, files = _report_files(payload, protocol)
    for filename, text in files.items():
        storage.write_bytes(storage.join(out, filename), text.encode())
    if tracking_uri is not None:
        with tempfile.TemporaryDirectory(prefix="segvlm-eval-report-") as tmp:
            for filename, text in files.items():
                Path(tmp, filename).write_text(text)
            with _tracking_logger(tracking_uri, experiment, out, run_id, checkpoint) as logger:
                logger.log_metrics({f"{split}/{k}": v for k, v in _metric_values(report).items()}, step=0)
                logger.log_artifacts(tmp, f"eval_{split}")
    return report


# ------------------------------------------------------------------------------------ several datasets
def dataset_name_error(name: str) -> str | None:
    """Why ``name`` cannot name a dataset: it becomes a folder of ``--out`` and an MLflow metric prefix, so
    it must be one safe file name (``[A-Za-z0-9][A-Za-z0-9_-]*``: MLflow keys refuse ``+``)."""
    from pipeline.validate import id_error

    return id_error(name, "dataset name")


def parse_data(values: Sequence[str]) -> tuple[str | None, dict[str, str]]:
    """``--data`` values -> ``(bare location or None, {name: location})``; raises ValueError.

    ``NAME=LOCATION`` names a dataset when the text before the first ``=`` holds no ``/`` or ``:`` (a
    location may contain ``=``: ``s3://b/split=val``, ``./a=b``). One bare location, or only named ones.
    """
    bare: list[str] = []
    named: dict[str, str] = {}
    for value in values:
        head, sep, location = value.partition("=")
        if not sep or "/" in head or ":" in head:
            bare.append(value)
            continue
        if (error := dataset_name_error(head)) is not None:
            raise ValueError(f"--data {value}: {error}")
        if not location:
            raise ValueError(f"--data {value}: no location after {head}=")
        if head in named:
            raise ValueError(f"--data: dataset name {head!r} given twice")
        named[head] = location
    if bare and (named or len(bare) > 1):
        raise ValueError("--data: give one bare location, or NAME=LOCATION for each dataset")
    return (bare[0] if bare else None), named


def cross_dataset_table(reports: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Datasets × metrics: ``{"columns": [...], "rows": [...]}``, a row per dataset (in order) with its
    ``dataset`` name, ``protocol`` and that protocol's headline metrics (``segvlm.metrics.HEADLINE_METRICS``,
    ending with its count) as in its report; the columns are ``dataset``, ``protocol`` and the union of the
    rows' headline metrics, by protocol."""
    from segvlm.metrics import HEADLINE_METRICS, PROTOCOLS

    used = {report["protocol"] for report in reports.values()}
    columns = ["dataset", "protocol"] + [m for p in PROTOCOLS if p in used for m in HEADLINE_METRICS[p]]
    rows = [
        {"dataset": name, "protocol": report["protocol"]}
        | {m: report.get(m) for m in HEADLINE_METRICS[report["protocol"]]}
        for name, report in reports.items()
    ]
    return {"columns": columns, "rows": rows}


def table_files(table: Mapping[str, Any]) -> dict[str, str]:
    """``table.json``, ``table.md`` and ``table.csv`` of a ``cross_dataset_table`` (a metric another
    protocol reports is an empty cell; an undefined one is null / "–" / empty)."""
    from segvlm.metrics import format_dataset_table

    columns, rows = table["columns"], table["rows"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow(["" if row.get(c) is None else row[c] for c in columns])
    return {
        "table.json": to_json(table, indent=2),
        "table.md": format_dataset_table(rows, columns),
        "table.csv": buffer.getvalue(),
    }


def run_cross_eval(
    checkpoint: str,
    datasets: Mapping[str, str],
    *,
    out: str,
    split: str | None = None,
    official_dir: str | None = None,
    num_workers: int = 1,
    batch_size: int = 16,
    use_gpu: bool = False,
    ray_address: str | None = None,
    tracking_uri: str | None = None,
    experiment: str = "segvlm",
    run_id: str | None = None,
    threshold: float | None = None,
    protocol: str = "auto",
) -> dict[str, Any]:
    """Evaluate ``checkpoint`` on every ``{name: shard location}`` of ``datasets`` in one Ray Train run;
    returns the ``cross_dataset_table``. Each dataset is read at ``split``, or, when it is None, at the one
    split its folder holds (``pipeline.loader.folder_split``: RefCOCO's testA beside RefCOCOg's val).

    Writes ``out/<name>/`` (``report.json``, ``report.md``, ``pr_curve.json``) per dataset, then
    ``out/table.json``, ``table.md`` and ``table.csv``; PNGs go to ``official_dir/<name>/``. ``protocol``
    applies to every dataset (``auto``: each its own). With ``tracking_uri``: one MLflow run with the metrics
    as ``<name>/<metric>``, the files as artifacts under ``eval/`` and the table through ``log_table``.
    """
    from pipeline import storage
    from pipeline.loader import folder_split
    from segvlm.inference import check_threshold

    if not datasets:
        raise ValueError("no dataset to evaluate")
    for name in datasets:
        if (error := dataset_name_error(name)) is not None:
            raise ValueError(error)
    if threshold is not None:
        threshold = check_threshold(threshold)
    checkpoint, out = _absolute(checkpoint), _absolute(out)
    official_dir = _absolute(official_dir) if official_dir else None
    _check_outputs(checkpoint, out, official_dir)
    locations = {name: _absolute(data) for name, data in datasets.items()}
    splits = {name: split or folder_split(data) for name, data in locations.items()}
    protocols = {name: _resolve_protocol(protocol, data, splits[name]) for name, data in locations.items()}
    payloads = _evaluate_on_ray(
        checkpoint,
        [
            {
                "data": data,
                "split": splits[name],
                "official_dir": storage.join(official_dir, name) if official_dir else None,
            }
            for name, data in locations.items()
        ],
        num_workers=num_workers,
        batch_size=batch_size,
        use_gpu=use_gpu,
        ray_address=ray_address,
        threshold=threshold,
    )
    reports: dict[str, dict[str, Any]] = {}
    files: dict[str, str] = {}  # relative path -> text
    for name, payload in zip(locations, payloads):
        reports[name], own = _report_files(payload, protocols[name])
        files |= {f"{name}/{filename}": text for filename, text in own.items()}
    table = cross_dataset_table(reports)
    files |= table_files(table)  # last: a table present means every report beside it is complete
    for relative, text in files.items():
        storage.write_bytes(storage.join(out, *relative.split("/")), text.encode())
    if tracking_uri is not None:
        with tempfile.TemporaryDirectory(prefix="segvlm-eval-table-") as tmp:
            for relative, text in files.items():
                Path(tmp, relative).parent.mkdir(parents=True, exist_ok=True)
                Path(tmp, relative).write_text(text)
            with _tracking_logger(tracking_uri, experiment, out, run_id, checkpoint) as logger:
                logger.log_params(
                    {f"eval/{name}/data": data for name, data in locations.items()}
                    | {f"eval/{name}/split": s for name, s in splits.items()}
                    | {f"eval/{name}/protocol": p for name, p in protocols.items()}
                    | {"eval/checkpoint": checkpoint}
                )
                logger.log_metrics(
                    {
                        f"{name}/{k}": v
                        for name, report in reports.items()
                        for k, v in _metric_values(report).items()
                    },
                    step=0,
                )
                logger.log_artifacts(tmp, "eval")
                columns = table["columns"]
                logger.log_table(
                    {c: [row.get(c) for row in table["rows"]] for c in columns}, "eval_table.json"
                )
    return table


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
    parser.add_argument(
        "--data",
        required=True,
        action="append",
        help="shard folder or URI written by `segvlm prepare`; or NAME=LOCATION, repeated, to evaluate "
        "several datasets into one table (NAME: letters, digits, _ and -; it names OUT/NAME/)",
    )
    parser.add_argument(
        "--split",
        default=None,
        help="the split to read (default: the one split each --data folder holds, e.g. testA)",
    )
    parser.add_argument(
        "--protocol",
        default="auto",
        choices=("auto", "phrasecut", "refcoco", "grefcoco"),
        help="the protocol a report leads with (default auto: from the shards' dataset; refcoco for "
        "RefCOCO/+/g, grefcoco for gRefCOCO, else phrasecut)",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="where report.json, report.md and pr_curve.json go (several datasets: OUT/NAME/ each, and "
        "table.json, table.md, table.csv) (default: beside the checkpoint, "
        "<checkpoint parent>/eval-<checkpoint name>-<split, or 'datasets'>; never inside the checkpoint)",
    )
    parser.add_argument(
        "--official-dir", default=None, help="also write {task_id}.png per task here (several: DIR/NAME/)"
    )
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


def _split_of(args: argparse.Namespace) -> str | None:
    """``--split``; for one bare ``--data`` folder without it, the one split the folder holds; for named
    datasets without it, None (each its own). Raises ValueError when a folder holds several."""
    bare, _ = parse_data(args.data)
    if args.split is not None or bare is None:
        return args.split
    from pipeline.loader import folder_split

    return folder_split(bare)


def argument_error(args: argparse.Namespace) -> str | None:
    """What is wrong with the arguments, checked before Ray starts; None when nothing is."""
    from pipeline import storage

    try:
        if not storage.is_dir(args.checkpoint):
            return f"checkpoint not found: {args.checkpoint}"
    except storage.StorageError as err:
        return f"--checkpoint {err}"
    try:
        parse_data(args.data)
    except ValueError as err:
        return str(err)
    if args.threshold is not None:
        from segvlm.inference import check_threshold

        try:
            check_threshold(args.threshold)
        except ValueError as err:
            return f"--{err}"
    if args.out and _inside(_absolute(args.out), _absolute(args.checkpoint)):
        return f"--out {args.out} lies inside the checkpoint {args.checkpoint}; pick another folder"
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if (error := argument_error(args)) is not None:
        print(f"segvlm eval: {error}")
        return 2
    try:
        split = _split_of(args)  # lists a bare --data folder once, before Ray starts
    except ValueError as err:
        print(f"segvlm eval: {err}")
        return 2
    out = args.out or default_out(_absolute(args.checkpoint), split or "datasets")
    from pipeline import storage

    bare, named = parse_data(args.data)
    options = {
        "out": out,
        "split": split,
        "official_dir": args.official_dir,
        "num_workers": args.num_workers,
        "batch_size": args.batch_size,
        "use_gpu": args.gpu,
        "ray_address": args.ray_address,
        "tracking_uri": args.tracking_uri,
        "run_id": args.run_id,
        "threshold": args.threshold,
        "protocol": args.protocol,
    }
    if bare is None:
        table = run_cross_eval(args.checkpoint, named, **options)
        print(table_files(table)["table.md"])
        print(f"\ntable: {storage.join(out, 'table.md')}")
        return 0
    report = run_eval(args.checkpoint, bare, **options)
    print(report_markdown(report))
    print(f"\nreport: {storage.join(out, 'report.json')}")
    return 0
