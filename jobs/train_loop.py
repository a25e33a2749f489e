"""The Ray Train worker loop: one function every worker runs (``train_loop_per_worker``).

Each worker builds SegVLM from the registry, wraps it for DDP, reads its share of the shards through the
training loader (same number of batches on every rank), and trains with the RAF loss. Rank 0 logs to MLflow
through ``RunLogger`` (via the driver's tracking relay actor when ``run_training`` started one); every other
rank gets a disabled logger. Checkpoints hold our model checkpoint (``model/``) plus the optimizer state, the
step and the MLflow run id (``train_state.pt``), so a run resumed by ``FailureConfig`` or by rerunning the
driver continues the same step count, schedule and MLflow run.
"""

from __future__ import annotations

import math
import os
import random
import tempfile
import time
import warnings
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from jobs import distributed
from jobs.common import quiet_train_worker
from jobs.config import ExperimentConfig
from jobs.distributed import to_device
from jobs.evaluation import evaluate, log_evaluation
from jobs.optim import learning_rate, make_optimizer
from jobs.tracking import RunLogger
from pipeline.loader import make_eval_loader, make_train_loader
from pipeline.progress import Progress
from segvlm.checkpoint import load_weights, save_checkpoint
from segvlm.config import flatten, from_dict, to_yaml
from segvlm.inference import DEFAULT_THRESHOLD
from segvlm.losses import (
    RAFLoss,
    content_token_mask,
    region_phrase_loss,
    region_word_loss,
    word_prediction_loss,
)
from segvlm.registry import build_model

TRAIN_STATE = "train_state.pt"
MODEL_DIR = "model"
SCORE_KEY = "val_mean_iou"  # CheckpointConfig.checkpoint_score_attribute
FAIL_ENV = "SEGVLM_FAIL_AT_STEP"  # fault injection for tests: "STEP:RANK:MARKER_FILE", read by the driver


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def autocast_for(precision: str, device: torch.device):
    """bf16 autocast on GPU (``auto`` or ``bf16``), float32 on CPU unless ``bf16`` is forced."""
    return distributed.autocast(precision, device)


def _fit_steps_to_budget(
    train: Any, step: int, elapsed: float, window_seconds: float, window_steps: int, device: torch.device
) -> int:
    """Total steps that fit ``train.time_budget_s`` at the pace of the last logging window, so the cosine
    schedule ends when the budget does. Re-estimated at every log step; all ranks agree on the smallest
    answer (they must stop at the same step, or ``ray.train.report``, a barrier, hangs)."""
    seconds_per_step = window_seconds / max(window_steps, 1)
    fits = step + int(max(0.0, train.time_budget_s - elapsed) / max(seconds_per_step, 1e-9))
    total = max(step, min(train.steps, fits))
    return distributed.all_reduce_min(total, device)


def _maybe_inject_failure(spec: str | None, step: int, rank: int) -> None:
    if not spec:
        return
    fail_step, fail_rank, marker = spec.split(":", 2)
    if step == int(fail_step) and rank == int(fail_rank) and not Path(marker).exists():
        Path(marker).write_text(f"killed rank {rank} at step {step}\n")
        # Ray Train's controller collects reports when it polls the workers (every 2 s); a checkpoint
        # reported less than one poll before a crash can be lost. Wait two polls so the test is deterministic.
        time.sleep(5)
        os._exit(1)  # a hard kill, as a lost node or an OOM would do: no cleanup, no exception


@contextmanager
def checkpoint_directory(checkpoint: Any) -> Iterator[Path]:
    """A Ray Train checkpoint as a local folder of this process: a download into a private temporary
    folder when it lives in remote storage (S3), the folder itself when it is local.

    Not ``Checkpoint.as_directory``: for a remote checkpoint it shares one download folder between the
    processes of a node, and a worker that arrives after the first download finished downloads again into
    it while the first reads (measured: ``PytorchStreamReader failed reading file`` on resume from S3).
    """
    import pyarrow.fs as pafs

    if isinstance(checkpoint.filesystem, pafs.LocalFileSystem):
        yield Path(checkpoint.path)
        return
    with tempfile.TemporaryDirectory(prefix="segvlm-resume-") as tmp:
        yield Path(checkpoint.to_directory(tmp))


