"""Evaluation shared by validation during training and ``segvlm eval``.

``evaluate`` runs a model over an evaluation loader (every task once across ranks), accumulates the sums of
every PhraseCut metric and, optionally, writes one binary PNG per task at the original image size (the layout
the PhraseCut evaluator reads) and collects overlays. It does no collective operation inside the loop, since
ranks may hold different numbers of batches; ``EvalResult.all_reduce`` merges the sums afterwards.
"""

from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import torch
from PIL import Image

from jobs import distributed
from pipeline.validate import safe_child
from segvlm.atomic import write_atomic
from segvlm.inference import overlay, probabilities_to_size
from segvlm.masks import decode_rles, polygons_at_original_size, rasterize_polygons
from segvlm.metrics import EvalMetrics
from segvlm.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, original_size_mask


@dataclasses.dataclass
class EvalResult:
    metrics: EvalMetrics
    overlays: list[tuple[str, Image.Image]]  # (task_id, picture)

    def all_reduce(self, device: torch.device | str = "cpu") -> EvalMetrics:
        """Sum the metric state over all ranks (one all-reduce of a float64 vector on ``device``, the
        worker's device: an NCCL group serves CUDA tensors only) and return the merged metrics."""
        if distributed.world_size() > 1:
            vector = torch.from_numpy(self.metrics.to_vector()).to(device)
            distributed.all_reduce(vector)
            self.metrics.from_vector(vector)
        return self.metrics


def _denormalize(pixels: torch.Tensor) -> Image.Image:
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(3, 1, 1)
    array = ((pixels.float().cpu() * std + mean).clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
    return Image.fromarray(array)


def comparison_picture(image: Image.Image, gt: np.ndarray, pred: np.ndarray, phrase: str) -> Image.Image:
    """Ground truth and prediction overlays side by side, each captioned."""
    left = overlay(image, gt, f"GT: {phrase}")
    right = overlay(image, pred, f"pred: {phrase}")
    canvas = Image.new("RGB", (left.width + right.width + 4, max(left.height, right.height)), "white")
    canvas.paste(left, (0, 0))
    canvas.paste(right, (left.width + 4, 0))
    return canvas


def write_png_atomic(mask: np.ndarray, path: Path) -> None:
    write_atomic(
        path, lambda tmp: Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(tmp, format="PNG")
    )


class PngWriter:
    """Writes ``{task_id}.png`` (binary, 0/255) into a local folder or a URI folder (``s3://...``).

    Local files go through a temp name and a rename. On an object store one PUT is already atomic (the
    object appears whole or not at all), and a rename would cost a copy and a delete per mask.
    """

    def __init__(self, location: str | Path) -> None:
        from pipeline import storage

        self.location = os.fspath(location)
        self.filesystem, self.base = storage.resolve(self.location)
        self.local = isinstance(self.filesystem, pafs.LocalFileSystem)
        self.filesystem.create_dir(self.base, recursive=True)

    def write(self, task_id: str, mask: np.ndarray) -> None:
        # the id names the file: it must stay one plain name inside the folder (raises otherwise)
        path = safe_child(self.base if self.local else "/", f"{task_id}.png")
        if self.local:
            write_png_atomic(mask, path)
            return
        buffer = io.BytesIO()
        Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(buffer, format="PNG")
        with self.filesystem.open_output_stream(f"{self.base}/{path.name}") as stream:
            stream.write(buffer.getvalue())


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    loader: Iterable[dict[str, Any]],
    *,
    device: torch.device | str = "cpu",
    autocast: Callable[[], AbstractContextManager] = nullcontext,
    threshold: float = 0.5,
    overlays: int = 0,
    max_tasks: int = 0,
    official_dir: str | Path | None = None,
) -> EvalResult:
    """Score every task the loader yields.

    Official metrics and boundary F use the probabilities resized to the original image size and thresholded
    at ``threshold`` (``calibration/*`` scores the same probabilities at other thresholds); the CLIPSeg
    protocol uses the probabilities at the model's resolution. The ground truth is the union of a task's
    polygons and RLEs at the original size. Every protocol is accumulated (``official/*``, ``clipseg/*``,
    ``boundary/*``, ``calibration/*``, ``refcoco/*``, ``grefcoco/*``); a report picks the one its dataset is
    published under. Tasks without a target are counted apart by PhraseCut's protocol
    (``official/negative/*``: PhraseCut has none, and its IoU would score each 0 whatever the prediction);
    a dataset's own no-target expressions (gRefCOCO: no target, kind other than ``negative``) are scored by
    the gRefCOCO protocol, our synthetic negatives (kind ``negative``) are not
    (``EvalMetrics.update_no_target``).
    """
    device = torch.device(device)
    result = EvalResult(metrics=EvalMetrics(), overlays=[])
    pngs = PngWriter(official_dir) if official_dir else None
    was_training = model.training
    model.eval()
    seen = 0
    for batch in loader:
        with autocast():
            logits = model(
                distributed.to_device(batch["pixel_values"], device),
                distributed.to_device(batch["input_ids"], device),
                distributed.to_device(batch["attention_mask"], device),
            )
        logits = logits.float().cpu()  # B×1×S×S
        probabilities = torch.sigmoid(logits)[:, 0]
        model_masks = batch["masks"][:, 0] > 0.5
        for i, task_id in enumerate(batch["task_id"]):
            height, width = int(batch["orig_height"][i]), int(batch["orig_width"][i])
            prob_full = probabilities_to_size(logits[i, 0], height, width)
            pred = (prob_full > threshold).numpy()
            if pngs is not None:
                pngs.write(task_id, pred)
            # the ground truth at the original size: the polygons (already in original-image pixels)
            # rasterised there ∪ the RLEs (stored at that size)
            gt = original_size_mask(
                batch["polygons"][i], width, height, width, height, rles=batch["rles"][i]
            ).astype(bool)
            negative = batch["kind"][i] == "negative"
            if negative or int(batch["num_instances"][i]) == 0:
                # no target: kept apart by PhraseCut's protocol, scored by gRefCOCO's unless synthetic
                result.metrics.update_no_target(pred, gt, synthetic=negative)
                continue
            result.metrics.update(
                pred,
                gt,
                phrase_type=batch["phrase_type"][i],
                num_instances=int(batch["num_instances"][i]),
                negative=False,
                prob=probabilities[i],
                prob_gt=model_masks[i],
                prob_full=prob_full,
            )
            if len(result.overlays) < overlays:
                image = _denormalize(batch["pixel_values"][i]).resize((width, height))
                result.overlays.append((task_id, comparison_picture(image, gt, pred, batch["phrase"][i])))
            seen += 1
        if max_tasks and seen >= max_tasks:
            break
    model.train(was_training)
    return result


