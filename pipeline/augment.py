"""Training augmentation (CLIPSeg's): a random *square* crop that keeps at least a share of the target, then
(in the loader) a resize to S×S; optionally a horizontal flip that mirrors the phrase with the pixels
(``mirror_phrase``: left ↔ right), which keeps the pair consistent. CLIPSeg itself does not flip: a plain
flip would silently break phrases like "the cup on the left".

Boxes are ``segvlm.preprocess``'s: ``(x0, y0, x1, y1)`` in stored-image pixels, half-open, here integral.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pipeline.grammar import mirror_phrase

__all__ = ["mirror_phrase", "object_fraction", "random_object_crop"]


def _integral(mask: np.ndarray) -> np.ndarray:
    """Summed-area table ``(H+1)×(W+1)`` int64, so any box sum is four lookups."""
    table = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=np.int64)
    np.cumsum(np.cumsum(mask.astype(np.int64, copy=False), axis=0), axis=1, out=table[1:, 1:])
    return table


def object_fraction(mask: np.ndarray, box: Sequence[int]) -> float:
    """Share of the object's pixels (``mask``: H×W, nonzero = object) inside the integral ``box``.

    This is the quantity ``random_object_crop`` keeps ≥ ``min_object_fraction``; 1.0 for an empty mask.
    """
    total = int(np.count_nonzero(mask))
    if total == 0:
        return 1.0
    x0, y0, x1, y1 = (int(v) for v in box)
    return int(np.count_nonzero(mask[y0:y1, x0:x1])) / total


def random_object_crop(
    width: int,
    height: int,
    obj: np.ndarray | Sequence[float] | None,
    *,
    rng: np.random.Generator,
    min_object_fraction: float = 0.05,
    scale: tuple[float, float] = (0.5, 1.0),
    tries: int = 64,
) -> tuple[int, int, int, int]:
    """A random square crop ``(x0, y0, x1, y1)`` (integral, inside the image) keeping part of the object.

    The side is ``u · min(width, height)`` with ``u ~ U(scale)``; the position is uniform. ``obj`` is the
    target as an ``height×width`` mask (nonzero = object) or a box ``(x0, y0, x1, y1)``; the crop must keep
    at least ``min_object_fraction`` of its pixels (mask) or of its area (box) — CLIPSeg's rule. ``None`` or
    an empty mask (negatives) accepts any crop. Candidates are drawn in one vectorised batch of ``tries``;
    when none qualifies (a tiny object and small crops), crops are re-drawn around a random object pixel,
    and as a last resort the largest square with the most object is returned, so this never fails.
    """
    if width < 1 or height < 1:
        raise ValueError(f"empty image {width}×{height}")
    short = min(width, height)
    lo, hi = scale
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"scale must satisfy 0 < lo <= hi <= 1, got {scale}")

    def draw(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        side = np.clip(np.rint(rng.uniform(lo, hi, n) * short).astype(np.int64), 1, short)
        x0 = (rng.random(n) * (width - side + 1)).astype(np.int64)
        y0 = (rng.random(n) * (height - side + 1)).astype(np.int64)
        return x0, y0, side

    def as_box(x0: int, y0: int, side: int) -> tuple[int, int, int, int]:
        return int(x0), int(y0), int(x0 + side), int(y0 + side)

    empty = obj is None or (isinstance(obj, np.ndarray) and not obj.any())
    if empty:
        x0, y0, side = draw(1)
        return as_box(x0[0], y0[0], side[0])

    if isinstance(obj, np.ndarray):
        if obj.shape != (height, width):
            raise ValueError(f"mask shape {obj.shape} != (height, width) = {(height, width)}")
        # summed-area table over the object's bounding box only: crops are clipped to it (small objects
        # in large images are the common case, and the full-image table was the crop's main cost)
        rows, cols = np.flatnonzero(obj.any(1)), np.flatnonzero(obj.any(0))
        r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
        table = _integral(obj[r0:r1, c0:c1] != 0)
        total = int(table[-1, -1])

        def inside(x0: np.ndarray, y0: np.ndarray, side: np.ndarray) -> np.ndarray:
            ax0, ax1 = np.clip(x0 - c0, 0, c1 - c0), np.clip(x0 + side - c0, 0, c1 - c0)
            ay0, ay1 = np.clip(y0 - r0, 0, r1 - r0), np.clip(y0 + side - r0, 0, r1 - r0)
            return table[ay1, ax1] - table[ay0, ax1] - table[ay1, ax0] + table[ay0, ax0]

    else:
        bx0, by0, bx1, by1 = (float(v) for v in obj)
        total = max(bx1 - bx0, 0.0) * max(by1 - by0, 0.0)
        if total <= 0:
            x0, y0, side = draw(1)
            return as_box(x0[0], y0[0], side[0])

        def inside(x0: np.ndarray, y0: np.ndarray, side: np.ndarray) -> np.ndarray:
            w = np.clip(np.minimum(x0 + side, bx1) - np.maximum(x0, bx0), 0, None)
            h = np.clip(np.minimum(y0 + side, by1) - np.maximum(y0, by0), 0, None)
            return w * h

    need = min_object_fraction * total
    x0, y0, side = draw(tries)
    ok = np.flatnonzero(inside(x0, y0, side) >= need)
    if ok.size:
        i = ok[0]  # the first qualifying draw: the same law as rejection sampling
        return as_box(x0[i], y0[i], side[i])

    # Around an object point: choose a pixel of the object, then a crop position that contains it.
    if isinstance(obj, np.ndarray):
        ys, xs = np.nonzero(obj)
        pick = rng.integers(0, xs.size, tries)
        px, py = xs[pick], ys[pick]
    else:
        px = np.clip(rng.uniform(bx0, bx1, tries), 0, width - 1).astype(np.int64)
        py = np.clip(rng.uniform(by0, by1, tries), 0, height - 1).astype(np.int64)
    _, _, side = draw(tries)
    x0 = np.clip(px - (rng.random(tries) * side).astype(np.int64), 0, width - side)
    y0 = np.clip(py - (rng.random(tries) * side).astype(np.int64), 0, height - side)
    ok = np.flatnonzero(inside(x0, y0, side) >= need)
    if ok.size:
        i = ok[0]
        return as_box(x0[i], y0[i], side[i])

    # Last resort: the largest square, slid along the long side to the position with the most object.
    n = max(width, height) - short + 1
    pos = np.arange(n, dtype=np.int64)
    zeros = np.zeros(n, dtype=np.int64)
    side = np.full(n, short, dtype=np.int64)
    sums = inside(pos, zeros, side) if width >= height else inside(zeros, pos, side)
    best = int(np.argmax(sums))
    return as_box(best, 0, short) if width >= height else as_box(0, best, short)
