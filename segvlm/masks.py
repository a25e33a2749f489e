"""Ground-truth masks: PhraseCut polygons rasterised exactly as the PhraseCut evaluator does, and COCO RLEs.

PhraseCut (``utils/data_transfer.py::polygons_to_mask``) draws every polygon with
``ImageDraw.polygon(points cast to int, outline=1, fill=1)`` on an ``L`` image of the original size,
skips polygons with fewer than 2 points, and takes the union. We do the same; at another resolution the
points are scaled first and then cast, which is what "rasterise at the resolution it is used at" means.

COCO run-length encodings (crowd regions of the RefCOCO family and gRefCOCO) are decoded by pycocotools, the
library the COCO and refer toolkits use, never by hand. They are stored at the original image size.

pycocotools trusts its input: a counts string whose runs do not add up to height × width makes its decoder
read and write outside its buffer (heap corruption, not an exception). :func:`rle_error` therefore parses
the counts exactly as pycocotools' ``rleFrString`` does and checks every run before pycocotools sees them;
:func:`decode_rles` refuses an RLE that fails it.
"""

from __future__ import annotations

import reprlib
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
    if not rles:
        return np.zeros((int(height), int(width)), dtype=np.uint8)
    from pycocotools import mask as coco_mask

    out: np.ndarray | None = None
    for rle in rles:
        size = [int(v) for v in rle["size"]]
        if size != [int(height), int(width)]:
            raise ValueError(f"RLE of size {size[0]}x{size[1]} (h x w) on a {height}x{width} mask")
        counts = rle["counts"]
        error = rle_error(rle, int(height), int(width))
        if error is not None:
            raise ValueError(error)
        encoded = {"size": size, "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
        mask = coco_mask.decode(encoded)  # H×W uint8, column-major: the loader only gathers from it
        out = mask if out is None else out | mask
    return out


# pycocotools packs each run into 5-bit characters ('0' + value, 0x20 = more follows, 0x10 in the last one =
# negative); 6 characters hold any run of an image under 2**29 pixels and stay clear of its C shifts' limits.
_RLE_CHAR_MIN, _RLE_CHAR_MAX, _RLE_MAX_CHARS = 48, 48 + 63, 6


def rle_counts(counts: str | bytes) -> list[int]:
    """The runs of a COCO compressed counts string, parsed as pycocotools' ``rleFrString`` does (runs from
    the fourth on are stored as differences to the run two before). Raises ValueError on a character outside
    ``'0'..'o'``, a value cut off at the end, a value longer than 6 characters, or a negative run."""
    data = counts.encode("ascii", "replace") if isinstance(counts, str) else bytes(counts)
    runs: list[int] = []
    p = 0
    while p < len(data):
        value = shift = 0
        while True:
            if p >= len(data):
                raise ValueError(f"counts end inside a value (at character {p})")
            c = data[p] - _RLE_CHAR_MIN
            if not 0 <= c <= _RLE_CHAR_MAX - _RLE_CHAR_MIN:
                raise ValueError(f"counts hold {chr(data[p])!r} at {p}, outside '0'..'o'")
            value |= (c & 0x1F) << shift
            p += 1
            shift += 5
            if not c & 0x20:
                if c & 0x10:
                    value -= 1 << shift  # two's complement of the bits read so far
                break
            if shift >= 5 * _RLE_MAX_CHARS:
                raise ValueError(f"counts hold a value longer than {_RLE_MAX_CHARS} characters (at {p})")
        if len(runs) > 2:
            value += runs[-2]
        if value < 0:
            raise ValueError(f"run {len(runs)} of the counts is negative ({value})")
        runs.append(value)
    return runs


def rle_error(rle: Any, height: int, width: int) -> str | None:
    """Why ``rle`` is not a COCO compressed RLE of an ``height × width`` mask that pycocotools can decode
    safely (None when it is): ``{"size": [height, width], "counts": str}``, runs adding up to height × width."""
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        return "the RLE is not an object with size and counts"
    size = rle["size"]
    if (
        not isinstance(size, list | tuple)
        or len(size) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in size)
    ):
        return f"the RLE size {reprlib.repr(size)} is not [height, width]"
    if list(size) != [height, width]:
        return f"the RLE is {size[0]}x{size[1]} (h x w), its image {height}x{width}"
    counts = rle["counts"]
    if not isinstance(counts, str):
        return f"the RLE counts are a {type(counts).__name__}, not a compressed string"
    if len(counts) > _RLE_MAX_CHARS * (height * width + 1):  # more characters than runs could need
        return f"the RLE counts have {len(counts)} characters, too many for {height}x{width} pixels"
    try:
        runs = rle_counts(counts)
    except ValueError as err:
        return f"the RLE counts do not parse: {err}"
    if sum(runs) != height * width:
        return f"the RLE runs cover {sum(runs)} pixels, not {height}x{width} = {height * width}"
    return None


def rle_area(rle: dict[str, Any]) -> int:
    """Foreground pixels of an RLE that passed :func:`rle_error` (the odd runs), without decoding it."""
    return sum(rle_counts(rle["counts"])[1::2])


def encode_rle(mask: np.ndarray) -> dict[str, Any]:
    """The COCO compressed RLE of an H×W binary mask, JSON-ready (``counts`` as an ASCII string)."""
    from pycocotools import mask as coco_mask

    rle = coco_mask.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}
