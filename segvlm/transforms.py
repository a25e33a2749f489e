"""Image and target transforms shared by the training loader, the evaluation loader and inference.

Pure PIL/numpy/torch. Conventions:

* A crop ``box`` is ``(x0, y0, x1, y1)`` in pixels of the *stored* image (the ``width × height`` the shard's
  polygons are given in), half-open like a slice: the crop covers columns ``x0 … x1-1``. Training crops are
  square and integral.
* Images leave here as ``3×S×S`` float32 tensors normalised with the OpenAI CLIP mean/std (CHW, RGB);
  targets as ``1×S×S`` float32 tensors in {0, 1}.
* The image is resampled with PIL's ``resize(..., box=...)`` and the target is rasterised directly at the
  output resolution from the polygons (``segvlm.masks.rasterize_polygons`` with scale/offset), so both use
  the same map ``x_out = (x - x0) * S / (x1 - x0)`` and stay aligned without resampling a mask.

CLIPSeg's training augmentation is a random *square* crop that keeps at least 5% of the object,
then a resize to S×S, and no flips: a plain flip would silently break phrases like "the cup on the left".
The optional horizontal flip here mirrors the phrase with the pixels (``mirror_phrase``: left ↔ right), which
keeps the pair consistent.
"""

from __future__ import annotations

import io
import re
from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np
import torch
from PIL import Image

from segvlm.masks import rasterize_polygons

__all__ = [
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "Box",
    "TokenizeFn",
    "crop_resize",
    "decode_image",
    "eval_target_mask",
    "eval_transform",
    "mirror_phrase",
    "normalize_uint8",
    "normalize_uint8_batch",
    "object_fraction",
    "original_size_mask",
    "pil_to_uint8_array",
    "pil_to_uint8_tensor",
    "random_object_crop",
    "resize_and_normalize",
    "target_mask",
    "target_mask_array",
]

OPENAI_CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

Box = tuple[float, float, float, float]  # (x0, y0, x1, y1), half-open, stored-image pixels
Polygons = Sequence[Sequence[Sequence[Sequence[float]]]]  # [instance][polygon][point] = [x, y]


class TokenizeFn(Protocol):
    """What the loaders call to tokenise a batch of phrases (e.g. ``Backbone.tokenize``).

    Returns ``input_ids`` and ``attention_mask``, both integer tensors of shape ``B×L``.
    """

    def __call__(self, phrases: list[str], /) -> Mapping[str, torch.Tensor]: ...


# ----------------------------------------------------------------------------------------------- crops


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


# ----------------------------------------------------------------------------------------------- images


