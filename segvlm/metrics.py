"""Evaluation metrics: the official PhraseCut protocol, the CLIPSeg protocol, the RefCOCO and gRefCOCO
referring-segmentation protocols and a DAVIS-style boundary F-score.

Every metric accumulates **sums only** (intersections, unions, TP/FP/FN per threshold, per-task sums, counts),
so results from several ranks combine with one ``all_reduce(SUM)`` of :meth:`Metric.to_vector` followed by
:meth:`Metric.from_vector`; :meth:`Metric.merge` does the same in-process. :meth:`Metric.compute` turns the
sums into a flat ``dict[str, float]`` with names such as ``official/mean_iou`` or ``clipseg/ap``.

Layouts: masks are H×W (or B×H×W) boolean numpy arrays; CLIPSeg probabilities are B×H×W (or B×1×H×W)
tensors or arrays in [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from segvlm.vocabulary import PHRASE_TYPES

__all__ = [
    "CLIPSEG_THRESHOLDS",
    "HEADLINE_METRICS",
    "OFFICIAL_PR_THRESHOLDS",
    "PHRASE_TYPES",
    "PROTOCOLS",
    "PROTOCOL_GROUPS",
    "SOURCE_PROTOCOLS",
    "SWEEP_THRESHOLDS",
    "BoundaryFScore",
    "ClipSegMetrics",
    "EvalMetrics",
    "GRefCocoMetrics",
    "Metric",
    "PhraseCutMetrics",
    "RefCocoMetrics",
    "ThresholdSweep",
    "boundary_f_score",
    "counts_above_thresholds",
    "format_dataset_table",
    "format_markdown_table",
    "lead_with_protocol",
    "official_iou",
    "protocol_for_source",
    "seg2bmap",
    "simpson_avg",
]

OFFICIAL_PR_THRESHOLDS: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9)
# decision thresholds ThresholdSweep scores (0.2, 0.25, …, 0.7): wide enough for a model whose probabilities
# are not calibrated to 0.5, coarse enough that the choice on a few hundred validation tasks is not noise
SWEEP_THRESHOLDS: tuple[float, ...] = tuple(round(0.2 + 0.05 * i, 2) for i in range(11))
SIZE_SUBSETS: tuple[str, ...] = ("small", "medium", "large")
INSTANCE_SUBSETS: tuple[str, ...] = ("single", "multiple")
# CLIPSeg metrics.py (FixedIntervalMetrics, n_values=51): "[1:-1] ignores 0 and 1" → 0.02, 0.04, …, 0.98.
CLIPSEG_THRESHOLDS: np.ndarray = np.linspace(0, 1, 51)[1:-1]


def _as_bool(mask: Any) -> np.ndarray:
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    return np.asarray(mask).astype(bool, copy=False)


# ------------------------------------------------------------------------------------------------ base
class Metric:
    """Common protocol: a fixed set of float64 sum arrays, mergeable and flattenable for one all-reduce.

    Subclasses define :meth:`_empty_state` (fixed keys and shapes) and :meth:`compute`.
    """

    def __init__(self) -> None:
        self._state: dict[str, np.ndarray] = self._empty_state()

    def _empty_state(self) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def reset(self) -> None:
        self._state = self._empty_state()

    def state(self) -> dict[str, np.ndarray]:
        """Copies of the sum arrays (float64), fixed keys and shapes for a given configuration."""
        return {k: v.copy() for k, v in self._state.items()}

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        for key, ref in self._state.items():
            value = np.asarray(state[key], dtype=np.float64)
            if value.shape != ref.shape:
                raise ValueError(f"{type(self).__name__}.{key}: shape {value.shape} != {ref.shape}")
            self._state[key] = value.copy()

    def merge(self, other: Metric) -> Metric:
        """Add ``other``'s sums into this metric (in place); returns ``self``."""
        if type(other) is not type(self):
            raise TypeError(f"cannot merge {type(other).__name__} into {type(self).__name__}")
        theirs = other._state
        if set(theirs) != set(self._state) or any(theirs[k].shape != v.shape for k, v in self._state.items()):
            raise ValueError(f"{type(self).__name__}: states of different configurations")
        for key in self._state:
            self._state[key] = self._state[key] + theirs[key]
        return self

    def vector_size(self) -> int:
        return sum(v.size for v in self._state.values())

    def to_vector(self) -> np.ndarray:
        """All sums as one float64 vector (keys in a fixed order) — all-reduce it with SUM."""
        if not self._state:
            return np.zeros(0, dtype=np.float64)
        return np.concatenate([v.ravel() for v in self._state.values()]).astype(np.float64)

    def from_vector(self, vec: np.ndarray | torch.Tensor) -> Metric:
        """Replace the sums with those in ``vec`` (the layout of :meth:`to_vector`); returns ``self``."""
        if isinstance(vec, torch.Tensor):
            vec = vec.detach().cpu().numpy()
        vec = np.asarray(vec, dtype=np.float64).ravel()
        if vec.size != self.vector_size():
            raise ValueError(
                f"{type(self).__name__}: vector of {vec.size} values, expected {self.vector_size()}"
            )
        offset = 0
        for key, ref in self._state.items():
            self._state[key] = vec[offset : offset + ref.size].reshape(ref.shape).copy()
            offset += ref.size
        return self

    def compute(self) -> dict[str, float]:
        raise NotImplementedError


# ----------------------------------------------------------------------------------- PhraseCut official
def official_iou(intersection: float, union: float) -> float:
    """PhraseCut's IoU: ``I / U``, and 0 whenever ``I == 0`` — which includes ``U == 0``.

    Matches ``utils/iou.py::iou_polygons_masks`` of ChenyunWu/PhraseCutDataset (``if i == 0: iou = 0``): an
    empty prediction on an empty ground truth scores 0, not 1, under the official definition.
    """
    return 0.0 if intersection == 0 else float(intersection) / float(union)


