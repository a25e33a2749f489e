"""Ground-truth masks: PhraseCut polygons rasterised exactly as the PhraseCut evaluator does, and COCO RLEs.

PhraseCut (``utils/data_transfer.py::polygons_to_mask``) draws every polygon with
``ImageDraw.polygon(points cast to int, outline=1, fill=1)`` on an ``L`` image of the original size,
skips polygons with fewer than 2 points, and takes the union. We do the same; at another resolution the
points are scaled first and then cast, which is what "rasterise at the resolution it is used at" means.

COCO run-length encodings (crowd regions of the RefCOCO family and gRefCOCO) are decoded by pycocotools, the
library the COCO and refer toolkits use, never by hand. They are stored at the original image size.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

Point = Sequence[float]
Polygon = Sequence[Point]
InstancePolygons = Sequence[Polygon]  # one instance: a list of polygons


def rasterize_polygons(
    instances: Sequence[InstancePolygons],
    width: int,
    height: int,
    *,
    scale_x: float = 1.0,
    scale_y: float = 1.0,
    offset_x: float = 0.0,
    offset_y: float = 0.0,
) -> np.ndarray:
    """Union mask (H×W uint8 in {0, 1}) of all polygons of all instances.

    Points map to ``((x - offset_x) * scale_x, (y - offset_y) * scale_y)`` before the int cast, so a crop
    followed by a resize can be rasterised directly at the output resolution.
    """
    canvas = Image.new("L", (int(width), int(height)), 0)
    draw = ImageDraw.Draw(canvas)
    for polygons in instances:
        for polygon in polygons:
            if len(polygon) < 2:
                continue
            points = [(int((x - offset_x) * scale_x), int((y - offset_y) * scale_y)) for x, y in polygon]
            draw.polygon(points, outline=1, fill=1)
    return np.asarray(canvas, dtype=np.uint8)


def mask_area_fraction(instances: Sequence[InstancePolygons], width: int, height: int) -> float:
    """Share of the image covered by the task's mask at the original size (0 for negatives)."""
    if not instances:
        return 0.0
    return float(rasterize_polygons(instances, width, height).mean())


def polygons_at_original_size(
    instances: Sequence[InstancePolygons], width: int, height: int, orig_width: int, orig_height: int
) -> list[list[list[list[float]]]]:
    """Polygons of a stored image (``width × height``, e.g. after ``--max-side``) in original-image pixels.

    The official ground truth is drawn at the original size; rounding to 1e-4 px keeps the int cast of
    PhraseCut's rasteriser stable against float noise (``99.99999`` must not become ``99``).
    """
    if (orig_width, orig_height) == (width, height):
        return [[[list(map(float, p)) for p in polygon] for polygon in inst] for inst in instances]
    sx, sy = orig_width / width, orig_height / height
    return [
        [[[round(x * sx, 4), round(y * sy, 4)] for x, y in polygon] for polygon in inst] for inst in instances
    ]


def decode_rles(rles: Sequence[dict[str, Any]], height: int, width: int) -> np.ndarray:
    """Union mask (H×W uint8 in {0, 1}) of COCO compressed RLEs (``{"size": [h, w], "counts": str}``).

    Every RLE must be of the size asked for: RLEs are kept at the original image size, and a mismatch
    means the record and its image disagree (``ValueError``, never a silently shifted mask).
    """
    out = np.zeros((int(height), int(width)), dtype=np.uint8)
    if not rles:
        return out
    from pycocotools import mask as coco_mask

    for rle in rles:
        size = [int(v) for v in rle["size"]]
        if size != [int(height), int(width)]:
            raise ValueError(f"RLE of size {size[0]}x{size[1]} (h x w) on a {height}x{width} mask")
        counts = rle["counts"]
        encoded = {"size": size, "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
        out |= coco_mask.decode(encoded).astype(np.uint8)
    return out


def encode_rle(mask: np.ndarray) -> dict[str, Any]:
    """The COCO compressed RLE of an H×W binary mask, JSON-ready (``counts`` as an ASCII string)."""
    from pycocotools import mask as coco_mask

    rle = coco_mask.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}
