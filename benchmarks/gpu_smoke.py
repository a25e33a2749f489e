"""GPU smoke run: SegVLM (``segvlm_b16``) and transformers' CLIPSeg trained the same way on real loader batches.

Run from the repository root on one GPU (random weights, nothing is downloaded; under 8 minutes on an H200)::

    python benchmarks/gpu_smoke.py                      # 200 steps each, batch 32, bf16, 352 px
    python benchmarks/gpu_smoke.py --tiny --steps 3     # the same path on a CPU with tiny CLIPs (seconds)

In one process, with no Ray: synthetic scenes (``pipeline.scenes``) → shards through the prepare functions
(``pipeline.prepare.build_shard``, the code a Ray prepare task runs) → for each model, ``--steps`` training
steps on ``pipeline.loader.make_train_loader`` batches (pinned, copied non-blocking, bf16 autocast on GPU, RAF
loss, AdamW) → ``jobs.evaluation.evaluate`` on the validation shards. The models:

- ``segvlm_b16``: the registry preset, frozen random CLIP ViT-B/16 at 352 px, every SegVLM part on;
- ``hf_clipseg``: ``transformers.CLIPSegForImageSegmentation`` at random init with the same CLIP size
  (text/vision configs copied from ours), same extracted blocks, ``reduce_dim`` and heads, frozen CLIP.

With ``--tiny`` both use the ``segvlm_tiny`` CLIP (128 px) instead. They see the same batches (same loader
seed) and train one after the other, so each model's peak GPU memory is its own. Every step is timed in four
parts, each closed by a device synchronisation (which costs a little overlap, the same for both models):
data wait (the loader's ``next``), forward (model + loss), backward, optimizer. Prints one JSON object
(also written to ``--out``): per model samples/s, peak GPU memory, the step-time breakdown, first/last loss
and the evaluation; plus ``ratios`` (segvlm_b16 over hf_clipseg).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import resource
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # random weights: the hub is never needed
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable as a script from a checkout

import torch
from torch import nn

from jobs.distributed import autocast, to_device

PHASES = ("data_wait", "forward", "backward", "optimizer")


# ------------------------------------------------------------------------------------------------ data
def prepare_in_process(scenes: Path, split: str, out: Path, shard_samples: int) -> int:
    """Shard one split of a scenes folder as ``segvlm prepare`` does, without Ray: the same planning, the same
    ``build_shard`` a prepare task runs, the same manifest and sizes. Returns the number of samples."""
    from pipeline import shards
    from pipeline.listing import Listing
    from pipeline.prepare import (
        PrepareConfig,
        ShardJob,
        build_shard,
        plan_listing,
        shard_result,
        summarize,
        write_outputs,
    )

    config = PrepareConfig(
        source="scenes", root=str(scenes), split=split, out=str(out), shard_samples=shard_samples
    )
    fs, base = shards.resolve(config.out, None)
    fs.create_dir(base, recursive=True)
    job = ShardJob(
        root=str(scenes.resolve()),
        source="scenes",
        max_side=None,
        fingerprint=config.fingerprint(),
        filesystem=fs,
        base=base,
        split=split,
    )
    with Listing(config.root, split, source="scenes") as listing:
        plans = [
            dataclasses.replace(p, entries=listing.packed(p.images)) for p in plan_listing(listing, config)
        ]
        sidecars = [build_shard(plan, job) for plan in plans]
        inputs = listing.num_tasks + listing.num_issues
    results = [shard_result(sidecar, resumed=False) for sidecar in sidecars]
    summary = summarize(results, config, seconds=0.0, resumed=0, processed=len(plans), inputs=inputs)
    write_outputs(plans, job, summary)
    sizes = {s["shard"]: s["samples"] for s in sidecars if s["samples"]}
    return sum(sizes.values())


def make_data(root: Path, images: int, image_size: int, seed: int = 0) -> dict[str, Any]:
    from pipeline.scenes import write_scenes

    start = time.perf_counter()
    write_scenes(
        root / "scenes", n_images=images, seed=seed, size=image_size, splits={"train": 0.85, "val": 0.15}
    )
    samples = {
        split: prepare_in_process(root / "scenes", split, root / "shards" / split, shard_samples=64)
        for split in ("train", "val")
    }
    return {"images": images, "samples": samples, "seconds": time.perf_counter() - start}


# ---------------------------------------------------------------------------------------------- models
class HFCLIPSeg(nn.Module):
    """``CLIPSegForImageSegmentation`` behind our model's call: ``(pixels N×3×S×S, ids B×L, mask B×L,
    image_index B)`` → logits B×1×S×S (task ``i`` is phrase ``i`` on image ``image_index[i]``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if image_index is not None:
            pixel_values = pixel_values[image_index]
        logits = self.model(
            pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask
        ).logits
        return logits.reshape(len(input_ids), 1, *logits.shape[-2:])  # HF drops the batch axis when B = 1

    def forward_features(self, *args: Any) -> Any:
        """What ``segvlm.task.SegmentationTask`` calls; without auxiliary objectives it reads ``.logits`` only."""
        return types.SimpleNamespace(logits=self(*args))


def build_models(tiny: bool) -> tuple[dict[str, nn.Module], Any, int]:
    """``{name: model}`` (SegVLM first), the tokenizer both use, and the input size."""
    from transformers import CLIPSegConfig, CLIPSegForImageSegmentation

    from pipeline.scenes import SCENE_WORDS
    from segvlm.registry import build_model, model_config
    from segvlm.tokenizer import DEFAULT_TINY_WORDS, build_word_tokenizer

    torch.manual_seed(0)
    # the tiny preset trains its CLIP from scratch; frozen here, as in segvlm_b16 and CLIPSeg
    cfg = model_config("segvlm_tiny", ["backbone.freeze=true"]) if tiny else model_config("segvlm_b16")
    ours = build_model(cfg)
    if (
        ours.backbone.tokenizer is None
    ):  # a random ViT-B/16 has no tokenizer: words of the scenes, one token each
        ours.backbone.tokenizer = build_word_tokenizer(
            sorted(set(SCENE_WORDS) | set(DEFAULT_TINY_WORDS)), model_max_length=cfg.backbone.max_text_length
        )
    clip = ours.backbone.clip.config
    hf_cfg = CLIPSegConfig(
        text_config=clip.text_config.to_dict(),
        vision_config=clip.vision_config.to_dict(),
        projection_dim=clip.projection_dim,
        extract_layers=list(cfg.backbone.extract_layers),
        reduce_dim=cfg.decoder.reduce_dim,
        decoder_num_attention_heads=cfg.decoder.num_heads,
        decoder_intermediate_size=cfg.decoder.intermediate_size,
        use_complex_transposed_convolution=True,
    )
    hf = CLIPSegForImageSegmentation(hf_cfg)
    hf.clip.requires_grad_(False)  # frozen, as CLIPSeg trains it
    return (
        {"segvlm_b16" if not tiny else "segvlm_tiny": ours, "hf_clipseg": HFCLIPSeg(hf)},
        ours.backbone.tokenize,
        cfg.backbone.image_size,
    )


# ------------------------------------------------------------------------------------------- training
def train_and_evaluate(
    name: str,
    model: nn.Module,
    tokenize: Any,
    image_size: int,
    data: Path,
    args: argparse.Namespace,
    device: torch.device,
) -> dict[str, Any]:
    from jobs.evaluation import evaluate
    from pipeline.loader import DataConfig, make_eval_loader, make_train_loader
    from segvlm.task import build_task

    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    model = model.to(device).train()
    task = build_task(model)  # RAF with its default weights
    trainable = [p for p in task.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.05)
    loader, _ = make_train_loader(
        DataConfig(train_shards=str(data / "train"), num_workers=args.loader_workers),
        batch_size=args.batch,
        image_size=image_size,
        tokenizer=tokenize,
        seed=0,
        pin_memory=cuda,
    )
    batches = iter(loader)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    times: dict[str, list[float]] = {phase: [] for phase in PHASES}
    losses: list[float] = []
    timed_start = None
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            sync()
            timed_start = time.perf_counter()
        t0 = time.perf_counter()
        batch = next(batches)
        inputs = {
            k: to_device(batch[k], device)
            for k in ("pixel_values", "input_ids", "attention_mask", "image_index", "masks")
        }
        sync()
        t1 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with autocast(args.precision, device):
            loss = task(inputs)["loss"]
        sync()
        t2 = time.perf_counter()
        loss.backward()
        sync()
        t3 = time.perf_counter()
        optimizer.step()
        sync()
        t4 = time.perf_counter()
        losses.append(float(loss.detach()))
        if step >= args.warmup:
            for phase, seconds in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                times[phase].append(seconds)
    train_seconds = time.perf_counter() - (timed_start or time.perf_counter())
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None

    eval_loader = make_eval_loader(
        str(data / "val"),
        split="val",
        batch_size=args.batch,
        image_size=image_size,
        tokenizer=tokenize,
        num_workers=min(2, args.loader_workers),
        pin_memory=cuda,
    )
    start = time.perf_counter()
    result = evaluate(
        model,
        eval_loader,
        device=device,
        autocast=lambda: autocast(args.precision, device),
        max_tasks=args.eval_tasks,
    )
    summary = result.metrics.compute()
    eval_seconds = time.perf_counter() - start
    model.to("cpu")
    if cuda:
        torch.cuda.empty_cache()
    return {
        "samples_per_s": args.steps * args.batch / train_seconds,
        "train_seconds": train_seconds,
        "peak_gpu_memory_mib": peak,
        "step_ms": {phase: 1e3 * statistics.mean(values) for phase, values in times.items()},
        "step_ms_median_total": 1e3 * statistics.median(map(sum, zip(*times.values(), strict=True))),
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "loss_last10_mean": statistics.mean(losses[-10:]),
        "params_total": sum(p.numel() for p in model.parameters()),
        "params_trainable": sum(p.numel() for p in trainable),
        "eval": {
            "tasks": int(summary["official/count"]),
            "mean_iou": summary["official/mean_iou"],
            "cum_iou": summary["official/cum_iou"],
            "seconds": eval_seconds,
        },
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny CLIPs at 128 px, CPU-sized defaults")
    p.add_argument("--steps", type=int, default=200, help="timed training steps per model")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 10, tiny 1)")
    p.add_argument("--batch", type=int, default=None, help="phrases per step (default 32, tiny 4)")
    p.add_argument("--images", type=int, default=None, help="synthetic scenes (default 1200, tiny 24)")
    p.add_argument("--scene-size", type=int, default=None, help="scene side in px (default 384, tiny 128)")
    p.add_argument(
        "--eval-tasks", type=int, default=None, help="validation tasks per model (default 512, tiny 16)"
    )
    p.add_argument(
        "--loader-workers", type=int, default=None, help="DataLoader workers (default min(8, cpus), tiny 0)"
    )
    p.add_argument("--device", default="auto", help="auto (cuda when available), cuda, cpu")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"], help="auto: bf16 on GPU")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--workdir", default=None, help="where the scenes and shards go (default: a temp folder)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    tiny = args.tiny
    args.warmup = args.warmup if args.warmup is not None else (1 if tiny else 10)
    args.batch = args.batch or (4 if tiny else 32)
    args.images = args.images or (24 if tiny else 1200)
    args.scene_size = args.scene_size or (128 if tiny else 384)
    args.eval_tasks = args.eval_tasks if args.eval_tasks is not None else (16 if tiny else 512)
    if args.loader_workers is None:
        args.loader_workers = 0 if tiny else min(8, os.cpu_count() or 1)
    if args.steps < 1:
        p.error("--steps must be >= 1")
    device = torch.device(
        "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device.replace("auto", "cpu")
    )
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    if args.threads:
        torch.set_num_threads(args.threads)

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="segvlm-gpu-smoke-") as tmp:
        root = Path(args.workdir or tmp)
        print(f"[gpu_smoke] {args.images} scenes → shards in {root}", file=sys.stderr, flush=True)
        data = make_data(root, args.images, args.scene_size)
        models, tokenize, image_size = build_models(tiny)
        results = {}
        for name, model in models.items():
            print(
                f"[gpu_smoke] {name}: {args.warmup}+{args.steps} steps on {device}",
                file=sys.stderr,
                flush=True,
            )
            results[name] = train_and_evaluate(
                name, model, tokenize, image_size, root / "shards", args, device
            )
            print(
                f"[gpu_smoke] {name}: {results[name]['samples_per_s']:.1f} samples/s",
                file=sys.stderr,
                flush=True,
            )
    ours, base = results[next(iter(models))], results["hf_clipseg"]
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "precision": "bf16"
        if (args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda"))
        else "fp32",
        "image_size": image_size,
        "batch": args.batch,
        "steps": args.steps,
        "warmup": args.warmup,
        "loader_workers": args.loader_workers,
        "data": data,
        "models": results,
        "ratios": {
            "samples_per_s": ours["samples_per_s"] / base["samples_per_s"],
            "step_ms_median_total": ours["step_ms_median_total"] / base["step_ms_median_total"],
            "peak_gpu_memory": (ours["peak_gpu_memory_mib"] / base["peak_gpu_memory_mib"])
            if device.type == "cuda"
            else None,
        },
        "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "seconds": time.perf_counter() - start,
    }
    text = json.dumps(
        report,
        indent=2,
        allow_nan=False,
        default=lambda x: None if isinstance(x, float) and not math.isfinite(x) else str(x),
    )
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
