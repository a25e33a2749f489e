"""Training-step throughput with phrases sharing their image (``data.phrases_per_image``) vs one image per phrase.

Run from the repository root (random weights, nothing is downloaded)::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/shared_images.py --threads 2
    python benchmarks/shared_images.py --device cuda --batch 256 --model segvlm_b16 --steps 30

Every variant trains the same model on ``--batch`` phrases per step (forward + RAF loss + backward + AdamW);
only the number of distinct images differs: ``k=1`` is one image per phrase (CLIPSeg's batches), ``k=K``
gives each image K phrases and the backbone encodes it once (``SegVLM.forward(..., image_index=...)``).
``k=K early`` is how that worked before the decoder learned to gather: the image features are repeated per
phrase *before* the decoder, so its per-token linear maps of the image (the layer reductions, the stem
skip's 1×1 conv) run once per phrase instead of once per image; same outputs and gradients.
Variants run round-robin, step by step after a warm-up, in one process, so a machine that slows down hits
them alike. Prints median ms/step, phrases/s and each variant's speed-up over ``k=1``, and the speed-up of
gathering in the decoder over gathering early.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable as a script from a checkout

import torch

from jobs.config import ExperimentConfig
from segvlm.config import load_config
from segvlm.registry import build_model, model_config
from segvlm.task import build_task

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--model", default="demo", help="'demo' (configs/demo.yaml's tiny model) or a registry preset"
    )
    p.add_argument("--batch", type=int, default=64, help="phrases per step")
    p.add_argument("--ks", default="1,4,8", help="phrases per image to compare; the first is the baseline")
    p.add_argument("--steps", type=int, default=8, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.model == "demo":
        exp = load_config(ExperimentConfig, DEMO_CONFIG, [])
        model_cfg, loss_cfg = exp.model, exp.loss
    else:
        model_cfg, loss_cfg = model_config(args.model), ExperimentConfig().loss
    model = build_model(model_cfg).to(args.device).train()
    loss_fn = build_task(model, loss_cfg).criterion  # the mask loss only: the comparison is of the decoder
    optimizer = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-5)
    size = model_cfg.backbone.image_size
    ks = [int(k) for k in args.ks.split(",")]
    g = torch.Generator().manual_seed(0)
    vocab = model.backbone.clip.config.text_config.vocab_size
    ids = torch.randint(0, vocab - 2, (args.batch, 12), generator=g)
    ids[:, -1] = vocab - 1  # EOS: CLIP pools the text there
    tokens = {"input_ids": ids.to(args.device), "attention_mask": torch.ones_like(ids).to(args.device)}
    masks = (torch.rand(args.batch, 1, size, size, generator=g) > 0.8).float().to(args.device)
    batches = {}
    for k in ks:
        n = -(-args.batch // k)
        batches[k] = (
            torch.randn(n, 3, size, size, generator=g).to(args.device),
            (torch.arange(args.batch) // k).to(args.device),
        )
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)

    def early_gather(pixels: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        feats = model.backbone(pixels, **tokens, image_index=index)
        stem = feats.stem_features
        return model.decoder(
            [a.index_select(0, index) for a in feats.activations],
            feats.text_embedding,
            feats.text_tokens,
            feats.text_mask,
            image_size=(size, size),
            stem_features=None if stem is None else stem.index_select(0, index),
            pixel_values=pixels.index_select(0, index),
        ).logits

    def step(variant: tuple[int, bool]) -> float:
        k, early = variant
        pixels, index = batches[k]
        sync()
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.device == "cuda"):
            logits = early_gather(pixels, index) if early else model(pixels, **tokens, image_index=index)
        loss_fn(logits.float(), masks)["loss"].backward()
        optimizer.step()
        sync()
        return time.perf_counter() - start

    variants = [(k, early) for k in ks for early in ((False, True) if k > 1 else (False,))]
    times: dict[tuple[int, bool], list[float]] = {v: [] for v in variants}
    for _ in range(args.warmup):
        for v in variants:
            step(v)
    for _ in range(args.steps):
        for v in variants:
            times[v].append(step(v))
    print(
        f"model={args.model} device={args.device} threads={torch.get_num_threads()} batch={args.batch} "
        f"phrases, {size}px, steps={args.steps}"
    )
    base = statistics.median(times[(ks[0], False)])
    results = {}
    for k, early in variants:
        med = statistics.median(times[(k, early)])
        name = f"k={k}" + (" early" if early else "")
        results[name] = {"images": batches[k][0].shape[0], "step_s": med, "phrases_per_s": args.batch / med,
                         "speedup": base / med}  # fmt: skip
        line = (
            f"{name:>10} ({results[name]['images']:>3} images): {med * 1e3:8.1f} ms/step  "
            f"{args.batch / med:8.1f} phrases/s  speed-up over k={ks[0]}: {base / med:.2f}x"
        )
        if early:
            gain = med / statistics.median(times[(k, False)])
            results[f"k={k}"]["speedup_over_early"] = gain
            line += f"  (gathering in the decoder: {gain:.2f}x faster)"
        print(line)
    if args.json:
        print(
            json.dumps({"model": args.model, "batch": args.batch, "device": args.device, "results": results})
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
