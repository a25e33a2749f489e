"""Ground-truth masks from PhraseCut polygons, rasterised exactly as the PhraseCut evaluator does.

PhraseCut (``utils/data_transfer.py::polygons_to_mask``) draws every polygon with
``ImageDraw.polygon(points cast to int, outline=1, fill=1)`` on an ``L`` image of the original size,
skips polygons with fewer than 2 points, and takes the union. We do the same; at another resolution the
points are scaled first and then cast, which is what "rasterise at the resolution it is used at" means.
"""

from __future__ import annotations

from collections.abc import Sequence

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