def decode_image(data: bytes, *, min_size: tuple[int, int] | None = None) -> tuple[Image.Image, int]:
    """Decode image bytes to an RGB PIL image; returns ``(image, reduction)``.

    With ``min_size=(w, h)`` a JPEG is decoded at a reduced scale ``1/reduction`` (``reduction`` in
    1, 2, 4, 8; libjpeg's DCT scaling via ``Image.draft``) while staying at least ``w × h``: several times
    faster than a full decode followed by a downscale. A reduced pixel ``i`` covers full-resolution pixels
    ``[i·r, (i+1)·r)``, so full-resolution coordinates map to ``x / reduction`` exactly.
    """
    image = Image.open(io.BytesIO(data))
    full_w, full_h = image.size
    reduction = 1
    if min_size is not None and image.format == "JPEG":
        image.draft("RGB", (max(int(min_size[0]), 1), max(int(min_size[1]), 1)))
        new_w, new_h = image.size
        for r in (8, 4, 2, 1):
            if -(-full_w // r) == new_w and -(-full_h // r) == new_h:
                reduction = r
                break
    if image.mode != "RGB":
        image = image.convert("RGB")  # grayscale / CMYK JPEGs exist in Visual Genome
    image.load()
    return image, reduction


def crop_resize(image: Image.Image, box: Box, size: int, *, resample: int = Image.BILINEAR) -> Image.Image:
    """The ``box`` region (float coordinates of ``image``) resampled to ``size × size``.

    PIL resamples straight from the box (antialiased when shrinking) without an intermediate crop, so a
    fractional box (e.g. after a reduced JPEG decode) stays exactly aligned with the polygons.
    """
    box = tuple(float(v) for v in box)
    return image.resize((int(size), int(size)), resample=resample, box=box)


def pil_to_uint8_array(image: Image.Image) -> np.ndarray:
    """RGB PIL image -> contiguous ``3×H×W`` uint8 array (CHW; numpy's transpose-copy is ~3× faster
    than torch's ``permute().contiguous()`` for uint8)."""
    hwc = np.asarray(image.convert("RGB") if image.mode != "RGB" else image, dtype=np.uint8)
    return np.ascontiguousarray(hwc.transpose(2, 0, 1))


def pil_to_uint8_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> contiguous ``3×H×W`` uint8 tensor."""
    return torch.from_numpy(pil_to_uint8_array(image))


_SCALE = (1.0 / (255.0 * np.asarray(OPENAI_CLIP_STD, np.float64))).astype(np.float32).reshape(3, 1, 1)
_SHIFT = (
    (-np.asarray(OPENAI_CLIP_MEAN, np.float64) / np.asarray(OPENAI_CLIP_STD))
    .astype(np.float32)
    .reshape(3, 1, 1)
)


def normalize_uint8_batch(images: Sequence[np.ndarray | torch.Tensor]) -> torch.Tensor:
    """``B`` uint8 ``3×H×W`` images -> one ``B×3×H×W`` float32 tensor, ``(x / 255 - mean) / std``.

    The loaders keep uint8 until collation (4× less memory in the shuffle buffer) and normalise here:
    each image is cast, scaled and shifted straight into its slot of one preallocated buffer while it is
    in cache — several times faster on a busy CPU than stacking and then running torch ops on the batch.
    """
    first = np.asarray(images[0])
    out = np.empty((len(images), *first.shape), dtype=np.float32)
    for slot, image in zip(out, images):
        np.multiply(np.asarray(image), _SCALE, out=slot)
        np.add(slot, _SHIFT, out=slot)
    return torch.from_numpy(out)


def normalize_uint8(pixels: torch.Tensor | np.ndarray) -> torch.Tensor:
    """``…×3×H×W`` uint8 -> float32 normalised with the CLIP mean/std (same arithmetic as the loaders)."""
    array = np.asarray(pixels)
    flat = array.reshape(-1, *array.shape[-3:])
    return normalize_uint8_batch(list(flat)).reshape(array.shape)


def resize_and_normalize(image: Image.Image, box: Box, size: int) -> torch.Tensor:
    """Crop ``box`` of a PIL ``image``, resize to ``size``², normalise: ``3×S×S`` float32."""
    return normalize_uint8(pil_to_uint8_tensor(crop_resize(image, box, size)))


def eval_transform(image: Image.Image, size: int) -> torch.Tensor:
    """Plain resize of the whole image to ``size × size`` (aspect not kept, no crop), normalised:
    ``3×S×S`` float32. CLIPSeg evaluates this way; ``eval_target_mask`` is the matching target."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    return resize_and_normalize(rgb, (0.0, 0.0, float(rgb.width), float(rgb.height)), size)


# ----------------------------------------------------------------------------------------------- targets


_LEFT_RIGHT = re.compile(r"\b(left|right)(?=(?:most|hand|side|ward|wards)?\b)", re.IGNORECASE)


def mirror_phrase(phrase: str) -> str:
    """The phrase that refers to the same region of the horizontally flipped image: ``left`` and ``right``
    trade places, alone or in leftmost / left-hand / lefthand / leftside / leftward(s) ("the cup left of the
    bowl" → "the cup right of the bowl"), in the case they were written in ("Left" → "Right", "LEFT" →
    "RIGHT"); other words that merely start with them ("leftover", "rights") stay."""

    def swap(match: re.Match[str]) -> str:
        word = match.group(1)
        other = "right" if word.lower() == "left" else "left"
        if word.isupper():
            return other.upper()
        return other.capitalize() if word[0].isupper() else other

    return _LEFT_RIGHT.sub(swap, phrase)


def target_mask_array(polygons: Polygons, box: Box, size: int) -> np.ndarray:
    """The union of ``polygons`` (stored-image pixels) inside ``box``, rasterised at ``size × size``:
    ``S×S`` uint8 in {0, 1}. The box must be square for the result to be undistorted; any box works."""
    x0, y0, x1, y1 = (float(v) for v in box)
    return rasterize_polygons(
        polygons,
        size,
        size,
        scale_x=size / (x1 - x0),
        scale_y=size / (y1 - y0),
        offset_x=x0,
        offset_y=y0,
    )


def target_mask(polygons: Polygons, box: Box, size: int) -> torch.Tensor:
    """``target_mask_array`` as a ``1×S×S`` float32 tensor in {0, 1} (empty for negatives)."""
    return torch.from_numpy(target_mask_array(polygons, box, size).astype(np.float32)).unsqueeze(0)


def eval_target_mask(polygons: Polygons, width: int, height: int, size: int) -> torch.Tensor:
    """The target matching ``eval_transform``: the whole ``width × height`` image squeezed to ``S×S``;
    ``1×S×S`` float32."""
    return target_mask(polygons, (0.0, 0.0, float(width), float(height)), size)


def original_size_mask(
    polygons: Polygons, width: int, height: int, orig_width: int, orig_height: int
) -> np.ndarray:
    """Ground truth at the original image size (``orig_height × orig_width`` uint8), what the PhraseCut
    metrics use, from polygons given in stored-image pixels (``width × height``)."""
    return rasterize_polygons(
        polygons, orig_width, orig_height, scale_x=orig_width / width, scale_y=orig_height / height
    )
