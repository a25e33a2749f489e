"""``jobs.evaluation.evaluate`` on targets with RLEs and on no-target expressions, against hand-computed
numbers, and the official PNGs scored back from disk (no Ray)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from jobs.evaluation import evaluate, score_official_pngs
from pipeline.loader import make_eval_loader
from tests.pipeline.test_loader import fake_tokenize
from tests.pipeline.test_loader_rle import write_rle_shards

# ground-truth areas at the original size (128×96) of the tasks of tests/pipeline/test_loader_rle.py
AREA = {"rle": 32 * 64, "mixed": 23 * 31 + 24 * 32, "poly": 23 * 31}
PIXELS = 128 * 96


class ConstantLogits(torch.nn.Module):
    """A model that predicts everything (``logit > 0``) or nothing, whatever the image and phrase: the
    masks it yields are known, so every metric can be computed by hand."""

    def __init__(self, logit: float) -> None:
        super().__init__()
        self.logit = logit

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        b, _, s, _ = pixel_values.shape
        return torch.full((b, 1, s, s), self.logit)


def run(folder: Path, logit: float, official_dir: Path | None = None) -> dict[str, float]:
    loader = make_eval_loader(folder, split="val", batch_size=3, image_size=32, tokenizer=fake_tokenize)
    return evaluate(ConstantLogits(logit), loader, official_dir=official_dir).metrics.compute()


def test_everything_predicted(tmp_path: Path) -> None:
    write_rle_shards(tmp_path / "shards", 2, negative=True)
    r = run(tmp_path / "shards", 8.0, official_dir=tmp_path / "pngs")
    areas = [AREA["rle"], AREA["mixed"], AREA["poly"]]
    # RefCOCO: the 3 targeted tasks of each image, IoU = area / image; the no-target ones counted apart
    assert r["refcoco/count"] == 6 and r["refcoco/no_target_count"] == 2
    assert r["refcoco/mean_iou"] == pytest.approx(sum(areas) / 3 / PIXELS)
    assert r["refcoco/overall_iou"] == pytest.approx(sum(areas) / (3 * PIXELS))
    # gRefCOCO: + the no-target expression (predicted non-empty: IoU 0, N-acc miss, ΣU += the image);
    # the synthetic negatives are not part of it
    assert r["grefcoco/count"] == 8 and r["grefcoco/no_target_count"] == 2
    assert r["grefcoco/giou"] == pytest.approx(sum(areas) / PIXELS / 4)
    assert r["grefcoco/ciou"] == pytest.approx(sum(areas) / (4 * PIXELS))
    assert r["grefcoco/n_acc"] == 0.0 and r["grefcoco/t_acc"] == 1.0
    # PhraseCut: targeted tasks only (IoU > 0), the no-target and the negative tasks apart
    assert r["official/count"] == 6 and r["official/negative/count"] == 4
    assert r["official/negative/empty_rate"] == 0.0
    assert r["official/mean_iou"] == pytest.approx(r["refcoco/mean_iou"])
    # the PNGs on disk, scored as the PhraseCut evaluator does (ground truth = polygons ∪ RLEs), agree
    official = score_official_pngs(tmp_path / "pngs", tmp_path / "shards", split="val")
    for key in ("official/mean_iou", "official/cum_iou", "official/count", "official/negative/count"):
        assert official[key] == pytest.approx(r[key], rel=1e-12), key


def test_nothing_predicted(tmp_path: Path) -> None:
    write_rle_shards(tmp_path, 2, negative=True)
    r = run(tmp_path, -8.0)
    assert r["refcoco/mean_iou"] == 0.0 and r["refcoco/overall_iou"] == 0.0 and r["refcoco/pr@0.5"] == 0.0
    # each image: 3 targeted tasks at IoU 0 and one no-target expression at IoU 1 (empty on empty)
    assert r["grefcoco/giou"] == pytest.approx(1 / 4) and r["grefcoco/ciou"] == 0.0
    assert r["grefcoco/n_acc"] == 1.0 and r["grefcoco/t_acc"] == 0.0
    assert r["official/negative/empty_rate"] == 1.0 and r["official/mean_iou"] == 0.0