def _save_train_checkpoint(
    directory: Path,
    model: torch.nn.Module,
    cfg: ExperimentConfig,
    optimizer: torch.optim.Optimizer,
    state: dict,
) -> None:
    save_checkpoint(
        model,
        cfg.model,
        directory / MODEL_DIR,
        extra={"step": state["step"], "run_id": state["run_id"], "threshold": state["threshold"]},
    )
    torch.save({"optimizer": optimizer.state_dict(), **state}, directory / TRAIN_STATE)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    quiet_train_worker()
    cfg = from_dict(ExperimentConfig, loop_config["experiment"])
    # DDP's bucket views cannot match the strides torch picks for a ConvTranspose weight with one input
    # channel; harmless (one extra copy) but printed by every worker
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(cfg.train.torch_threads or max(1, int(cfg.train.cpus_per_worker)))
    device = distributed.worker_device(cfg.train.use_gpu)
    seed_everything(cfg.train.seed * 1009 + rank)

    # on the device before the optimizer exists: a resumed optimizer state is loaded onto its parameters'
    # device, and AdamW cannot step CUDA parameters with CPU moments
    model = build_model(cfg.model).to(device)
    optimizer = make_optimizer(model, cfg.optim)
    state: dict[str, Any] = {
        "step": 0,
        "samples": 0,
        "total_steps": cfg.train.steps,  # cut to what fits train.time_budget_s as the pace is measured
        "seconds": 0.0,  # training time of earlier attempts, so a resumed run keeps its time budget
        "run_id": loop_config.get("run_id"),
        "best": -1.0,
        "threshold": DEFAULT_THRESHOLD,  # the decision threshold checkpoints predict with (last validation's)
    }

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint_directory(checkpoint) as ckpt_dir:
            load_weights(model, Path(ckpt_dir) / MODEL_DIR)
            saved = torch.load(Path(ckpt_dir) / TRAIN_STATE, map_location="cpu", weights_only=True)
        optimizer.load_state_dict(saved.pop("optimizer"))
        state.update({k: saved[k] for k in state if k in saved})
        if rank == 0:
            print(f"[segvlm] resumed from step {state['step']} (MLflow run {state['run_id']})", flush=True)

    model = ray.train.torch.prepare_model(model, move_to_device=device)  # DDP on `device`: cuda:i or cpu
    core = model.module if hasattr(model, "module") else model
    tokenize = core.backbone.tokenize
    image_size = cfg.model.backbone.image_size

    logger = RunLogger(
        enabled=rank == 0,
        tracking_uri=loop_config["tracking_uri"],
        experiment=cfg.tracking.experiment,
        workdir=cfg.workdir,
        run_id=state["run_id"],
        run_name=cfg.train.run_name or None,
        system_metrics=cfg.tracking.system_metrics,
        parent_run_id=loop_config.get("parent_run_id"),
        relay=loop_config.get("tracking_relay"),
    )
    state["run_id"] = logger.start()
    if rank == 0 and state["step"] == 0:
        counts = core.num_parameters()
        logger.log_params(
            {
                **flatten(cfg),
                "git_commit": loop_config.get("git_commit", "unknown"),
                "data.train_manifest_hash": loop_config.get("train_manifest_hash", ""),
                "data.val_manifest_hash": loop_config.get("val_manifest_hash", ""),
                "world_size": world,
                "params.total": counts["total"],
                "params.trainable": counts["trainable"],
            }
        )
        logger.log_text(to_yaml(cfg), "config.yaml")

    train_loader, _ = make_train_loader(
        cfg.data,
        batch_size=cfg.train.micro_batch,
        image_size=image_size,
        tokenizer=tokenize,
        seed=cfg.train.seed + 7919 * state["step"],  # a resumed run does not replay the batches it saw
        rank=rank,
        world_size=world,
        pin_memory=device.type == "cuda",
    )
    batches = iter(train_loader)
    loss_fn = RAFLoss(cfg.loss)
    accum = cfg.train.grad_accum
    trainable = [p for p in core.parameters() if p.requires_grad]
    start_step = state["step"]
    progress = (
        Progress(state["total_steps"] - start_step, label="train", unit="steps", every=10.0)
        if rank == 0
        else None
    )
    # loss terms stay on the device until a log step: a float() per step would wait for the GPU every step
    window: dict[str, Any] = defaultdict(float)
    window_steps, window_wait, window_start = 0, 0.0, time.perf_counter()
    run_start = time.perf_counter()
    last_score = float("nan")

    model.train()
    seconds_before = state["seconds"]
    while state["step"] < state["total_steps"]:
        step = state["step"]
        _maybe_inject_failure(loop_config.get("fail_at"), step, rank)
        lr = learning_rate(step, cfg.optim, state["total_steps"])
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        optimizer.zero_grad(set_to_none=True)
        for micro in range(accum):
            wait_start = time.perf_counter()
            batch = next(batches)
            window_wait += time.perf_counter() - wait_start
            sync = model.no_sync() if (hasattr(model, "no_sync") and micro < accum - 1) else nullcontext()
            with sync:
                image_index = to_device(batch["image_index"], device)
                masks = to_device(batch["masks"], device)
                with autocast_for(cfg.train.precision, device):
                    logits, aux = model(
                        to_device(batch["pixel_values"], device),
                        to_device(batch["input_ids"], device),
                        to_device(batch["attention_mask"], device),
                        image_index,
                        return_aux=True,
                    )
                terms = loss_fn(logits, masks)
                if cfg.loss.region > 0:
                    terms["region"] = region_phrase_loss(
                        aux["region_embedding"],
                        aux["phrase_embedding"],
                        masks,
                        image_index,
                        aux["region_logit_scale"],
                        aux["region_logit_bias"],
                    )
                    terms["loss"] = terms["loss"] + cfg.loss.region * terms["region"]
                if cfg.loss.words > 0:
                    words = tokenize(batch["target_words"])
                    word_ids = to_device(words["input_ids"], device)
                    word_mask = to_device(content_token_mask(words["attention_mask"]), device)
                    terms["words_region"] = region_word_loss(
                        aux["word_embedding"], aux["vocabulary"], masks, word_ids, word_mask
                    )
                    terms["words_phrase"] = word_prediction_loss(
                        aux["phrase_word_embedding"], aux["vocabulary"], word_ids, word_mask
                    )
                    terms["loss"] = terms["loss"] + cfg.loss.words * (
                        terms["words_region"] + terms["words_phrase"]
                    )
                (terms["loss"] / accum).backward()
            for name, value in terms.items():
                window[name] += value.detach().float() / accum
        if cfg.optim.grad_clip > 0:
            window["grad_norm"] += torch.nn.utils.clip_grad_norm_(trainable, cfg.optim.grad_clip).detach()
        optimizer.step()
        state["step"] += 1
        state["samples"] += cfg.train.batch_size
        window_steps += 1

        done = state["step"] >= state["total_steps"]
        if state["step"] % cfg.train.log_every == 0 or done:
            elapsed = time.perf_counter() - window_start
            # one all-reduce for the loss terms and the data-wait share together
            window["data_wait_share"] = window_wait / max(elapsed, 1e-9) * window_steps
            means = distributed.all_reduce_mean(
                {k: float(v) / window_steps for k, v in window.items()}, device
            )
            wait_share = means.pop("data_wait_share")
            samples_per_s = window_steps * cfg.train.batch_size / max(elapsed, 1e-9)
            metrics = {f"train/{k}": v for k, v in means.items()}
            metrics |= {
                "train/lr": lr,
                "perf/samples_per_s": samples_per_s,
                "perf/data_wait_share": wait_share,
            }
            logger.log_metrics(metrics, step=state["step"])
            if progress is not None:
                terms_text = " ".join(f"{k} {v:.4f}" for k, v in means.items() if k != "grad_norm")
                progress.update(
                    window_steps,
                    loss=terms_text,
                    samples_per_s=f"{samples_per_s:.1f}",
                    data_wait=f"{wait_share:.0%}",
                )
            if cfg.train.time_budget_s > 0:
                state["total_steps"] = _fit_steps_to_budget(
                    cfg.train,
                    state["step"],
                    seconds_before + time.perf_counter() - run_start,
                    elapsed,
                    window_steps,
                    device,
                )
                done = state["step"] >= state["total_steps"]
                if progress is not None:
                    progress.total = state["total_steps"] - start_step
            window.clear()
            window_steps, window_wait, window_start = 0, 0.0, time.perf_counter()

        validate_now = bool(cfg.data.val_shards) and (state["step"] % cfg.train.val_every == 0 or done)
        if validate_now:
            val_loader = make_eval_loader(
                cfg.data.val_shards,
                split=cfg.data.val_split,
                batch_size=cfg.train.micro_batch,
                image_size=image_size,
                tokenizer=tokenize,
                rank=rank,
                world_size=world,
                num_workers=0,
                pin_memory=device.type == "cuda",
            )
            model.eval()
            result = evaluate(
                core,
                val_loader,
                device=device,
                autocast=lambda: autocast_for(cfg.train.precision, device),
                overlays=cfg.train.overlays if rank == 0 else 0,
                max_tasks=cfg.train.val_max_tasks,
            )
            model.train()
            summary = result.all_reduce(device).compute()
            last_score = summary["official/mean_iou"]
            state["best"] = max(state["best"], last_score)
            if cfg.train.calibrate_threshold and summary["official/count"] > 0:
                state["threshold"] = summary["calibration/threshold"]
            log_evaluation(logger, result, summary, step=state["step"], prefix="val")
            if rank == 0:
                print(
                    f"[segvlm] step {state['step']} validation: mean IoU {summary['official/mean_iou']:.4f} "
                    f"cum IoU {summary['official/cum_iou']:.4f} ({int(summary['official/count'])} tasks); "
                    f"threshold {state['threshold']:g} (mean IoU {summary['calibration/mean_iou']:.4f} "
                    f"at {summary['calibration/threshold']:g})",
                    flush=True,
                )

        if state["step"] % cfg.train.ckpt_every == 0 or done:
            report = {"step": state["step"], SCORE_KEY: last_score if not math.isnan(last_score) else -1.0}
            with tempfile.TemporaryDirectory(prefix="segvlm-ckpt-") as tmp:
                ckpt = None
                if rank == 0:
                    state["seconds"] = seconds_before + time.perf_counter() - run_start
                    _save_train_checkpoint(Path(tmp), core, cfg, optimizer, state)
                    ckpt = ray.train.Checkpoint.from_directory(tmp)
                ray.train.report(report, checkpoint=ckpt, checkpoint_dir_name=f"step-{state['step']:07d}")
        if done:
            break

    if progress is not None:
        progress.close()
    logger.log_metrics({"train/seconds": time.perf_counter() - run_start}, step=state["step"])
    logger.end()
