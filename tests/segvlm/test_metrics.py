"""Metrics: official PhraseCut, CLIPSeg protocol, boundary F — all against hand-computed values."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from jobs.common import to_json
from segvlm.masks import rasterize_polygons
from segvlm.metrics import (
    CLIPSEG_THRESHOLDS,
    HEADLINE_METRICS,
    PROTOCOLS,
    SWEEP_THRESHOLDS,
    BoundaryFScore,
    ClipSegMetrics,
    EvalMetrics,
    GRefCocoMetrics,
    PhraseCutMetrics,
    RefCocoMetrics,
    ThresholdSweep,
    boundary_f_score,
    format_dataset_table,
    format_markdown_table,
    lead_with_protocol,
    official_iou,
    protocol_for_source,
    seg2bmap,
    simpson_avg,
)


def mask(h: int, w: int, pixels: list[tuple[int, int]]) -> np.ndarray:
    m = np.zeros((h, w), dtype=bool)
    for y, x in pixels:
        m[y, x] = True
    return m


def square(h: int, w: int, top: int, left: int, size: int) -> np.ndarray:
    m = np.zeros((h, w), dtype=bool)
    m[top : top + size, left : left + size] = True
    return m


# ------------------------------------------------------------------------------------------ official
def test_iou_exactly_half_not_counted_in_pr05() -> None:
    gt = mask(10, 10, [(0, 0), (0, 1), (0, 2), (0, 3)])  # 4 px
    pred = mask(10, 10, [(0, 0), (0, 1)])  # 2 px inside: I = 2, U = 4
    m = PhraseCutMetrics()
    assert m.update(pred, gt, phrase_type="name", num_instances=1) == 0.5
    gt2 = mask(10, 10, [(1, x) for x in range(5)])  # 5 px
    pred2 = mask(10, 10, [(1, x) for x in range(3)])  # I = 3, U = 5 → 0.6
    assert m.update(pred2, gt2, phrase_type="name", num_instances=1) == pytest.approx(0.6)
    r = m.compute()
    assert r["official/pr@0.5"] == 0.5  # 0.5 is not > 0.5; 0.6 is
    assert r["official/pr@0.6"] == 0.0  # 0.6 is not > 0.6
    assert r["official/pr@0.9"] == 0.0
    assert r["official/count"] == 2


def test_empty_prediction_empty_target() -> None:
    empty = np.zeros((6, 6), dtype=bool)
    assert official_iou(0, 0) == 0.0  # official: I == 0 → IoU 0, even when U == 0
    m = PhraseCutMetrics()
    # default: empty GT = a negative, kept out of the official numbers
    assert m.update(empty, empty, phrase_type=None, num_instances=0) == 0.0
    m.update(mask(6, 6, [(2, 2)]), empty, phrase_type=None, num_instances=0)  # a false positive
    r = m.compute()
    assert r["official/count"] == 0 and math.isnan(r["official/mean_iou"])
    assert r["official/negative/count"] == 2
    assert r["official/negative/empty_rate"] == 0.5
    # negative=False evaluates it the official way: IoU 0, size "small", counted in "all"
    m2 = PhraseCutMetrics()
    m2.update(empty, empty, phrase_type="name", num_instances=1, negative=False)
    r2 = m2.compute()
    assert r2["official/count"] == 1 and r2["official/mean_iou"] == 0.0
    assert math.isnan(r2["official/cum_iou"])  # ΣU = 0: undefined
    assert r2["official/small/count"] == 1 and r2["official/negative/count"] == 0


def test_cumulative_vs_mean_iou() -> None:
    m = PhraseCutMetrics()
    m.update_iu(1, 2, phrase_type="name", num_instances=1, area_fraction=0.1)  # 0.5
    m.update_iu(9, 10, phrase_type="name", num_instances=1, area_fraction=0.1)  # 0.9
    m.update_iu(0, 4, phrase_type="name", num_instances=1, area_fraction=0.1)  # 0
    r = m.compute()
    assert r["official/mean_iou"] == pytest.approx((0.5 + 0.9 + 0.0) / 3)
    assert r["official/cum_iou"] == pytest.approx(10 / 16)
    assert r["official/pr@0.5"] == pytest.approx(1 / 3)
    assert r["official/pr@0.8"] == pytest.approx(1 / 3)


def test_subsets_routed() -> None:
    m = PhraseCutMetrics()
    h = w = 10  # 100 px: small < 2 px, large > 20 px
    # area 1 px (0.01, small), single, name
    m.update(mask(h, w, [(0, 0)]), mask(h, w, [(0, 0)]), phrase_type="name", num_instances=1)
    # area 2 px (0.02: not < 0.02 → medium), multiple, attribute
    gt = mask(h, w, [(1, 0), (1, 1)])
    m.update(gt, gt, phrase_type="attribute", num_instances=3)
    # area 20 px (0.2: not > 0.2 → medium), relation, 0 instances (neither single nor multiple)
    gt = np.zeros((h, w), dtype=bool)
    gt[:2] = True
    m.update(np.zeros_like(gt), gt, phrase_type="relation", num_instances=0, negative=False)
    # area 21 px (large), verbose, single; IoU 0.5
    gt = np.zeros((h, w), dtype=bool)
    gt.flat[:21] = True
    pred = gt.copy()
    pred.flat[21:42] = True
    m.update(pred, gt, phrase_type="verbose", num_instances=1)
    r = m.compute()
    assert r["official/count"] == 4
    for name, count in [("name", 1), ("attribute", 1), ("relation", 1), ("verbose", 1)]:
        assert r[f"official/{name}/count"] == count
    assert (r["official/small/count"], r["official/medium/count"], r["official/large/count"]) == (1, 2, 1)
    assert (r["official/single/count"], r["official/multiple/count"]) == (2, 1)
    assert r["official/relation/mean_iou"] == 0.0
    assert r["official/large/mean_iou"] == 0.5
    assert r["official/large/pr@0.5"] == 0.0
    assert r["official/medium/mean_iou"] == 0.5  # (1 + 0) / 2
    assert r["official/medium/cum_iou"] == pytest.approx(2 / 22)
    with pytest.raises(ValueError):
        m.update_iu(1, 1, phrase_type="adjective", num_instances=1, area_fraction=0.1)


def _random_tasks(n: int, seed: int) -> list[tuple[np.ndarray, np.ndarray, str | None, int]]:
    rng = np.random.default_rng(seed)
    tasks = []
    for i in range(n):
        gt = rng.random((12, 16)) > rng.uniform(0.5, 1.0)
        pred = gt ^ (rng.random((12, 16)) > 0.85)
        tasks.append((pred, gt, (None, "name", "attribute", "relation", "verbose")[i % 5], i % 4))
    return tasks


def test_merge_halves_equals_one_pass_and_vector_round_trip() -> None:
    tasks = _random_tasks(10, seed=0)
    rng = np.random.default_rng(1)
    probs = rng.random((10, 8, 8)).astype(np.float32)
    gts = rng.random((10, 8, 8)) > 0.6

    def run(idx: range) -> EvalMetrics:
        m = EvalMetrics()
        for i in idx:
            pred, gt, ptype, n = tasks[i]
            m.update(pred, gt, phrase_type=ptype, num_instances=n, prob=probs[i], prob_gt=gts[i])
        return m

    full, first, second = run(range(10)), run(range(5)), run(range(5, 10))
    # what an all-reduce(SUM) does: add the vectors, load the sum
    summed = EvalMetrics().from_vector(torch.from_numpy(first.to_vector() + second.to_vector()))
    merged = run(range(5)).merge(second)
    expect = full.compute()
    for got in (summed.compute(), merged.compute()):
        assert got.keys() == expect.keys()
        for k, v in expect.items():
            assert (math.isnan(v) and math.isnan(got[k])) or got[k] == pytest.approx(v, rel=1e-12), k
    # fixed layout: keys/shapes do not depend on the data
    assert full.vector_size() == EvalMetrics().vector_size() == full.to_vector().size
    assert {k: v.shape for k, v in full.state().items()} == {
        k: v.shape for k, v in EvalMetrics().state().items()
    }
    assert all(v.dtype == np.float64 for v in full.state().values())
    with pytest.raises(ValueError):
        EvalMetrics().from_vector(np.zeros(3))
    # an empty collection reports the same keys, rates undefined
    empty = EvalMetrics().compute()
    assert empty.keys() == expect.keys()
    assert (
        math.isnan(empty["clipseg/iou_fg"])
        and math.isnan(empty["boundary/f"])
        and empty["official/count"] == 0
    )


# --------------------------------------------------------------------------------- threshold sweep
def test_threshold_sweep_hand_case() -> None:
    sweep = ThresholdSweep([0.3, 0.5, 0.7])
    prob = np.array([[0.9, 0.6, 0.4], [0.2, 0.55, 0.8]], dtype=np.float32)
    gt = np.array([[1, 1, 0], [0, 0, 0]], dtype=bool)
    # > 0.3: 5 px predicted, I = 2, U = 5 → 0.4; > 0.5: 4 px, I = 2, U = 4 → 0.5; > 0.7: 2 px, I = 1, U = 3
    np.testing.assert_allclose(sweep.update(prob, gt), [0.4, 0.5, 1 / 3], rtol=1e-12)
    # a second task the model misses at every threshold: I = 0 → IoU 0 (the official rule)
    np.testing.assert_array_equal(sweep.update(np.zeros((2, 2), np.float32), np.eye(2, dtype=bool)), 0.0)
    out = sweep.compute()
    assert out["calibration/mean_iou@0.3"] == pytest.approx(0.2)
    assert out["calibration/mean_iou@0.5"] == pytest.approx(0.25)
    assert out["calibration/mean_iou@0.7"] == pytest.approx(1 / 6)
    assert out["calibration/threshold"] == 0.5 and out["calibration/mean_iou"] == pytest.approx(0.25)

    tie = ThresholdSweep([0.4, 0.6])
    tie.update(np.array([[0.9, 0.1]], np.float32), np.array([[1, 0]], bool))
    assert tie.compute()["calibration/threshold"] == 0.4  # equal IoU: the lowest threshold

    # compared as float32, like ``probabilities > t`` on a float32 tensor: float32(0.2) is not above 0.2
    edge = ThresholdSweep([0.2])
    prob = np.array([[0.2, 0.9]], np.float32)
    torch_pred = (torch.from_numpy(prob) > 0.2).numpy()
    assert torch_pred.tolist() == [[False, True]]
    assert edge.update(prob, np.ones((1, 2), bool))[0] == 0.5

    empty = ThresholdSweep().compute()
    assert math.isnan(empty["calibration/mean_iou"]) and empty["calibration/threshold"] == 0.5
    with pytest.raises(ValueError, match="increasing"):
        ThresholdSweep([0.5, 0.3])
    with pytest.raises(ValueError, match="differ in size"):
        ThresholdSweep().update(np.zeros((2, 2)), np.zeros((2, 3), bool))


def test_threshold_sweep_equals_the_official_mean_iou_at_each_threshold() -> None:
    rng = np.random.default_rng(3)
    probs = rng.random((12, 9, 11)).astype(np.float32)
    gts = rng.random((12, 9, 11)) > 0.7
    metrics = EvalMetrics()
    for prob, gt in zip(probs, gts):
        metrics.update(prob > 0.5, gt, phrase_type="name", num_instances=1, prob_full=prob)
    # a negative (empty target) is scored apart, as by the official metrics: not in the sweep either
    metrics.update(
        probs[0] > 0.5,
        np.zeros((9, 11), bool),
        phrase_type=None,
        num_instances=0,
        negative=True,
        prob_full=probs[0],
    )
    out = metrics.compute()
    assert out["official/mean_iou"] == pytest.approx(out["calibration/mean_iou@0.5"], rel=1e-12)
    best = max(SWEEP_THRESHOLDS, key=lambda t: (out[f"calibration/mean_iou@{t:g}"], -t))
    assert out["calibration/threshold"] == best
    for t in SWEEP_THRESHOLDS:
        official = PhraseCutMetrics()
        for prob, gt in zip(probs, gts):
            pred = (torch.from_numpy(prob) > t).numpy()
            official.update(pred, gt, phrase_type="name", num_instances=1)
        expected = official.compute()["official/mean_iou"]
        assert out[f"calibration/mean_iou@{t:g}"] == pytest.approx(expected, rel=1e-12), t


# ------------------------------------------------------------------------------------------- CLIPSeg
def test_clipseg_hand_case() -> None:
    probs = np.array(
        [[[0.95, 0.45], [0.25, 0.05]], [[0.75, 0.15], [0.35, 0.01]]],
        dtype=np.float32,
    )
    gts = np.array([[[1, 1], [0, 0]], [[1, 0], [0, 1]]], dtype=bool)
    m = ClipSegMetrics()
    m.update(torch.from_numpy(probs), torch.from_numpy(gts))
    r = m.compute()
    assert len(CLIPSEG_THRESHOLDS) == 49 and r["clipseg/threshold"] == pytest.approx(0.3)
    # t = 0.3: sample A → TP 2, FP 0, FN 0; sample B → TP 1 (0.75), FP 1 (0.35), FN 1 (0.01)
    assert r["clipseg/iou_fg"] == pytest.approx(3 / (1 + 3 + 1 + 1))
    assert r["clipseg/miou"] == pytest.approx((2 / (1 + 2) + 1 / (1 + 1 + 1 + 1)) / 2)
    # best over thresholds: t ∈ [0.36, 0.44] → ΣTP 3, ΣFP 0, ΣFN 1 → 3/5 (first such t: 0.36)
    assert r["clipseg/iou_fg_best"] == pytest.approx(3 / 5)
    assert r["clipseg/iou_fg_best_t"] == pytest.approx(0.36)
    assert r["clipseg/miou_best"] == pytest.approx((2 / 3 + 1 / 3) / 2)
    # PR points (recall = TP/(1+4), precision = TP/(1+TP+FP)): recall 3/5 with precisions 3/8 … 3/4,
    # (2/5, 2/3), (1/5, 1/2); best precision per recall → Simpson over 3 equally spaced points
    expected_ap = 0.2 / 3 * (1 / 2 + 4 * (2 / 3) + 3 / 4)
    assert r["clipseg/ap"] == pytest.approx(expected_ap)
    curve = m.pr_curve()
    j = int(np.argmin(np.abs(curve["threshold"] - 0.3)))
    assert curve["precision"][j] == pytest.approx(3 / 5) and curve["recall"][j] == pytest.approx(3 / 5)
    assert np.isnan(curve["precision"][-1])  # nothing predicted above 0.98
    # numpy input, one sample at a time, gives the same sums
    m2 = ClipSegMetrics()
    for p, g in zip(probs, gts):
        m2.update(p, g)
    np.testing.assert_array_equal(m2.to_vector(), m.to_vector())


def test_clipseg_strict_threshold() -> None:
    m = ClipSegMetrics()
    m.update(np.array([[[0.3, 0.31]]], dtype=np.float32), np.array([[[True, True]]]))
    # at t = 0.3 only 0.31 counts (p > t): TP 1, FN 1
    assert m.compute()["clipseg/iou_fg"] == pytest.approx(1 / (1 + 1 + 0 + 1))


def test_simpson_avg() -> None:
    x = np.array([0.0, 0.5, 1.0])
    assert simpson_avg(x**2, x) == pytest.approx(1 / 3)  # Simpson is exact for quadratics
    # even N = 4 on y = x: Simpson and trapezoid are both exact → 1/2
    x4 = np.array([0.0, 0.2, 0.5, 1.0])
    assert simpson_avg(x4, x4) == pytest.approx(0.5)
    # even N = 2: trapezoid
    assert simpson_avg(np.array([1.0, 3.0]), np.array([0.0, 2.0])) == pytest.approx(4.0)


# ------------------------------------------------------------------------------------------ boundary
def test_seg2bmap_ring() -> None:
    b = seg2bmap(square(8, 8, 2, 2, 3))  # square rows/cols 2..4 → ring of the box rows/cols 1..4
    expected = np.zeros((8, 8), dtype=bool)
    expected[1, 1:5] = expected[4, 1:5] = expected[1:5, 1] = expected[1:5, 4] = True
    np.testing.assert_array_equal(b, expected)
    assert not seg2bmap(np.ones((5, 5), dtype=bool)).any()  # the image border is no boundary


def test_boundary_f_shifted_square() -> None:
    gt = square(20, 20, 5, 5, 8)
    f, p, r = boundary_f_score(square(20, 20, 5, 6, 8), gt, radius=2)
    assert (f, p, r) == (1.0, 1.0, 1.0)
    # shift by 5 px: rings are the 9×9 boxes cols 4..12 and 9..17 (32 px each). Within 2 px of the other:
    # top and bottom rows 6 px each, the near vertical side 4 px (2 next to each corner), far side 0 → 16/32.
    f, p, r = boundary_f_score(square(20, 20, 5, 10, 8), gt, radius=2)
    assert (p, r) == (0.5, 0.5) and f == 0.5
    m = BoundaryFScore(tolerance_px=2)
    m.update(np.stack([square(20, 20, 5, 6, 8), square(20, 20, 5, 10, 8)]), np.stack([gt, gt]))
    assert m.compute() == {
        "boundary/f": 0.75,
        "boundary/precision": 0.75,
        "boundary/recall": 0.75,
        "boundary/count": 2,
    }


def test_boundary_empty_cases_and_davis_tolerance() -> None:
    empty = np.zeros((10, 10), dtype=bool)
    sq = square(10, 10, 2, 2, 4)
    assert boundary_f_score(empty, sq, 2) == (0.0, 1.0, 0.0)
    assert boundary_f_score(sq, empty, 2) == (0.0, 0.0, 1.0)
    assert boundary_f_score(empty, empty, 2) == (1.0, 1.0, 1.0)
    assert BoundaryFScore(tolerance_diag=0.008).radius(352, 352) == 4  # ceil(0.008 · 497.8)
    assert BoundaryFScore(tolerance_diag=0.008).radius(375, 500) == 5  # ceil(0.008 · 625)


# -------------------------------------------------------------------------------- rasterisation / report
def test_rasterize_matches_hand_drawn_masks() -> None:
    triangle = [[[0.0, 0.0], [4.0, 0.0], [0.0, 4.0]]]
    rectangle = [[[1.9, 1.2], [4.7, 1.0], [4.2, 3.9], [1.0, 3.5]]]  # int-cast → (1,1), (4,1), (4,3), (1,3)
    single_point = [[[5.0, 5.0]]]  # fewer than 2 points: skipped
    expected_triangle = np.array(
        [
            [1, 1, 1, 1, 1, 0, 0],
            [1, 1, 1, 1, 0, 0, 0],
            [1, 1, 1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0, 0],
            [1, 0, 0, 0, 0, 0, 0],
            [0, 0, 0, 0, 0, 0, 0],
        ],
        dtype=np.uint8,
    )
    expected_rectangle = np.zeros((6, 7), dtype=np.uint8)
    expected_rectangle[1:4, 1:5] = 1  # rows 1..3, cols 1..4 inclusive (outline=1 draws the edges)
    np.testing.assert_array_equal(rasterize_polygons([triangle], 7, 6), expected_triangle)
    np.testing.assert_array_equal(rasterize_polygons([rectangle, single_point], 7, 6), expected_rectangle)
    union = rasterize_polygons([triangle, rectangle], 7, 6)
    np.testing.assert_array_equal(union, expected_triangle | expected_rectangle)
    # the official protocol on rasterised GT: pred = triangle, GT = triangle ∪ rectangle
    m = PhraseCutMetrics()
    iou = m.update(expected_triangle, union, phrase_type="name", num_instances=2)
    assert iou == pytest.approx(expected_triangle.sum() / union.sum())
    assert m.compute()["official/multiple/count"] == 1


def test_format_markdown_table() -> None:
    m = PhraseCutMetrics()
    m.update_iu(1, 2, phrase_type="name", num_instances=1, area_fraction=0.1)
    table = format_markdown_table({**m.compute(), "clipseg/ap": 0.5})
    lines = table.splitlines()
    assert (
        "| subset | mean_iou | cum_iou | pr@0.5 | pr@0.6 | pr@0.7 | pr@0.8 | pr@0.9 | count | empty_rate |"
        in lines
    )
    assert "| all | 0.5000 | 0.5000 | 0.0000 | 0.0000 | 0.0000 | 0.0000 | 0.0000 | 1 |  |" in lines
    assert "| verbose | – | – | – |  |  |  |  | 0 |  |" in lines
    assert lines[lines.index("**clipseg**") + 4] == "| all | 0.5000 |"
    assert "| all | 50.00 |" in format_markdown_table({"clipseg/ap": 0.5}, percent=True)
    # a report read back from strict JSON holds null where a metric is undefined
    from_json = json.loads(to_json(m.compute()))
    assert from_json["official/negative/empty_rate"] is None
    assert format_markdown_table(from_json) == format_markdown_table(m.compute())


# ------------------------------------------------------------------------------ RefCOCO and gRefCOCO
def test_refcoco_protocol_hand_case_and_pr_boundary() -> None:
    m = RefCocoMetrics()
    gt = mask(10, 10, [(0, x) for x in range(4)])  # 4 px
    assert m.update(mask(10, 10, [(0, 0), (0, 1)]), gt) == 0.5  # I = 2, U = 4: exactly 0.5
    gt2 = mask(10, 10, [(1, x) for x in range(5)])  # 5 px
    pred2 = mask(10, 10, [(1, x) for x in range(3)] + [(2, 0)])  # I = 3, U = 6
    assert m.update(pred2, gt2) == 0.5
    gt3 = mask(10, 10, [(3, x) for x in range(10)])  # 10 px
    assert m.update(gt3, gt3) == 1.0  # I = U = 10
    assert math.isnan(m.update(mask(10, 10, [(9, 9)]), np.zeros((10, 10), bool)))  # no target: apart
    r = m.compute()
    assert r["refcoco/count"] == 3 and r["refcoco/no_target_count"] == 1
    assert r["refcoco/mean_iou"] == pytest.approx((0.5 + 0.5 + 1.0) / 3)
    assert r["refcoco/overall_iou"] == pytest.approx((2 + 3 + 10) / (4 + 6 + 10))  # ΣI / ΣU = 15/20
    assert r["refcoco/pr@0.5"] == 1.0  # IoU >= t: the two tasks at exactly 0.5 count
    assert r["refcoco/pr@0.6"] == pytest.approx(1 / 3) and r["refcoco/pr@0.9"] == pytest.approx(1 / 3)
    # 0.6 exactly (I = 3, U = 5) counts at 0.6 too
    m2 = RefCocoMetrics()
    m2.update(mask(10, 10, [(1, x) for x in range(3)]), gt2)
    assert m2.compute()["refcoco/pr@0.6"] == 1.0 and m2.compute()["refcoco/pr@0.7"] == 0.0
    empty = RefCocoMetrics().compute()
    assert math.isnan(empty["refcoco/overall_iou"]) and math.isnan(empty["refcoco/pr@0.5"])
    assert empty.keys() == r.keys()


def test_grefcoco_protocol_hand_case() -> None:
    empty = np.zeros((6, 6), bool)
    m = GRefCocoMetrics()
    assert m.update(empty, empty) == 1.0  # no target, predicted empty: N-acc hit, IoU 1, adds I = U = 0
    assert m.update(mask(6, 6, [(0, 0), (0, 1), (0, 2)]), empty) == 0.0  # N-acc miss, U += 3
    gt = mask(6, 6, [(2, x) for x in range(4)])  # 4 px
    assert m.update(mask(6, 6, [(2, 0), (2, 1)]), gt) == 0.5  # T-acc hit, I = 2, U = 4
    gt2 = mask(6, 6, [(4, x) for x in range(5)])  # 5 px
    assert m.update(empty, gt2) == 0.0  # T-acc miss: I = 0, U = 5
    r = m.compute()
    assert r["grefcoco/giou"] == pytest.approx((1 + 0 + 0.5 + 0) / 4)
    assert r["grefcoco/ciou"] == pytest.approx((0 + 0 + 2 + 0) / (0 + 3 + 4 + 5))
    assert r["grefcoco/n_acc"] == 0.5 and r["grefcoco/t_acc"] == 0.5
    assert r["grefcoco/count"] == 4 and r["grefcoco/no_target_count"] == 2
    # only empty/empty: gIoU 1, N-acc 1; cIoU (ΣU = 0) and T-acc (no targeted task) undefined
    only = GRefCocoMetrics()
    only.update(empty, empty)
    o = only.compute()
    assert o["grefcoco/giou"] == 1.0 and o["grefcoco/n_acc"] == 1.0
    assert math.isnan(o["grefcoco/ciou"]) and math.isnan(o["grefcoco/t_acc"])
    assert o.keys() == r.keys()
    with pytest.raises(ValueError, match="differ in size"):
        m.update(np.zeros((3, 3), bool), np.zeros((3, 4), bool))


def test_protocols_merge_and_vector_round_trip() -> None:
    rng = np.random.default_rng(3)
    tasks = []
    for i in range(12):
        gt = (rng.random((8, 9)) > 0.6) if i % 3 else np.zeros((8, 9), bool)  # every third: no target
        pred = (gt ^ (rng.random((8, 9)) > 0.8)) if i % 4 else np.zeros((8, 9), bool)
        tasks.append((pred, gt))
    for cls in (RefCocoMetrics, GRefCocoMetrics):
        full, first, second = cls(), cls(), cls()
        for i, (pred, gt) in enumerate(tasks):
            full.update(pred, gt)
            (first if i < 5 else second).update(pred, gt)
        summed = cls().from_vector(torch.from_numpy(first.to_vector() + second.to_vector()))
        for got in (summed.compute(), first.merge(second).compute()):
            expect = full.compute()
            assert got.keys() == expect.keys()
            for k, v in expect.items():
                assert (math.isnan(v) and math.isnan(got[k])) or got[k] == pytest.approx(v, rel=1e-12), k


def test_eval_metrics_routes_no_target_tasks_by_protocol() -> None:
    """A dataset's own no-target expression is scored by gRefCOCO (and counted by RefCOCO); a synthetic
    negative is not; PhraseCut keeps both apart; the state vector carries the new protocols."""
    empty = np.zeros((5, 5), bool)
    gt = square(5, 5, 0, 0, 2)  # 4 px
    m = EvalMetrics()
    m.update(square(5, 5, 0, 0, 1), gt, phrase_type="name", num_instances=1)  # I = 1, U = 4
    m.update_no_target(empty, empty, synthetic=False)  # gRefCOCO: hit, IoU 1
    m.update_no_target(square(5, 5, 3, 3, 1), empty, synthetic=True)  # synthetic: official only
    r = m.compute()
    assert r["official/count"] == 1 and r["official/negative/count"] == 2
    assert r["official/negative/empty_rate"] == 0.5
    assert r["grefcoco/count"] == 2 and r["grefcoco/giou"] == pytest.approx((0.25 + 1) / 2)
    assert r["grefcoco/ciou"] == pytest.approx(1 / 4) and r["grefcoco/n_acc"] == 1.0
    assert r["refcoco/count"] == 1 and r["refcoco/no_target_count"] == 1
    assert r["refcoco/mean_iou"] == 0.25 and r["boundary/count"] == 1
    # a negative passed through update (negative=True) stays out of both new protocols
    m.update(empty, empty, phrase_type=None, num_instances=0, negative=True)
    assert m.compute()["grefcoco/count"] == 2
    again = EvalMetrics().from_vector(m.to_vector())
    assert again.compute() == pytest.approx(m.compute(), nan_ok=True)


def test_protocol_helpers_and_dataset_table() -> None:
    assert [protocol_for_source(s) for s in ("refcoco", "refcoco+", "refcocog", "grefcoco")] == [
        "refcoco",
        "refcoco",
        "refcoco",
        "grefcoco",
    ]
    assert protocol_for_source("phrasecut") == protocol_for_source("scenes") == "phrasecut"
    metrics = {"official/mean_iou": 0.1, "threshold": 0.5, "grefcoco/giou": 0.2, "grefcoco/count": 3.0}
    led = lead_with_protocol(metrics, "grefcoco")
    assert list(led) == ["grefcoco/giou", "grefcoco/count", "official/mean_iou", "threshold"]
    assert format_markdown_table(led).startswith("**grefcoco**")
    with pytest.raises(ValueError, match="protocol"):
        lead_with_protocol(metrics, "coco")
    assert HEADLINE_METRICS["refcoco"][-1] == "refcoco/count" and set(HEADLINE_METRICS) == set(PROTOCOLS)
    rows = [
        {"dataset": "a", "protocol": "grefcoco", "grefcoco/giou": 0.25, "grefcoco/count": 12.0},
        {"dataset": "b", "protocol": "refcoco", "refcoco/mean_iou": None},
    ]
    table = format_dataset_table(
        rows, ["dataset", "protocol", "grefcoco/giou", "grefcoco/count", "refcoco/mean_iou"]
    )
    assert table.splitlines() == [
        "| dataset | protocol | grefcoco/giou | grefcoco/count | refcoco/mean_iou |",
        "|---|---|---:|---:|---:|",
        "| a | grefcoco | 0.2500 | 12 |  |",
        "| b | refcoco |  |  | – |",
    ]
