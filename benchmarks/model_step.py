"""Training-step throughput: SegVLM vs transformers' CLIPSeg with the same frozen ViT-B/16 CLIP.

Run from the repository root (random weights, nothing is downloaded)::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/model_step.py --batch 2 --steps 6 --threads 2
    python benchmarks/model_step.py --device cuda --batch 32 --steps 50 --bf16 --json

A step is forward + BCE loss + backward + AdamW step over the trainable parameters, with the CLIP frozen in
every model. Our models train through their task (``segvlm.task.build_task(model, "bce")``), CLIPSeg through
the same criterion (``RAFLoss`` with BCE only) on its logits. Three models are timed side by side in one process, round-robin step by step after a warm-up,
so that a machine that slows down or speeds up (shared CPUs, GPU clocks) affects all of them alike:

- ``hf_clipseg``: ``transformers.CLIPSegForImageSegmentation``, ViT-B/16 vision + CLIP text, 352 px input,
  ``extract_layers=[3, 7, 9]`` (0-based), ``reduce_dim=64``, complex transposed convolution;
- ``clipseg_b16``: our re-implementation of the same model (``segvlm.registry`` preset); it stops the vision
  tower after the deepest extracted block, so it should be as fast or faster;
- ``segvlm_b16``: SegVLM with all its parts switched on. The goal is a step ≤ 1.3× CLIPSeg's.

Prints one line per model (median step time, samples/s) and the ratios; ``--json`` adds one JSON line. On the
CPU the process CPU time per step is reported too: on a shared machine wall time also counts waiting for
cores, CPU time only the work done.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable as a script from a checkout

import torch

from segvlm.losses import RAFLoss

IMAGE_SIZE = 352
TEXT_LENGTH = 16  # a typical padded PhraseCut phrase batch; both models get the very same tokens
VOCAB_SIZE = 49408


def hf_clipseg() -> torch.nn.Module:
    """``CLIPSegForImageSegmentation`` with OpenAI ViT-B/16's shapes, random weights, frozen CLIP."""
    from transformers import CLIPSegConfig, CLIPSegForImageSegmentation

    cfg = CLIPSegConfig(
        text_config={},  # CLIP's text tower defaults: 512 wide, 12 layers, 8 heads
        vision_config={
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "image_size": 224,
            "patch_size": 16,
        },
        projection_dim=512,
        extract_layers=[3, 7, 9],
        reduce_dim=64,
        decoder_num_attention_heads=4,
        use_complex_transposed_convolution=True,
    )
    model = CLIPSegForImageSegmentation(cfg)
    model.clip.requires_grad_(False)
    return model


def ours(name: str) -> torch.nn.Module:
    """The training task (BCE only) of a ``segvlm.registry`` preset built from config (random CLIP weights,
    frozen as the preset says)."""
    from segvlm.registry import build_model, model_config
    from segvlm.task import build_task

    return build_task(build_model(model_config(name)), "bce")


class Runner:
    """One model with its optimizer and a ``step()`` closure over fixed inputs."""

    def __init__(self, name: str, model: torch.nn.Module, forward: Callable[..., torch.Tensor], args) -> None:
        self.name = name
        self.model = model.to(args.device).train()
        self.forward = forward
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.trainable = sum(p.numel() for p in params)
        self.total = sum(p.numel() for p in self.model.parameters())
        self.opt = torch.optim.AdamW(params, lr=1e-3)
        self.autocast = (
            torch.autocast(device_type="cuda", dtype=torch.bfloat16)
            if args.bf16
            else contextlib.nullcontext()
        )
        self.times: list[float] = []
        self.cpu_times: list[float] = []

    def step(self, batch: dict[str, torch.Tensor], sync: Callable[[], None]) -> tuple[float, float]:
        """One training step; returns (wall seconds, process CPU seconds summed over threads)."""
        sync()
        start, cpu_start = time.perf_counter(), time.process_time()
        self.opt.zero_grad(set_to_none=True)
        with self.autocast:
            loss = self.forward(self.model, batch)
        loss.backward()
        self.opt.step()
        sync()
        return time.perf_counter() - start, time.process_time() - cpu_start


def make_batch(batch_size: int, device: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, VOCAB_SIZE - 2, (batch_size, TEXT_LENGTH), generator=g)
    ids[:, 0] = VOCAB_SIZE - 2  # <|startoftext|>
    ids[:, -1] = VOCAB_SIZE - 1  # <|endoftext|>: CLIP pools the text at its first occurrence
    batch = {
        "pixel_values": torch.randn(batch_size, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g),
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "target": (torch.rand(batch_size, IMAGE_SIZE, IMAGE_SIZE, generator=g) > 0.7).float(),
    }
    return {k: v.to(device) for k, v in batch.items()}