class PhraseCutMetrics(Metric):
    """The official PhraseCut evaluation (ChenyunWu/PhraseCutDataset, ``utils/evaluator.py`` + ``utils/iou.py``
    + ``utils/subset.py``), at the original image size.

    Per task: ``I = |pred ∧ gt|``, ``U = |pred ∨ gt|``, IoU by :func:`official_iou` (0 when I = 0).
    Per subset: ``mean_iou`` = mean of task IoUs; ``cum_iou`` = ΣI / ΣU; ``pr@t`` = share of tasks with IoU
    **strictly** greater than t (``np.array(ious) > thresh`` in ``Evaluator.analyze_stats``), t ∈ 0.5…0.9.

    Subsets (official name → ours), derived in :meth:`update` as in ``subset.get_subset``:

    * phrase type from ``phrase_structure["type"]``: ``p_name``/``p_att+``/``p_rel+``/``p_verbose`` →
      ``name``/``attribute``/``relation``/``verbose``;
    * size from the GT area fraction at the original size (``RefVGLoader.get_task_subset``: mask pixels /
      (w·h)): ``s_small`` < 0.02, ``s_large`` > 0.2, else ``s_mid`` → ``small``/``large``/``medium``;
    * instances from ``len(instance_boxes)``: ``i_single`` == 1, ``i_multi`` > 1 → ``single``/``multiple``
      (a task with 0 instances is in neither, as officially).

    Negatives (our synthetic prompts with an empty target; official PhraseCut has none) would score IoU 0
    whatever the prediction (I = 0), which would only dilute the official numbers. So a task is treated as
    a negative when ``negative=True`` or, by default, when its GT is empty: it is left out of ``all`` and of
    every subset, and counted in ``official/negative/count`` and ``official/negative/empty_rate`` (share of
    negatives predicted empty, the correct answer). Pass ``negative=False`` to evaluate an empty-GT task the
    official way (IoU 0, size ``small``, counted in ``all``).

    Empty subsets report ``nan`` (and ``count`` 0) so the set of keys is fixed.
    """

    subsets: tuple[str, ...] = ("all", *PHRASE_TYPES, *SIZE_SUBSETS, *INSTANCE_SUBSETS)
    small_max: float = 0.02
    large_min: float = 0.2

    def __init__(self, pr_thresholds: Iterable[float] = OFFICIAL_PR_THRESHOLDS) -> None:
        self.pr_thresholds = tuple(float(t) for t in pr_thresholds)
        self._index = {name: i for i, name in enumerate(self.subsets)}
        super().__init__()

    def _empty_state(self) -> dict[str, np.ndarray]:
        s = len(self.subsets)
        return {
            "count": np.zeros(s),
            "iou_sum": np.zeros(s),
            "intersection": np.zeros(s),
            "union": np.zeros(s),
            "pr_hits": np.zeros((s, len(self.pr_thresholds))),
            "negative": np.zeros(2),  # [count, predicted empty]
        }

    @classmethod
    def subset_tags(cls, *, phrase_type: str | None, num_instances: int, area_fraction: float) -> list[str]:
        """The subsets a (non-negative) task belongs to, ``all`` first."""
        tags = ["all"]
        if phrase_type is not None:
            if phrase_type not in PHRASE_TYPES:
                raise ValueError(f"phrase_type must be one of {PHRASE_TYPES} or None, got {phrase_type!r}")
            tags.append(phrase_type)
        if area_fraction < cls.small_max:
            tags.append("small")
        elif area_fraction > cls.large_min:
            tags.append("large")
        else:
            tags.append("medium")
        if num_instances == 1:
            tags.append("single")
        elif num_instances > 1:
            tags.append("multiple")
        return tags

    def update(
        self,
        pred: np.ndarray,
        gt: np.ndarray,
        *,
        phrase_type: str | None,
        num_instances: int,
        negative: bool | None = None,
    ) -> float:
        """Add one task: ``pred`` and ``gt`` are H×W bool masks at the original image size. Returns its IoU."""
        pred, gt = _as_bool(pred), _as_bool(gt)
        if pred.shape != gt.shape:
            raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in size")
        intersection = int(np.count_nonzero(pred & gt))
        union = int(np.count_nonzero(pred | gt))
        area = int(np.count_nonzero(gt)) / gt.size if gt.size else 0.0
        return self.update_iu(
            intersection,
            union,
            phrase_type=phrase_type,
            num_instances=num_instances,
            area_fraction=area,
            negative=negative,
        )

    def update_iu(
        self,
        intersection: float,
        union: float,
        *,
        phrase_type: str | None,
        num_instances: int,
        area_fraction: float,
        negative: bool | None = None,
    ) -> float:
        """Add one task from its already reduced I and U; ``area_fraction`` = GT pixels / image pixels.

        ``negative=None`` means "negative iff ``area_fraction == 0``". For a negative, U is the predicted area,
        so the prediction counts as empty iff ``union == 0``. Returns the task's official IoU.
        """
        if intersection < 0 or union < intersection:
            raise ValueError(f"need 0 <= I <= U, got I={intersection}, U={union}")
        if negative is None:
            negative = area_fraction == 0
        iou = official_iou(intersection, union)
        if negative:
            self._state["negative"] += (1.0, float(union == 0))
            return iou
        hits = np.array([iou > t for t in self.pr_thresholds], dtype=np.float64)
        for tag in self.subset_tags(
            phrase_type=phrase_type, num_instances=num_instances, area_fraction=area_fraction
        ):
            i = self._index[tag]
            self._state["count"][i] += 1
            self._state["iou_sum"][i] += iou
            self._state["intersection"][i] += intersection
            self._state["union"][i] += union
            self._state["pr_hits"][i] += hits
        return iou

    def compute(self) -> dict[str, float]:
        st = self._state
        out: dict[str, float] = {}
        for name, i in self._index.items():
            count = st["count"][i]
            prefix = "official/" if name == "all" else f"official/{name}/"
            mean_iou = st["iou_sum"][i] / count if count else math.nan
            # ΣU = 0 (only empty masks): the official ``np.sum(I) * 1.0 / np.sum(U)`` is 0/0 = nan; so is ours.
            cum_iou = st["intersection"][i] / st["union"][i] if st["union"][i] else math.nan
            out[prefix + "mean_iou"] = float(mean_iou)
            out[prefix + "cum_iou"] = float(cum_iou)
            # Overall: every threshold; subsets: Pr@0.5 only, to keep the tables readable.
            thresholds = self.pr_thresholds if name == "all" else self.pr_thresholds[:1]
            for j, t in enumerate(thresholds):
                out[f"{prefix}pr@{t:g}"] = float(st["pr_hits"][i, j] / count) if count else math.nan
            out[prefix + "count"] = float(count)
        neg_count, neg_empty = st["negative"]
        out["official/negative/count"] = float(neg_count)
        out["official/negative/empty_rate"] = float(neg_empty / neg_count) if neg_count else math.nan
        return out


