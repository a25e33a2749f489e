"""Side-by-side learning experiments on the demo's data, without Ray: train one config for a fixed number of
steps in one process, then score it per phrase type and see where relation phrases' masks go.

Run from the repository root, on a folder a demo run left (``segvlm demo --workdir DIR``: its scenes, shards
and tiny CLIP)::

    .venv/bin/python benchmarks/demo_side_by_side.py train --out runs/exp/demo --data DIR --steps 1400 --seed 2
    .venv/bin/python benchmarks/demo_side_by_side.py train --out runs/exp/norel --data DIR --steps 1400 --seed 2 \\
        model.decoder.relational_context=false model.decoder.relative_position=false
    .venv/bin/python benchmarks/demo_side_by_side.py score runs/exp/demo/checkpoint --data DIR --split val

``train`` runs ``configs/demo.yaml`` (plus overrides) with one worker and one thread, the demo's global batch
(64 phrases), so two experiments run side by side on a 2-core machine without disturbing each other's
results (a fixed step count, not a time budget). ``score`` reads the scenes' own object map (re-rendered
from the seed), predicts every task of the split at the checkpoint's threshold and prints mean IoU overall
and per phrase type; where the IoU is lost: choosing objects or drawing them (``objects/*``: the prediction
snapped to whole objects, an object chosen when over half its pixels are predicted; how often exactly the
target's objects are chosen; the mask's IoU on those phrases; and what a head at 1/4 resolution, like the
text-kernel head, can draw at best: the target averaged over 4×4 cells, its clamped logit upsampled
bilinearly and thresholded at 0); and for pairwise relation phrases ("the hexagon right of the small
hexagon"): the share of predicted pixels on the reference object, how often a prediction covers most of it, and what a
relation-blind model scores that marks every object the subject's name and attributes match.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runnable as a script from a checkout

import numpy as np  # noqa: E402
import torch  # noqa: E402

INPUTS = ("pixel_values", "input_ids", "attention_mask", "image_index", "masks", "target_words")


def train(out: Path, data: Path, steps: int, seed: int, overrides: list[str]) -> None:
    from jobs.config import ExperimentConfig
    from jobs.optim import learning_rate, make_optimizer
    from pipeline.loader import make_train_loader
    from segvlm.checkpoint import save_checkpoint
    from segvlm.config import load_config
    from segvlm.registry import build_model
    from segvlm.task import build_task

    torch.set_num_threads(1)
    torch.manual_seed(seed * 1009)
    cfg = load_config(
        ExperimentConfig,
        ROOT / "configs" / "demo.yaml",
        [
            f"model.backbone.pretrained={data / 'tiny-clip'}",
            f"data.train_shards={data / 'shards' / 'train'}",
            f"train.steps={steps}",
            f"train.seed={seed}",
            *overrides,
        ],
    )
    task = build_task(build_model(cfg.model), cfg.loss)
    optimizer = make_optimizer(task, cfg.optim)
    loader, _ = make_train_loader(
        cfg.data,
        batch_size=cfg.train.batch_size,
        image_size=cfg.model.backbone.image_size,
        tokenizer=task.model.backbone.tokenize,
        seed=seed,
    )
    batches = iter(loader)
    trainable = [p for p in task.parameters() if p.requires_grad]
    task.train()
    start, sums = time.perf_counter(), collections.Counter()
    for step in range(1, steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step - 1, cfg.optim, steps) * group["lr_scale"]
        optimizer.zero_grad(set_to_none=True)
        batch = next(batches)
        terms = task({k: batch[k] for k in INPUTS})
        terms["loss"].backward()
        torch.nn.utils.clip_grad_norm_(trainable, cfg.optim.grad_clip)
        optimizer.step()
        sums.update({k: float(v.detach()) for k, v in terms.items()})
        if step % 100 == 0 or step == steps:
            n = 100 if step % 100 == 0 else step % 100
            losses = " ".join(f"{k} {v / n:.3f}" for k, v in sums.items())
            print(f"step {step}/{steps}  {time.perf_counter() - start:.0f} s  {losses}", flush=True)
            sums.clear()
    # the demo's usual validation threshold, so runs are compared at one threshold
    save_checkpoint(task.model, cfg.model, out / "checkpoint", extra={"threshold": 0.25, "step": steps})


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return (a & b).sum() / max((a | b).sum(), 1)


def score(checkpoint: Path, data: Path, split: str, seed: int) -> dict[str, float]:
    from PIL import Image

    from pipeline.scenes import SINGULARS, SUPERLATIVES, _matches, make_scene
    from segvlm.inference import Predictor

    torch.set_num_threads(1)
    predictor = Predictor.from_checkpoint(checkpoint)
    tasks = json.loads((data / "scenes" / f"refer_{split}.json").read_text())
    ious: dict[str, list[float]] = collections.defaultdict(list)
    snapped, exact, when_exact, quarter = [], [], [], []
    on_reference, covers_reference, blind = [], [], []
    scene = None
    for task in tasks:
        structure, image_id = task["phrase_structure"], task["image_id"]
        if scene is None or scene.image_id != image_id:
            scene = make_scene(seed, image_id, 128)
        owner = scene.owner.astype(np.int64) - 1  # object index per pixel, -1 = background
        image = Image.open(data / "scenes" / "images" / f"{image_id}.jpg")
        predicted = predictor.predict(image, task["phrase"])[0] > predictor.threshold
        target_ids = [int(a.split("x")[0]) - 1 for a in task["ann_ids"]]
        target = np.isin(owner, target_ids)
        iou = _iou(predicted, target)
        ious["all"].append(iou)
        ious[structure["type"]].append(iou)
        if target_ids:
            area = np.bincount(owner[owner >= 0])
            covered = np.bincount(owner[(owner >= 0) & predicted], minlength=len(area))
            chosen = np.flatnonzero((covered * 2 > area) & (area > 0))  # over half of the object predicted
            snapped.append(_iou(np.isin(owner, chosen), target))
            exact.append(set(chosen) == set(target_ids))
            if exact[-1]:
                when_exact.append(iou)
            cells = torch.nn.functional.avg_pool2d(torch.from_numpy(target).float()[None, None], 4)
            logit = torch.logit(cells.clamp(0.02, 0.98))
            drawn = (
                torch.nn.functional.interpolate(logit, size=target.shape, mode="bilinear")[0, 0].numpy() > 0
            )
            quarter.append(_iou(drawn, target))
        relations = structure["relation_descriptions"]
        if structure["type"] != "relation" or relations[0][0] in SUPERLATIVES:
            continue
        references = [i for i in structure["relation_ids"] if i not in target_ids]
        if references:
            reference = np.isin(owner, references)
            on_reference.append((reference & predicted).sum() / max(predicted.sum(), 1))
            covers_reference.append((reference & predicted).sum() / reference.sum() > 0.5)
        name = SINGULARS.get(structure["name"], structure["name"])
        matched = [o.index for o in scene.objects if _matches(o, name, structure["attributes"])]
        marked = np.isin(owner, matched)
        blind.append(_iou(marked, target))
    result = {f"mean_iou/{k}": float(np.mean(v)) for k, v in ious.items()}
    result |= {
        "objects/snapped_mean_iou": float(np.mean(snapped)),
        "objects/exact_choice": float(np.mean(exact)),
        "objects/mean_iou_when_exact": float(np.mean(when_exact)),
        "objects/best_at_quarter_resolution": float(np.mean(quarter)),
    }
    result |= {
        "pairwise/reference_share_of_prediction": float(np.mean(on_reference)),
        "pairwise/covers_most_of_reference": float(np.mean(covers_reference)),
        "pairwise/relation_blind_mean_iou": float(np.mean(blind)),
        "pairwise/count": len(blind),
    }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    t = commands.add_parser("train", help="train configs/demo.yaml (+ overrides) for --steps in one process")
    t.add_argument("--out", type=Path, required=True, help="folder for the checkpoint")
    t.add_argument("--data", type=Path, required=True, help="a demo workdir (scenes, shards, tiny-clip)")
    t.add_argument("--steps", type=int, default=700)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("overrides", nargs="*")
    s = commands.add_parser("score", help="per-type mean IoU and where relation phrases' masks go")
    s.add_argument("checkpoint", type=Path)
    s.add_argument("--data", type=Path, required=True)
    s.add_argument("--split", default="val")
    s.add_argument("--scene-seed", type=int, default=0, help="the seed the demo rendered its scenes with")
    args = parser.parse_args(argv)
    if args.command == "train":
        train(args.out, args.data, args.steps, args.seed, args.overrides)
    else:
        print(json.dumps(score(args.checkpoint, args.data, args.split, args.scene_seed), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