BCE_ONLY = RAFLoss(bce=1.0, focal=0.0, dice=0.0)


def _hf_forward(model: torch.nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(pixel_values=b["pixel_values"], input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    return BCE_ONLY(out.logits, b["target"])["loss"]  # logits B×H×W


def _our_forward(task: torch.nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
    return task({**b, "masks": b["target"][:, None]})["loss"]  # logits B×1×H×W


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=None, help="samples per step (default: 2 on cpu, 32 on cuda)")
    p.add_argument("--steps", type=int, default=6, help="timed steps per model")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model first")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast (GPU only)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--models", default="hf_clipseg,clipseg_b16,segvlm_b16", help="comma-separated subset")
    p.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    args = p.parse_args(argv)
    if args.bf16 and args.device != "cuda":
        p.error("--bf16 needs --device cuda (CPU autocast is not what training uses)")
    if args.threads:
        torch.set_num_threads(args.threads)
    batch_size = args.batch or (32 if args.device == "cuda" else 2)
    torch.manual_seed(0)

    builders: dict[str, tuple[Callable[[], torch.nn.Module], Callable[..., torch.Tensor]]] = {
        "hf_clipseg": (hf_clipseg, _hf_forward),
        "clipseg_b16": (lambda: ours("clipseg_b16"), _our_forward),
        "segvlm_b16": (lambda: ours("segvlm_b16"), _our_forward),
    }
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    runners = [Runner(n, builders[n][0](), builders[n][1], args) for n in names]
    batch = make_batch(batch_size, args.device)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)

    for _ in range(args.warmup):
        for r in runners:
            r.step(batch, sync)
    for _ in range(args.steps):  # round-robin: drift in machine speed hits every model alike
        for r in runners:
            wall, cpu = r.step(batch, sync)
            r.times.append(wall)
            r.cpu_times.append(cpu)

    print(
        f"device={args.device} threads={torch.get_num_threads()} batch={batch_size} steps={args.steps} "
        f"warmup={args.warmup} bf16={args.bf16} input={IMAGE_SIZE}px text_len={TEXT_LENGTH}"
    )
    results: dict[str, dict[str, float]] = {}
    for r in runners:
        med = statistics.median(r.times)
        results[r.name] = {
            "step_s": med,
            "step_s_min": min(r.times),
            "cpu_s": statistics.median(r.cpu_times),
            "samples_per_s": batch_size / med,
            "trainable_params": r.trainable,
            "total_params": r.total,
        }
        print(
            f"{r.name:>12}: {med * 1e3:9.1f} ms/step (min {min(r.times) * 1e3:.1f}, "
            f"CPU {statistics.median(r.cpu_times) * 1e3:.1f})  "
            f"{batch_size / med:8.2f} samples/s  trainable {r.trainable / 1e6:.2f}M / total {r.total / 1e6:.1f}M"
        )
    ratios: dict[str, float] = {}
    if "hf_clipseg" in results:
        base = results["hf_clipseg"]["step_s"]
        for name in ("segvlm_b16", "clipseg_b16"):
            if name in results:
                ratios[f"{name}/hf_clipseg"] = results[name]["step_s"] / base
    if "segvlm_b16" in results and "clipseg_b16" in results:
        ratios["segvlm_b16/clipseg_b16"] = results["segvlm_b16"]["step_s"] / results["clipseg_b16"]["step_s"]
    if args.device == "cpu" and "hf_clipseg" in results:
        # On a shared CPU, wall time includes waiting for cores; process CPU time counts only work done.
        base = results["hf_clipseg"]["cpu_s"]
        for name in ("segvlm_b16", "clipseg_b16"):
            if name in results:
                ratios[f"{name}/hf_clipseg (cpu time)"] = results[name]["cpu_s"] / base
    for key, value in ratios.items():
        print(f"step-time ratio {key}: {value:.3f}")
    if "segvlm_b16/hf_clipseg" in ratios:
        verdict = "OK" if ratios["segvlm_b16/hf_clipseg"] <= 1.3 else "OVER the 1.3x goal"
        print(f"goal segvlm_b16 <= 1.3x CLIPSeg: {verdict}")
    if args.json:
        print(
            json.dumps(
                {
                    "batch": batch_size,
                    "device": args.device,
                    "bf16": args.bf16,
                    "results": results,
                    "ratios": ratios,
                }
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
