"""The demo's synthetic data: scenes → ``prepare`` (train with the demo's synthetic prompts; val; test with
negative prompts) → a tiny CLIP whose vocabulary covers the scenes. One builder, used by ``segvlm demo`` and
``segvlm ablate --demo-data`` so the ablation trains on exactly what the demo trains on.

Layout under the folder: ``scenes/`` (PhraseCut format), ``shards/{train,val,test}/``, ``tiny-clip/``.
``prepare`` runs on Ray Data: the caller starts Ray first.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.prepare import PrepareConfig

SPLITS = ("train", "val", "test")
# The generators' defaults less the templates: at the demo's budget, "a photo of a {}." copies of phrases
# crowd out phrases of other targets (val mean IoU 0.508 with them vs 0.535 without, 700 steps; README).
# On scenes the recomposition and relation rewrites find nothing unambiguous, so that leaves negatives.
DEMO_PROMPT_RATES = {"template": 0.0, "recomposed": 0.5, "relation_rewrite": 1.0, "negative": 0.2}
# The test split's only synthetic prompts: negatives (a phrase of another test image that names nothing in
# this one), at train's rate, so the report gives the no-target accuracy (official/negative/empty_rate).
# They are kept apart from the positives' metrics: official/count and mean IoU score the scenes' phrases only.
DEMO_TEST_PROMPT_RATES = {"template": 0.0, "recomposed": 0.0, "relation_rewrite": 0.0, "negative": 0.2}
SPLIT_PROMPT_RATES: dict[str, dict[str, float] | None] = {
    "train": DEMO_PROMPT_RATES,
    "val": None,  # none: validation picks the threshold on the scenes' phrases alone
    "test": DEMO_TEST_PROMPT_RATES,
}


def demo_prepare_configs(
    root: str | Path, *, seed: int, shard_samples: int = 200, progress_every: float = 5.0
) -> dict[str, PrepareConfig]:
    """The ``prepare`` job of each split: synthetic prompts at :data:`DEMO_PROMPT_RATES` on train, negatives
    only (:data:`DEMO_TEST_PROMPT_RATES`) on test, none on val (:data:`SPLIT_PROMPT_RATES`)."""
    root = Path(root)
    return {
        split: PrepareConfig(
            source="scenes",
            root=str(root / "scenes"),
            split=split,
            out=str(root / "shards" / split),
            synthetic_prompts=SPLIT_PROMPT_RATES[split] is not None,
            prompt_rates=SPLIT_PROMPT_RATES[split],
            seed=seed,
            shard_samples=shard_samples,
            progress_every=progress_every,
        )
        for split in SPLITS
    }


def demo_data_paths(root: str | Path) -> dict[str, str]:
    root = Path(root)
    paths = {split: str(root / "shards" / split) for split in SPLITS}
    return paths | {"scenes": str(root / "scenes"), "clip": str(root / "tiny-clip")}


def build_demo_data(
    directory: str | Path,
    *,
    images: int = 2000,
    image_size: int = 128,
    seed: int = 0,
    shard_samples: int = 200,
    progress_every: float = 5.0,
    reuse: bool = False,
    label: str = "demo",
    log: Callable[[str], None] = print,
    stage: Callable[[str], None] = lambda name: None,
) -> dict[str, Any]:
    """Build the demo data under ``directory``; returns its paths (``train``, ``val``, ``test``, ``scenes``,
    ``clip``) and ``scene_summary`` (``write_scenes``' summary; None when reused).

    ``reuse``: keep a folder a previous call completed (every split's manifest and the CLIP) as it is.
    ``label`` prefixes this builder's own lines. ``stage(name)`` is called as ``"scenes"`` and ``"prepare"`` finish, for callers that time them.
    """
    from pipeline.manifest import is_complete
    from pipeline.prepare import run_prepare
    from pipeline.scenes import write_scenes
    from segvlm.backbone import make_tiny_clip
    from segvlm.tokenizer import DEFAULT_TINY_WORDS

    root = Path(directory).resolve()
    out: dict[str, Any] = demo_data_paths(root)
    if reuse and all(is_complete(out[s]) for s in SPLITS) and (Path(out["clip"]) / "config.json").exists():
        log(f"[{label}] reusing the demo data in {root}")
        return out | {"scene_summary": None}
    root.mkdir(parents=True, exist_ok=True)
    log(f"[{label}] rendering {images} synthetic scenes ({image_size} px) into {out['scenes']}")
    scene_summary = write_scenes(out["scenes"], n_images=images, seed=seed, size=image_size)
    stage("scenes")
    configs = demo_prepare_configs(
        root, seed=seed, shard_samples=shard_samples, progress_every=progress_every
    )
    for config in configs.values():
        run_prepare(config, log=log, cpus=os.cpu_count())
    stage("prepare")
    # the tiny vocabulary covers every scene word (segvlm.vocabulary); sorted, as the demo always built it
    make_tiny_clip(out["clip"], words=sorted(DEFAULT_TINY_WORDS), seed=seed)
    return out | {"scene_summary": scene_summary}
