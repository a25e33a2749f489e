"""Image and target preprocessing shared by inference, evaluation and the loaders (no randomness here; the
training augmentation is ``pipeline.augment``).

Pure PIL/numpy/torch. Conventions:

* A crop ``box`` is ``(x0, y0, x1, y1)`` in pixels of the *stored* image (the ``width × height`` the shard's
  polygons are given in), half-open like a slice: the crop covers columns ``x0 … x1-1``. Training crops are
  square and integral.
* Images leave here as ``3×S×S`` float32 tensors normalised with the OpenAI CLIP mean/std (CHW, RGB);
  targets as ``1×S×S`` float32 tensors in {0, 1}.
* The image is resampled with PIL's ``resize(..., box=...)`` and the target is rasterised directly at the
  output resolution from the polygons (``segvlm.masks.rasterize_polygons`` with scale/offset), so both use
  the same map ``x_out = (x - x0) * S / (x1 - x0)`` and stay aligned without resampling a mask.
"""

from __future__ import annotations

import io
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
    "normalize_uint8",
    "normalize_uint8_batch",
    "original_size_mask",
    "pil_to_uint8_array",
    "pil_to_uint8_tensor",
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