def log_evaluation(
    logger: Any, result: EvalResult, summary: dict[str, float], *, step: int, prefix: str
) -> None:
    """Rank 0: every metric (``{prefix}/official/mean_iou`` …), overlays with a step slider, PR figure."""
    if not logger.enabled:
        return
    logger.log_metrics({f"{prefix}/{k}": v for k, v in summary.items()}, step=step)
    for index, (_task_id, picture) in enumerate(result.overlays):
        logger.log_image(picture, key=f"{prefix}_overlay_{index}", step=step)
    logger.log_figure(pr_figure(result.metrics), f"{prefix}/pr_curve_step{step:07d}.png")
    logger.log_dict(summary, f"{prefix}/report_step{step:07d}.json")


def pr_figure(metrics: EvalMetrics) -> Any:
    """The pixel precision-recall curve of the CLIPSeg protocol (49 thresholds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = metrics.clipseg.pr_curve()
    precision, recall = curve["precision"], curve["recall"]
    figure, axis = plt.subplots(figsize=(4, 4))
    axis.plot(recall, precision, marker=".")
    axis.set_xlabel("recall")
    axis.set_ylabel("precision")
    axis.set_xlim(0, 1)
    axis.set_ylim(0, 1)
    axis.set_title("pixel precision-recall (CLIPSeg protocol)")
    figure.tight_layout()
    plt.close(figure)
    return figure


def score_official_pngs(
    pred_dir: str | Path, shards: str | Path, *, split: str | None = None
) -> dict[str, float]:
    """Recompute the official metrics from ``{task_id}.png`` files, as the PhraseCut evaluator does.

    The evaluator's recipe: read each prediction PNG (non-zero = foreground) at the original image size,
    rasterise the task's polygons at that size (``segvlm.masks``) and add its RLEs, accumulate I and U per
    task. Tasks without a PNG count as empty predictions; tasks without a target are kept apart, as
    ``evaluate`` does. Used by the tests to prove ``report.json`` equals it.
    """
    from pipeline.shards import iter_shard_set
    from segvlm.metrics import PhraseCutMetrics

    metrics = PhraseCutMetrics()
    for record, _ in iter_shard_set(shards, split):
        width, height = int(record.orig_width), int(record.orig_height)
        for task in record.tasks:
            png = safe_child(pred_dir, f"{task.task_id}.png")
            if png.exists():
                with Image.open(png) as picture:
                    pred = np.asarray(picture.convert("L")) > 0
            else:
                pred = np.zeros((height, width), dtype=bool)
            polygons = polygons_at_original_size(
                task.polygons or [], record.width, record.height, width, height
            )
            gt = rasterize_polygons(polygons, width, height) | decode_rles(task.rles, height, width)
            negative = task.kind == "negative" or not task.has_target
            metrics.update(
                pred,
                gt,
                phrase_type=None if negative else task.phrase_type,
                num_instances=0 if negative else task.num_instances,
                negative=negative,
            )
    return metrics.compute()


def validate(
    model: torch.nn.Module,
    cfg: Any,
    logger: Any,
    *,
    step: int,
    device: torch.device,
    rank: int,
    world_size: int,
) -> dict[str, float]:
    """The validation of a training run at ``step``: every rank scores its share of ``cfg.data.val_shards``
    (an ``ExperimentConfig``), the sums are all-reduced, rank 0 logs and prints; returns the summary."""
    from pipeline.loader import make_eval_loader

    loader = make_eval_loader(
        cfg.data.val_shards,
        split=cfg.data.val_split,
        batch_size=cfg.train.micro_batch,
        image_size=cfg.model.backbone.image_size,
        tokenizer=model.backbone.tokenize,
        rank=rank,
        world_size=world_size,
        num_workers=0,
        pin_memory=device.type == "cuda",
    )
    result = evaluate(
        model,
        loader,
        device=device,
        autocast=lambda: distributed.autocast(cfg.train.precision, device),
        overlays=cfg.train.overlays if rank == 0 else 0,
        max_tasks=cfg.train.val_max_tasks,
    )
    summary = result.all_reduce(device).compute()
    log_evaluation(logger, result, summary, step=step, prefix="val")
    if rank == 0:
        print(
            f"[segvlm] step {step} validation: mean IoU {summary['official/mean_iou']:.4f} "
            f"cum IoU {summary['official/cum_iou']:.4f} ({int(summary['official/count'])} tasks); "
            f"best threshold {summary['calibration/threshold']:g} "
            f"(mean IoU {summary['calibration/mean_iou']:.4f})",
            flush=True,
        )
    return summary
