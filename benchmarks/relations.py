"""Training-step cost of the decoder's relation parts on the demo's model and batch shape.

Run from the repository root (random weights, nothing is downloaded)::

    .venv/bin/python benchmarks/relations.py --steps 20 --threads 2

The demo's SegVLM (``configs/demo.yaml``: tiny CLIP, text-kernel head, word losses) without and with
``decoder.relational_context`` + ``decoder.relative_position``, one batch of the demo's shape (16 images of
128 px, 4 phrases each), forward + losses + backward + AdamW step. The two run round-robin step by step in
one process after a warm-up, so a machine that slows down affects both alike. Prints the median step time,
process CPU time per step and the ratio, and the parameters each adds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runnable as a script from a checkout

import torch  # noqa: E402

from jobs.config import ExperimentConfig  # noqa: E402
from segvlm.backbone import make_tiny_clip  # noqa: E402
from segvlm.config import load_config  # noqa: E402
from segvlm.registry import build_model  # noqa: E402
from segvlm.task import build_task  # noqa: E402

RELATIONS = ("model.decoder.relational_context=true", "model.decoder.relative_position=true")
PHRASES = ["the red circle", "the hexagon right of the small hexagon", "the largest star", "the green shapes"]


def build(clip: Path, extra: tuple[str, ...]) -> tuple[torch.nn.Module, torch.optim.Optimizer, int]:
    off = ("model.decoder.relational_context=false", "model.decoder.relative_position=false")
    cfg = load_config(
        ExperimentConfig, ROOT / "configs" / "demo.yaml", [f"model.backbone.pretrained={clip}", *off, *extra]
    )
    torch.manual_seed(0)
    model = build_model(cfg.model)
    task = build_task(model, cfg.loss)
    return task, torch.optim.AdamW(task.parameters(), lr=1e-4), sum(p.numel() for p in model.parameters())


def make_batch(task: torch.nn.Module, images: int, per_image: int) -> dict:
    g = torch.Generator().manual_seed(0)
    phrases = [PHRASES[i % len(PHRASES)] for i in range(images * per_image)]
    masks = (torch.rand(len(phrases), 1, 128, 128, generator=g) > 0.8).float()
    return {
        "pixel_values": torch.randn(images, 3, 128, 128, generator=g),
        **task.model.backbone.tokenize(phrases),
        "image_index": torch.arange(images).repeat_interleave(per_image),
        "masks": masks,
        "target_words": ["red circle"] * len(phrases),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20, help="timed steps per model")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--per-image", type=int, default=4)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        clip = make_tiny_clip(Path(tmp) / "clip")
        models = {"demo": build(clip, ()), "demo+relations": build(clip, RELATIONS)}
    batch = make_batch(models["demo"][0], args.images, args.per_image)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in models}
    for step in range(args.warmup + args.steps):
        for name, (task, optimizer, _) in models.items():
            start, cpu = time.perf_counter(), time.process_time()
            optimizer.zero_grad(set_to_none=True)
            task(batch)["loss"].backward()
            optimizer.step()
            if step >= args.warmup:
                times[name].append((time.perf_counter() - start, time.process_time() - cpu))
    base_wall = statistics.median(t for t, _ in times["demo"])
    base_cpu = statistics.median(c for _, c in times["demo"])
    for name, (_, _, params) in models.items():
        wall = statistics.median(t for t, _ in times[name])
        cpu = statistics.median(c for _, c in times[name])
        print(
            f"{name:15s} params {params:,}  step {wall * 1000:.0f} ms (cpu {cpu * 1000:.0f} ms)  "
            f"×{wall / base_wall:.3f} wall, ×{cpu / base_cpu:.3f} cpu"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