# ------------------------------------------------------------------------------------ CLIPSeg protocol
def simpson_avg(y: np.ndarray, x: np.ndarray) -> float:
    """Composite Simpson integral of samples ``y(x)``, as ``scipy.integrate.simps(y, x)`` with the default
    ``even="avg"`` of the SciPy versions CLIPSeg used (``simps`` was removed in SciPy 1.14 and ``simpson``
    changed its even-N rule in 1.11; scipy is not a dependency here). For an odd number of samples it is
    Simpson's rule for irregular spacing; for an even number it averages (Simpson on the first N−1 samples +
    trapezoid on the last interval) and (trapezoid on the first interval + Simpson on the last N−1).
    """
    y = np.asarray(y, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    n = y.shape[0]
    if n != x.shape[0]:
        raise ValueError("x and y must have the same length")

    def basic(start: int, stop: int) -> float:
        # scipy.integrate._quadrature._basic_simps with x given; same slicing (incl. negative stops).
        h = np.diff(x)
        y0, y1, y2 = y[start:stop:2], y[start + 1 : stop + 1 : 2], y[start + 2 : stop + 2 : 2]
        h0, h1 = h[start:stop:2], h[start + 1 : stop + 1 : 2]
        if h0.size == 0 or h1.size == 0 or y2.size == 0:
            return 0.0
        hsum, hprod, ratio = h0 + h1, h0 * h1, h0 / h1
        tmp = hsum / 6.0 * (y0 * (2 - 1.0 / ratio) + y1 * hsum * hsum / hprod + y2 * (2 - ratio))
        return float(np.sum(tmp))

    if n % 2 == 1:
        return basic(0, n - 2)
    val = 0.5 * (x[-1] - x[-2]) * (y[-1] + y[-2]) if n >= 2 else 0.0
    result = basic(0, n - 3)
    val += 0.5 * (x[1] - x[0]) * (y[1] + y[0]) if n >= 2 else 0.0
    result += basic(1, n - 2)
    return (val + result) / 2.0


@torch.no_grad()
def counts_above_thresholds(
    prob: torch.Tensor, gt: torch.Tensor, thresholds: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """TP, FP and FN (each B×T float64) of the predictions ``prob > t_j`` for every sample and threshold.

    ``prob`` B×N probabilities, ``gt`` B×N bool, ``thresholds`` increasing; the comparison is made in float32,
    as ``probabilities > t`` on a float32 tensor makes it. Runs on ``prob``'s device: one bucketize and one
    bincount, and only 3×T numbers per sample come back.
    """
    b, t = prob.shape[0], len(thresholds)
    edges = torch.as_tensor(thresholds, dtype=torch.float32, device=prob.device)
    # k = number of thresholds strictly below p; the pixel is foreground at threshold j iff j < k.
    k = torch.bucketize(prob.float(), edges, right=False)
    # one bincount over (sample, gt, k): row 2·b + gt of a (2B)×(T+1) histogram
    rows = torch.arange(b, device=prob.device)[:, None] * 2 + gt.long()
    hist = torch.bincount((rows * (t + 1) + k).flatten(), minlength=2 * b * (t + 1)).reshape(b, 2, t + 1)
    neg, pos = hist[:, 0], hist[:, 1]
    # foreground count at threshold j = Σ_{k > j} hist[k]: reverse cumulative sum, drop the k = 0 bin.
    tp = pos.flip(1).cumsum(1).flip(1)[:, 1:].double().cpu().numpy()
    fp = neg.flip(1).cumsum(1).flip(1)[:, 1:].double().cpu().numpy()
    fn = pos.sum(1, keepdim=True).double().cpu().numpy() - tp
    return tp, fp, fn


class ClipSegMetrics(Metric):
    """CLIPSeg's protocol (timojl/clipseg ``metrics.py::FixedIntervalMetrics``), on probabilities at 352².

    Thresholds ``t_j`` = ``np.linspace(0, 1, 51)[1:-1]`` (0.02 … 0.98, 49 values); a pixel is predicted
    foreground at ``t_j`` iff ``p > t_j`` (strict, as ``torch.where(p > thresh)`` there; the comparison is made
    in float32 like CLIPSeg's float32 tensors against a Python float). Accumulated per threshold: global
    ΣTP, ΣFP, ΣFN and the per-sample sum of ``TP/(1+TP+FP+FN)``; plus the sample count.

    * ``iou_fg`` (CLIPSeg's ``fgiou``) = ΣTP / (1 + ΣTP + ΣFP + ΣFN) — the ``1 +`` is CLIPSeg's.
    * ``miou`` = mean over samples of TP / (1 + TP + FP + FN). CLIPSeg averages per *class*, and its PhraseCut
      dataset passes the sample index as the class (``return data_x, (seg, torch.zeros(0), i)``), so per
      class = per sample there.
    * ``ap``: precision = ΣTP/(1+ΣTP+ΣFP), recall = ΣTP/(1+ΣTP+ΣFN) at the thresholds where ΣTP+ΣFP > 0,
      duplicate (recall, precision) pairs removed, sorted by recall, integrated with Simpson's rule
      (:func:`simpson_avg` = ``scipy.integrate.simps``). One deviation: CLIPSeg keeps points that share a
      recall but differ in precision (same TP, different FP), which makes Simpson's weights divide by a zero
      spacing (nan/inf); we keep the highest precision per recall. Identical whenever recalls are distinct.

    Reported at ``report_threshold`` (default 0.3, CLIPSeg's ``fgiou_0.3``/``miou_0.3``; 0.3 lies on the grid,
    index 14; another value uses the nearest grid threshold, reported as ``clipseg/threshold``), plus the
    best over thresholds (``iou_fg_best`` with ``iou_fg_best_t``, ``miou_best``).
    """

    def __init__(self, report_threshold: float = 0.3, thresholds: np.ndarray | None = None) -> None:
        self.thresholds = np.asarray(
            CLIPSEG_THRESHOLDS if thresholds is None else thresholds, dtype=np.float64
        )
        if np.any(np.diff(self.thresholds) <= 0):
            raise ValueError("thresholds must be strictly increasing")
        self.report_index = int(np.argmin(np.abs(self.thresholds - report_threshold)))
        super().__init__()

    def _empty_state(self) -> dict[str, np.ndarray]:
        t = len(self.thresholds)
        return {
            "tp": np.zeros(t),
            "fp": np.zeros(t),
            "fn": np.zeros(t),
            "iou_sum": np.zeros(t),
            "count": np.zeros(1),
        }

    @torch.no_grad()
    def update(self, prob: torch.Tensor | np.ndarray, gt: torch.Tensor | np.ndarray) -> None:
        """Add a batch: ``prob`` B×H×W (or B×1×H×W, or H×W for one sample) in [0, 1]; ``gt`` the same shape.

        Runs on ``prob``'s device (one bucketize + bincount), only 4×49 numbers per sample come back.
        """
        p = torch.as_tensor(prob)
        g = torch.as_tensor(gt, device=p.device)
        if p.shape != g.shape:
            raise ValueError(f"prob {tuple(p.shape)} and gt {tuple(g.shape)} differ")
        if p.dim() == 2:
            p, g = p[None], g[None]
        b = p.shape[0]
        p = p.reshape(b, -1).float()
        g = g.reshape(b, -1).bool()
        tp, fp, fn = counts_above_thresholds(p, g, self.thresholds)
        st = self._state
        st["tp"] += tp.sum(0)
        st["fp"] += fp.sum(0)
        st["fn"] += fn.sum(0)
        st["iou_sum"] += (tp / (1 + tp + fp + fn)).sum(0)
        st["count"] += b

    def pr_curve(self) -> dict[str, np.ndarray]:
        """Per grid threshold: ``threshold``, ``precision``, ``recall`` (CLIPSeg's ``1 +`` formulas; ``nan``
        where nothing is predicted), for a figure; :meth:`compute`'s ``ap`` integrates these points."""
        tp, fp, fn = self._state["tp"], self._state["fp"], self._state["fn"]
        made = (tp + fp) > 0
        precision = np.where(made, tp / (1 + tp + fp), np.nan)
        recall = np.where(made, tp / (1 + tp + fn), np.nan)
        return {"threshold": self.thresholds.copy(), "precision": precision, "recall": recall}

    def average_precision(self) -> float:
        curve = self.pr_curve()
        ok = ~np.isnan(curve["precision"])
        best: dict[float, float] = {}
        for r, p in zip(curve["recall"][ok].tolist(), curve["precision"][ok].tolist()):
            best[r] = max(p, best.get(r, -math.inf))
        if len(best) < 2:
            return 0.0
        recalls = np.array(sorted(best))
        return simpson_avg(np.array([best[r] for r in recalls]), recalls)

    def compute(self) -> dict[str, float]:
        st = self._state
        count = float(st["count"][0])
        if not count:  # nothing seen: every rate is undefined (keys stay fixed)
            nan = math.nan
            return {
                **dict.fromkeys(("clipseg/iou_fg", "clipseg/miou", "clipseg/ap", "clipseg/iou_fg_best"), nan),
                **dict.fromkeys(("clipseg/iou_fg_best_t", "clipseg/miou_best"), nan),
                "clipseg/threshold": float(self.thresholds[self.report_index]),
                "clipseg/count": 0.0,
            }
        iou_fg = st["tp"] / (1 + st["tp"] + st["fp"] + st["fn"])
        miou = st["iou_sum"] / count
        j = self.report_index
        best = int(np.argmax(iou_fg))
        return {
            "clipseg/iou_fg": float(iou_fg[j]),
            "clipseg/miou": float(miou[j]),
            "clipseg/ap": self.average_precision(),
            "clipseg/iou_fg_best": float(iou_fg[best]),
            "clipseg/iou_fg_best_t": float(self.thresholds[best]),
            "clipseg/miou_best": float(np.max(miou)),
            "clipseg/threshold": float(self.thresholds[j]),
            "clipseg/count": count,
        }


# ------------------------------------------------------------------------------ RefCOCO and gRefCOCO
def _intersection_union(pred: Any, gt: Any) -> tuple[int, int, int, int]:
    """``(I, U, |pred|, |gt|)`` of two H×W masks of the same size."""
    pred, gt = _as_bool(pred), _as_bool(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in size")
    return (
        int(np.count_nonzero(pred & gt)),
        int(np.count_nonzero(pred | gt)),
        int(np.count_nonzero(pred)),
        int(np.count_nonzero(gt)),
    )


class RefCocoMetrics(Metric):
    """The RefCOCO / RefCOCO+ / RefCOCOg referring-segmentation protocol, at the original image size.

    Per task ``I = |pred ∧ gt|``, ``U = |pred ∨ gt|``, IoU = I / U. Reported (``refcoco/…``):

    * ``overall_iou``: ΣI / ΣU over tasks (the "overall" or cumulative IoU of LAVT, CRIS and ReLA's tables);
    * ``mean_iou``: the mean of the per-task IoUs;
    * ``pr@t`` for t ∈ 0.5…0.9: the share of tasks with IoU **>= t**, as the common codebases count it
      (LAVT ``seg_correct += (this_iou >= eval_seg_iou)``, CRIS alike) — unlike PhraseCut's strict ``>``;
    * ``count``: the tasks scored.

    A task whose target is empty is not part of this protocol (IoU is undefined for it); it is only counted,
    in ``refcoco/no_target_count``. Undefined values are ``nan``; the keys are fixed.
    """

    def __init__(self, pr_thresholds: Iterable[float] = OFFICIAL_PR_THRESHOLDS) -> None:
        self.pr_thresholds = tuple(float(t) for t in pr_thresholds)
        super().__init__()

    def _empty_state(self) -> dict[str, np.ndarray]:
        return {
            "count": np.zeros(1),
            "iou_sum": np.zeros(1),
            "intersection": np.zeros(1),
            "union": np.zeros(1),
            "pr_hits": np.zeros(len(self.pr_thresholds)),
            "no_target": np.zeros(1),
        }

    def update(self, pred: np.ndarray, gt: np.ndarray) -> float:
        """Add one task (H×W bool masks of the same size). Returns its IoU, ``nan`` for an empty target."""
        intersection, union, _, gt_area = _intersection_union(pred, gt)
        if gt_area == 0:
            self._state["no_target"] += 1
            return math.nan
        iou = intersection / union
        st = self._state
        st["count"] += 1
        st["iou_sum"] += iou
        st["intersection"] += intersection
        st["union"] += union
        st["pr_hits"] += np.array([iou >= t for t in self.pr_thresholds], dtype=np.float64)
        return iou

    def compute(self) -> dict[str, float]:
        st = self._state
        count = float(st["count"][0])
        out = {
            "refcoco/overall_iou": float(st["intersection"][0] / st["union"][0]) if count else math.nan,
            "refcoco/mean_iou": float(st["iou_sum"][0] / count) if count else math.nan,
        }
        for j, t in enumerate(self.pr_thresholds):
            out[f"refcoco/pr@{t:g}"] = float(st["pr_hits"][j] / count) if count else math.nan
        out["refcoco/count"] = count
        out["refcoco/no_target_count"] = float(st["no_target"][0])
        return out


class GRefCocoMetrics(Metric):
    """The gRefCOCO protocol (generalised referring expressions: one, several or no target), as the
    ReLA / gRefCOCO evaluator (``ReferEvaluator``) computes it, at the original image size.

    Per task ``I``, ``U`` and an IoU:

    * no-target task (empty ground truth): an empty prediction is an N-acc hit and scores IoU **1**, adding
      0 to ΣI and ΣU; a non-empty prediction is an N-acc miss, scores IoU 0, and its area (= U) is added to
      ΣU;
    * targeted task: an empty prediction is a T-acc miss (a non-empty one a hit); IoU = I / U, I and U
      are added to ΣI and ΣU.

    Reported (``grefcoco/…``): ``giou`` = mean of the per-task IoUs over all tasks; ``ciou`` = ΣI / ΣU
    over all tasks; ``n_acc`` = hits / no-target tasks; ``t_acc`` = non-empty predictions / targeted tasks;
    ``count`` (all tasks) and ``no_target_count``. ReLA decides "no target" with a classification head; a
    model that only predicts masks says "no target" with an empty mask, which is what is scored here.
    Undefined values are ``nan``; the keys are fixed.
    """

    def _empty_state(self) -> dict[str, np.ndarray]:
        return {
            "count": np.zeros(1),
            "iou_sum": np.zeros(1),
            "intersection": np.zeros(1),
            "union": np.zeros(1),
            "no_target": np.zeros(2),  # [tasks, predicted empty]
            "target": np.zeros(2),  # [tasks, predicted non-empty]
        }

    def update(self, pred: np.ndarray, gt: np.ndarray) -> float:
        """Add one task (H×W bool masks of the same size). Returns its IoU under this protocol."""
        intersection, union, pred_area, gt_area = _intersection_union(pred, gt)
        st = self._state
        if gt_area == 0:
            hit = pred_area == 0
            iou = 1.0 if hit else 0.0
            st["no_target"] += (1.0, float(hit))
        else:
            iou = intersection / union
            st["target"] += (1.0, float(pred_area > 0))
        st["count"] += 1
        st["iou_sum"] += iou
        st["intersection"] += intersection
        st["union"] += union  # for an empty target, U is the predicted area
        return iou

    def compute(self) -> dict[str, float]:
        st = self._state
        count = float(st["count"][0])
        (nt_count, nt_hits), (t_count, t_hits) = st["no_target"], st["target"]
        return {
            "grefcoco/giou": float(st["iou_sum"][0] / count) if count else math.nan,
            # ΣU = 0 (only no-target tasks, all predicted empty): cIoU is undefined
            "grefcoco/ciou": float(st["intersection"][0] / st["union"][0]) if st["union"][0] else math.nan,
            "grefcoco/n_acc": float(nt_hits / nt_count) if nt_count else math.nan,
            "grefcoco/t_acc": float(t_hits / t_count) if t_count else math.nan,
            "grefcoco/count": count,
            "grefcoco/no_target_count": float(nt_count),
        }


# -------------------------------------------------------------------------------------- boundary F
def seg2bmap(seg: np.ndarray) -> np.ndarray:
    """1-px boundary map of a binary mask (…×H×W), as DAVIS's ``seg2bmap`` (D. Martin, BSDS; used by
    ``davis-2017/python/lib/davis/measures/f_boundary.py``): a pixel is boundary if it differs from its
    east, south or south-east neighbour; the last row only compares east, the last column only south, the
    bottom-right pixel never counts — so the image border itself is no boundary."""
    seg = _as_bool(seg)
    e = np.zeros_like(seg)
    s = np.zeros_like(seg)
    se = np.zeros_like(seg)
    e[..., :, :-1] = seg[..., :, 1:]
    s[..., :-1, :] = seg[..., 1:, :]
    se[..., :-1, :-1] = seg[..., 1:, 1:]
    b = (seg ^ e) | (seg ^ s) | (seg ^ se)
    b[..., -1, :] = seg[..., -1, :] ^ e[..., -1, :]
    b[..., :, -1] = seg[..., :, -1] ^ s[..., :, -1]
    b[..., -1, -1] = False
    return b


def _disk_offsets(radius: float) -> list[tuple[int, int]]:
    """Offsets of ``skimage.morphology.disk(radius)``: integer (dy, dx) with dy² + dx² ≤ radius²."""
    r = math.floor(radius)
    return [
        (dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1) if dy * dy + dx * dx <= radius * radius
    ]


def _dilate(mask: np.ndarray, radius: float) -> np.ndarray:
    """Binary dilation of …×H×W ``mask`` by a disk: the OR of the mask shifted by every disk offset."""
    r = math.floor(radius)
    if r <= 0:
        return mask.copy()
    h, w = mask.shape[-2:]
    pad = [(0, 0)] * (mask.ndim - 2) + [(r, r), (r, r)]
    padded = np.pad(mask, pad)
    out = np.zeros_like(mask)
    for dy, dx in _disk_offsets(radius):
        out |= padded[..., r + dy : r + dy + h, r + dx : r + dx + w]
    return out


def boundary_f_score(pred: np.ndarray, gt: np.ndarray, radius: float) -> tuple[float, float, float]:
    """(F, precision, recall) of one H×W mask pair, DAVIS's ``db_eval_boundary`` with a tolerance disk of
    ``radius`` pixels. Degenerate cases as there: no predicted boundary but some GT boundary → P=1, R=0;
    predicted boundary but no GT boundary → P=0, R=1; neither → P=R=1 (F=1); F = 0 when P + R = 0."""
    pb, gb = seg2bmap(pred), seg2bmap(gt)
    n_p, n_g = int(pb.sum()), int(gb.sum())
    if n_p == 0 and n_g > 0:
        precision, recall = 1.0, 0.0
    elif n_p > 0 and n_g == 0:
        precision, recall = 0.0, 1.0
    elif n_p == 0 and n_g == 0:
        precision, recall = 1.0, 1.0
    else:
        precision = float(np.count_nonzero(pb & _dilate(gb, radius))) / n_p
        recall = float(np.count_nonzero(gb & _dilate(pb, radius))) / n_g
    f = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
    return f, precision, recall


class ThresholdSweep(Metric):
    """The official mean IoU at several decision thresholds, to choose the one a checkpoint predicts with.

    Per task: the probability map at the original image size ``p`` (H×W) and the GT mask; at each threshold t
    the prediction is ``p > t`` and the task's IoU is :func:`official_iou`, as :class:`PhraseCutMetrics` scores
    it. Negatives are left out, as there. ``compute`` gives ``calibration/threshold`` (the best; the lowest
    of tied ones) and ``calibration/mean_iou`` (its mean IoU), plus ``calibration/mean_iou@t`` per threshold.

    Choose on validation and predict with it on test (``segvlm train`` stores the validation choice in the
    checkpoint): the best threshold *on test* is an oracle, reported only to show how much was left.
    """

    def __init__(self, thresholds: Iterable[float] = SWEEP_THRESHOLDS) -> None:
        self.thresholds = np.asarray(tuple(thresholds), dtype=np.float64)
        if self.thresholds.size == 0 or np.any(np.diff(self.thresholds) <= 0):
            raise ValueError("thresholds must be non-empty and strictly increasing")
        super().__init__()

    def _empty_state(self) -> dict[str, np.ndarray]:
        return {"count": np.zeros(1), "iou_sum": np.zeros(len(self.thresholds))}

    def update(self, prob: torch.Tensor | np.ndarray, gt: np.ndarray) -> np.ndarray:
        """Add one task (``prob`` H×W in [0, 1], ``gt`` H×W bool, same size). Returns its IoU per threshold."""
        p = torch.as_tensor(prob).detach()
        g = torch.as_tensor(_as_bool(gt), device=p.device)
        if p.shape != g.shape:
            raise ValueError(
                f"probabilities {tuple(p.shape)} and ground truth {tuple(g.shape)} differ in size"
            )
        tp, fp, fn = (
            c[0] for c in counts_above_thresholds(p.reshape(1, -1), g.reshape(1, -1), self.thresholds)
        )
        union = tp + fp + fn
        iou = np.divide(tp, union, out=np.zeros(len(self.thresholds)), where=tp > 0)
        self._state["count"] += 1
        self._state["iou_sum"] += iou
        return iou

    def compute(self) -> dict[str, float]:
        count = float(self._state["count"][0])
        means = self._state["iou_sum"] / count if count else np.full(len(self.thresholds), math.nan)
        out = {f"calibration/mean_iou@{t:g}": float(m) for t, m in zip(self.thresholds, means)}
        best = int(np.argmax(means)) if count else int(np.argmin(np.abs(self.thresholds - 0.5)))
        out["calibration/threshold"] = float(self.thresholds[best])
        out["calibration/mean_iou"] = float(means[best])
        return out


class BoundaryFScore(Metric):
    """DAVIS-style boundary F-score (Perazzi et al., CVPR 2016; ``f_boundary.py`` of davis-2017), averaged
    over tasks: ``boundary/f``, ``boundary/precision``, ``boundary/recall`` are means of the per-task values.

    Tolerance: a boundary pixel matches if the other mask's boundary lies within a disk of radius
    ``tolerance_px`` = **2 pixels** by default (a fixed pixel tolerance, at the resolution the masks are
    given at — the original image size in our evaluation). ``tolerance_diag`` reproduces DAVIS instead:
    radius = ``ceil(tolerance_diag × image diagonal)`` (DAVIS's ``bound_th = 0.008``; 4 px at 352², 5 px for a
    500×375 image). No opencv/skimage/scipy: boundaries by shifted XORs, dilation by shifted ORs.
    """

    def __init__(self, tolerance_px: float = 2.0, tolerance_diag: float | None = None) -> None:
        self.tolerance_px = float(tolerance_px)
        self.tolerance_diag = tolerance_diag
        super().__init__()

    def _empty_state(self) -> dict[str, np.ndarray]:
        return {
            "f_sum": np.zeros(1),
            "precision_sum": np.zeros(1),
            "recall_sum": np.zeros(1),
            "count": np.zeros(1),
        }

    def radius(self, height: int, width: int) -> float:
        if self.tolerance_diag is not None:
            return float(math.ceil(self.tolerance_diag * math.hypot(height, width)))
        return self.tolerance_px

    def update(self, pred: np.ndarray, gt: np.ndarray) -> tuple[float, float, float]:
        """Add one task (H×W bool masks) or a batch (B×H×W); returns (F, P, R) of the last task."""
        pred, gt = _as_bool(pred), _as_bool(gt)
        if pred.shape != gt.shape:
            raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in size")
        pairs = (
            [(pred, gt)]
            if pred.ndim == 2
            else list(zip(pred.reshape(-1, *pred.shape[-2:]), gt.reshape(-1, *gt.shape[-2:])))
        )
        result = (math.nan, math.nan, math.nan)
        for p, g in pairs:
            result = boundary_f_score(p, g, self.radius(*p.shape))
            self._state["f_sum"] += result[0]
            self._state["precision_sum"] += result[1]
            self._state["recall_sum"] += result[2]
            self._state["count"] += 1
        return result

    def compute(self) -> dict[str, float]:
        st = self._state
        n = float(st["count"][0])

        def mean(key: str) -> float:
            return float(st[key][0] / n) if n else math.nan

        return {
            "boundary/f": mean("f_sum"),
            "boundary/precision": mean("precision_sum"),
            "boundary/recall": mean("recall_sum"),
            "boundary/count": n,
        }


# ------------------------------------------------------------------------------------------ bundle
class EvalMetrics(Metric):
    """Every metric together (PhraseCut official, CLIPSeg, boundary F, the threshold sweep, RefCOCO and
    gRefCOCO), with one state vector for a single all-reduce.

    ``update`` takes one task at the original size (official + boundary) and, optionally, its 352²
    probability map and GT for the CLIPSeg protocol; ``update_clipseg`` takes whole batches of the latter.
    """

    def __init__(
        self,
        *,
        boundary_tolerance_px: float = 2.0,
        boundary_tolerance_diag: float | None = None,
        clipseg_threshold: float = 0.3,
    ) -> None:
        self.official = PhraseCutMetrics()
        self.clipseg = ClipSegMetrics(report_threshold=clipseg_threshold)
        self.boundary = BoundaryFScore(boundary_tolerance_px, boundary_tolerance_diag)
        self.calibration = ThresholdSweep()
        self.refcoco = RefCocoMetrics()
        self.grefcoco = GRefCocoMetrics()
        super().__init__()

    @property
    def parts(self) -> dict[str, Metric]:
        return {
            "official": self.official,
            "clipseg": self.clipseg,
            "boundary": self.boundary,
            "calibration": self.calibration,
            "refcoco": self.refcoco,
            "grefcoco": self.grefcoco,
        }

    def _empty_state(self) -> dict[str, np.ndarray]:
        return {}

    def reset(self) -> None:
        for m in self.parts.values():
            m.reset()

    def state(self) -> dict[str, np.ndarray]:
        return {f"{name}.{k}": v for name, m in self.parts.items() for k, v in m.state().items()}

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        for name, m in self.parts.items():
            m.load_state({k.split(".", 1)[1]: v for k, v in state.items() if k.startswith(name + ".")})

    def merge(self, other: Metric) -> EvalMetrics:
        if not isinstance(other, EvalMetrics):
            raise TypeError(f"cannot merge {type(other).__name__} into EvalMetrics")
        for name, m in self.parts.items():
            m.merge(other.parts[name])
        return self

    def vector_size(self) -> int:
        return sum(m.vector_size() for m in self.parts.values())

    def to_vector(self) -> np.ndarray:
        return np.concatenate([m.to_vector() for m in self.parts.values()])

    def from_vector(self, vec: np.ndarray | torch.Tensor) -> EvalMetrics:
        if isinstance(vec, torch.Tensor):
            vec = vec.detach().cpu().numpy()
        vec = np.asarray(vec, dtype=np.float64).ravel()
        if vec.size != self.vector_size():
            raise ValueError(f"EvalMetrics: vector of {vec.size} values, expected {self.vector_size()}")
        offset = 0
        for m in self.parts.values():
            m.from_vector(vec[offset : offset + m.vector_size()])
            offset += m.vector_size()
        return self

    def update(
        self,
        pred: np.ndarray,
        gt: np.ndarray,
        *,
        phrase_type: str | None,
        num_instances: int,
        negative: bool | None = None,
        prob: torch.Tensor | np.ndarray | None = None,
        prob_gt: torch.Tensor | np.ndarray | None = None,
        prob_full: torch.Tensor | np.ndarray | None = None,
    ) -> None:
        """One task: binary ``pred``/``gt`` (H×W, original size), optionally ``prob``/``prob_gt`` (352²) for the
        CLIPSeg protocol and ``prob_full`` (H×W probabilities ``pred`` was thresholded from) for the sweep.
        The RefCOCO and gRefCOCO protocols score it too, unless it is a negative (``negative=True``); a task
        without a target goes to :meth:`update_no_target`."""
        self.official.update(
            pred, gt, phrase_type=phrase_type, num_instances=num_instances, negative=negative
        )
        if not negative:
            self.refcoco.update(pred, gt)
            self.grefcoco.update(pred, gt)
        self.boundary.update(pred, gt)
        if prob_full is not None and not negative:
            self.calibration.update(prob_full, gt)
        if prob is not None:
            if prob_gt is None:
                raise ValueError("prob needs prob_gt (the ground truth at the probability map's resolution)")
            self.clipseg.update(prob, prob_gt)

    def update_no_target(self, pred: np.ndarray, gt: np.ndarray, *, synthetic: bool) -> None:
        """One task without a target (``gt`` H×W, empty; ``pred`` H×W, original size).

        PhraseCut's protocol keeps it apart (``official/negative/*``), for every such task. A dataset's own
        no-target expression (a gRefCOCO one: ``synthetic=False``) is also scored by the gRefCOCO protocol
        and counted by the RefCOCO one; our synthetic negative prompts (kind ``negative``) are not, so they
        never change a published protocol's numbers. Boundary F, CLIPSeg and the sweep skip it.
        """
        self.official.update(pred, gt, phrase_type=None, num_instances=0, negative=True)
        if not synthetic:
            self.refcoco.update(pred, gt)
            self.grefcoco.update(pred, gt)

    def update_clipseg(self, prob: torch.Tensor | np.ndarray, gt: torch.Tensor | np.ndarray) -> None:
        self.clipseg.update(prob, gt)

    def compute(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for m in self.parts.values():
            out.update(m.compute())
        return out


# ------------------------------------------------------------------------------------------ report
PROTOCOLS: tuple[str, ...] = ("phrasecut", "refcoco", "grefcoco")
# each protocol's metric group in a report, and its headline metrics (the columns of a cross-dataset table)
PROTOCOL_GROUPS: dict[str, str] = {"phrasecut": "official", "refcoco": "refcoco", "grefcoco": "grefcoco"}
HEADLINE_METRICS: dict[str, tuple[str, ...]] = {
    "phrasecut": (
        "official/mean_iou",
        "official/cum_iou",
        *(f"official/pr@{t:g}" for t in OFFICIAL_PR_THRESHOLDS),
        "official/count",
    ),
    "refcoco": (
        "refcoco/overall_iou",
        "refcoco/mean_iou",
        *(f"refcoco/pr@{t:g}" for t in OFFICIAL_PR_THRESHOLDS),
        "refcoco/count",
    ),
    "grefcoco": ("grefcoco/giou", "grefcoco/ciou", "grefcoco/n_acc", "grefcoco/t_acc", "grefcoco/count"),
}
# ImageRecord.source -> the protocol its benchmark is published under; any other source: PhraseCut's
SOURCE_PROTOCOLS: dict[str, str] = {
    "refcoco": "refcoco",
    "refcoco+": "refcoco",
    "refcocog": "refcoco",
    "grefcoco": "grefcoco",
}


def protocol_for_source(source: str) -> str:
    """The protocol a dataset is scored by: ``refcoco`` for RefCOCO/+/g, ``grefcoco``, else ``phrasecut``."""
    return SOURCE_PROTOCOLS.get(source, "phrasecut")


def lead_with_protocol(metrics: Mapping[str, Any], protocol: str) -> dict[str, Any]:
    """``metrics`` reordered so that the protocol's group comes first (what a report table shows on top);
    other keys keep their order."""
    if protocol not in PROTOCOL_GROUPS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    prefix = PROTOCOL_GROUPS[protocol] + "/"
    first = {k: v for k, v in metrics.items() if k.startswith(prefix)}
    return first | {k: v for k, v in metrics.items() if k not in first}


def _format_value(column: str, value: float, digits: int, percent: bool) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if column == "count" or column.endswith("_count"):
        return f"{round(value):d}"
    if percent and not (column.endswith("_t") or column == "threshold"):
        return f"{100 * value:.{max(digits - 2, 0)}f}"
    return f"{value:.{digits}f}"


def format_markdown_table(metrics: Mapping[str, float], *, digits: int = 4, percent: bool = False) -> str:
    """Markdown tables of flat metric names, one table per top-level group (``official``, ``clipseg``,
    ``boundary``, …): rows are the middle of the name (``all`` when absent, e.g. ``official/name/mean_iou``
    → row ``name``), columns the last part. Counts print as integers, ``nan`` and ``None`` (JSON null) as "–"; ``percent=True``
    prints rates ×100 (thresholds excepted)."""
    groups: dict[str, dict[str, dict[str, float]]] = {}
    columns: dict[str, list[str]] = {}
    for key, value in metrics.items():
        parts = key.split("/")
        if len(parts) == 1:
            group, row, column = "", "all", parts[0]
        else:
            group, column = parts[0], parts[-1]
            row = "/".join(parts[1:-1]) or "all"
        groups.setdefault(group, {}).setdefault(row, {})[column] = value
        cols = columns.setdefault(group, [])
        if column not in cols:
            cols.append(column)
    blocks = []
    for group, rows in groups.items():
        cols = columns[group]
        lines = [f"**{group}**", ""] if group else []
        lines.append("| " + " | ".join(["subset", *cols]) + " |")
        lines.append("|" + "|".join(["---"] + ["---:"] * len(cols)) + "|")
        for row, values in rows.items():
            cells = [
                _format_value(c, math.nan if values[c] is None else float(values[c]), digits, percent)
                if c in values
                else ""
                for c in cols
            ]
            lines.append("| " + " | ".join([row, *cells]) + " |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def format_dataset_table(
    rows: Sequence[Mapping[str, Any]], columns: Sequence[str], *, digits: int = 4
) -> str:
    """One markdown table, a row per dataset (a cross-dataset evaluation): ``rows`` are dicts with the
    ``columns`` as keys (text columns such as ``dataset`` as they are; metrics formatted as in
    :func:`format_markdown_table`, a count by the last part of its name). A column a row lacks is an
    empty cell, an undefined metric (``nan``/``None``) "–"."""

    def cell(row: Mapping[str, Any], column: str) -> str:
        if column not in row:
            return ""
        value = row[column]
        if isinstance(value, str):
            return value
        name = column.rsplit("/", 1)[-1]
        return _format_value(name, math.nan if value is None else float(value), digits, False)

    lines = [
        "| " + " | ".join(columns) + " |",
        "|" + "|".join("---" if i < 2 else "---:" for i in range(len(columns))) + "|",
    ]
    lines += ["| " + " | ".join(cell(row, c) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"
