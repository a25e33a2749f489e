"""The Ray Train worker loop: one function every worker runs (``train_loop_per_worker``).

Each worker builds the training task (SegVLM + its losses, ``segvlm.task``), wraps it for DDP, reads its
share of the shards (the same number of batches on every rank) and trains. Rank 0 logs through the run
logger (``jobs.tracking``); other ranks get a disabled one. What a checkpoint holds: ``jobs.train_state``.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from typing import Any

import torch

from jobs import distributed
from jobs.common import quiet_train_worker
from jobs.config import ExperimentConfig
from jobs.evaluation import validate
from jobs.optim import fit_steps_to_budget, learning_rate, make_optimizer
from jobs.train_metrics import StepWindow, log_run_params, open_worker_logger
from jobs.train_state import initial_state, report_checkpoint, restore_train_checkpoint
from pipeline.loader import make_train_loader
from pipeline.progress import Progress
from segvlm.config import from_dict
from segvlm.registry import build_model
from segvlm.task import build_task

TASK_INPUTS = ("pixel_values", "input_ids", "attention_mask", "image_index", "masks")


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    quiet_train_worker()
    cfg = from_dict(ExperimentConfig, loop_config["experiment"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    threads = cfg.train.torch_threads or max(1, int(cfg.train.cpus_per_worker))
    device = distributed.init_worker(
        use_gpu=cfg.train.use_gpu, threads=threads, seed=cfg.train.seed * 1009 + rank
    )
    step_hook = loop_config.get("step_hook")  # tests install one to kill a worker at a given step

    # on the device before the optimizer exists: AdamW cannot step CUDA parameters with CPU moments
    task = build_task(build_model(cfg.model).to(device), cfg.loss)
    optimizer = make_optimizer(task, cfg.optim)
    state = initial_state(cfg.train.steps, loop_config.get("run_id"))
    if (checkpoint := ray.train.get_checkpoint()) is not None:
        restore_train_checkpoint(checkpoint, task, optimizer, state)
        if rank == 0:
            print(f"[segvlm] resumed from step {state['step']} (MLflow run {state['run_id']})", flush=True)
    # DDP wraps the whole task: the training-only heads are reached by their losses like the model
    ddp_task = ray.train.torch.prepare_model(task, move_to_device=device)
    model = task.model

    logger = open_worker_logger(cfg, loop_config, run_id=state["run_id"], rank=rank)
    state["run_id"] = logger.start()
    if rank == 0 and state["step"] == 0:
        log_run_params(logger, cfg, model, loop_config, world_size=world)

    batches = iter(
        make_train_loader(
            cfg.data,
            batch_size=cfg.train.micro_batch,
            image_size=cfg.model.backbone.image_size,
            tokenizer=model.backbone.tokenize,
            seed=cfg.train.seed + 7919 * state["step"],  # a resumed run does not replay the batches it saw
            rank=rank,
            world_size=world,
            pin_memory=device.type == "cuda",
        )[0]
    )
    accum = cfg.train.grad_accum
    trainable = [p for p in task.parameters() if p.requires_grad]
    start_step, seconds_before, run_start = state["step"], state["seconds"], time.perf_counter()
    progress = (
        Progress(state["total_steps"] - start_step, label="train", unit="steps", every=10.0)
        if rank == 0
        else None
    )
    window, last_score = StepWindow(), -1.0
    num_sources = len(cfg.data.train_sources())

    ddp_task.train()
    while state["step"] < state["total_steps"]:
        if step_hook is not None:
            step_hook(state["step"], rank)
        lr = learning_rate(state["step"], cfg.optim, state["total_steps"])
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        optimizer.zero_grad(set_to_none=True)
        for micro in range(accum):
            wait_start = time.perf_counter()
            batch = next(batches)
            window.data_wait_s += time.perf_counter() - wait_start
            if num_sources > 1:
                window.count_sources(batch["source"], num_sources)
            last_micro = micro == accum - 1
            with nullcontext() if last_micro or not hasattr(ddp_task, "no_sync") else ddp_task.no_sync():
                inputs = {k: distributed.to_device(batch[k], device) for k in TASK_INPUTS}
                with distributed.autocast(cfg.train.precision, device):
                    terms = ddp_task({**inputs, "target_words": batch["target_words"]})
                (terms["loss"] / accum).backward()
            window.add(terms, 1 / accum)
        if cfg.optim.grad_clip > 0:
            window.add({"grad_norm": torch.nn.utils.clip_grad_norm_(trainable, cfg.optim.grad_clip)})
        optimizer.step()
        state["step"] += 1
        state["samples"] += cfg.train.batch_size
        window.steps += 1

        done = state["step"] >= state["total_steps"]
        if state["step"] % cfg.train.log_every == 0 or done:
            perf = window.log(
                logger, progress, device, step=state["step"], lr=lr, batch_size=cfg.train.batch_size
            )
            if cfg.train.time_budget_s > 0:
                fits = fit_steps_to_budget(
                    budget_s=cfg.train.time_budget_s,
                    max_steps=cfg.train.steps,
                    step=state["step"],
                    elapsed_s=seconds_before + time.perf_counter() - run_start,
                    window_s=perf["window_s"],
                    window_steps=perf["window_steps"],
                )
                state["total_steps"] = distributed.all_reduce_min(fits, device)
                done = state["step"] >= state["total_steps"]
                if progress is not None:
                    progress.total = state["total_steps"] - start_step

        if cfg.data.val_shards and (state["step"] % cfg.train.val_every == 0 or done):
            ddp_task.eval()
            summary = validate(
                model, cfg, logger, step=state["step"], device=device, rank=rank, world_size=world
            )
            ddp_task.train()
            last_score = summary["official/mean_iou"]
            state["best"] = max(state["best"], last_score)
            if cfg.train.calibrate_threshold and summary["official/count"] > 0:
                state["threshold"] = summary["calibration/threshold"]

        if state["step"] % cfg.train.ckpt_every == 0 or done:
            state["seconds"] = seconds_before + time.perf_counter() - run_start
            report_checkpoint(task, cfg.model, optimizer, state, score=last_score, rank=rank)
        if done:
            break

    if progress is not None:
        progress.close()
    logger.log_metrics({"train/seconds": time.perf_counter() - run_start}, step=state["step"])
    logger.end()
