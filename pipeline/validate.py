"""Checks for hostile input records: ids that become file names, paths, text, sizes that reach allocators.

Every check returns ``None`` for a good value, or a short sentence saying what is wrong; the reader turns
that into a quarantine row (``pipeline/quarantine.py``). The rules (docs/data-safety.md):

* **Ids** (``image_id``, ``task_id``): :data:`ID_PATTERN`, ``[A-Za-z0-9][A-Za-z0-9_-]{0,199}``. No dot at
  all, so no ``..``, no hidden files, no extension games; no separator, so an id is always exactly one path
  component; and ``make_key`` maps such an id to itself, so two ids never share a shard key. 200 characters
  leave room for a generated prompt's suffix and ``.png`` under the 255-byte file-name limit. Integer image
  ids (PhraseCut's) are checked as their decimal string.
* **Paths**: an image path is resolved (symlinks followed) and must stay inside the resolved dataset root;
  the file is then opened with ``O_NOFOLLOW``. Files a job writes from an id go through :func:`safe_child`.
* **Text**: valid Unicode (no lone surrogates), no control or line/paragraph separator characters, at most
  :data:`MAX_PHRASE_CHARS` characters. An overlong phrase is quarantined, not truncated: a cut phrase may
  no longer refer to its mask.
* **Sizes**: width/height are positive integers with ``width × height ≤ max_pixels`` (PrepareConfig,
  default :data:`DEFAULT_MAX_PIXELS`), checked against the metadata and again against the image *header*
  before any pixel is decoded; the file itself is at most ``max_image_bytes``. Polygon points must lie
  within one image size of the image (farther is not a slightly-off annotation but garbage), and a task
  has at most :data:`MAX_POINTS_PER_TASK` points.
* **Loaders** reading shards re-check sizes against :data:`LOADER_MAX_PIXELS` before they allocate:
  a shard is a file too, and may have been written by something else.
"""

from __future__ import annotations

import math
import os
import re
import stat
import unicodedata
from pathlib import Path
from typing import Any

from PIL import Image

ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,199}")
MAX_PHRASE_CHARS = 512
# 36 MP (6000 × 6000, ~108 MB decoded RGB): far above any PhraseCut/Visual Genome image, far below Pillow's
# MAX_IMAGE_PIXELS (89.5 MP, where Pillow merely warns; it refuses only at twice that).
DEFAULT_MAX_PIXELS = 36_000_000
DEFAULT_MAX_IMAGE_BYTES = 64 * 2**20
# what any loader accepts from a shard; PrepareConfig.max_pixels may not exceed it
LOADER_MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
LOADER_MAX_MEMBER_BYTES = 256 * 2**20  # a tar member a loader reads whole; max_image_bytes may not exceed it
MAX_SIDE = 65_535  # JPEG's own limit; also bounds each side separately (a 1 × 36M strip is no image)
MAX_POINTS_PER_TASK = 100_000
MAX_STRUCTURE_ITEMS = 1_000  # strings/values in one phrase_structure
_FORBIDDEN_CATEGORIES = ("Cc", "Cs", "Zl", "Zp")  # controls, surrogates, line/paragraph separators


class UnsafePathError(ValueError):
    """A path built from record data would leave the folder it must stay in."""


# ------------------------------------------------------------------------------------------------ ids
def id_error(value: Any, what: str = "id") -> str | None:
    """Why ``value`` is not a safe id (an int >= 0, or a str matching :data:`ID_PATTERN`); None when it is."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        return f"{what} is a {type(value).__name__}, not an int or a string"
    text = str(value)
    if ID_PATTERN.fullmatch(text) is None:
        return f"{what} {_show(text)} is not a safe name ([A-Za-z0-9][A-Za-z0-9_-]{{0,199}})"
    return None


def safe_child(folder: str | os.PathLike[str], name: str) -> Path:
    """``folder / name`` when ``name`` is one plain component that stays inside ``folder``; else raise.

    For files named after record ids (``{task_id}.png``): the id rule already forbids separators and
    dots, this is the last line that holds even if a caller skipped it.
    """
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\x00" in name:
        raise UnsafePathError(f"{_show(name)} is not a single file name")
    base = Path(folder).resolve()
    path = (base / name).resolve()
    if path.parent != base:
        raise UnsafePathError(f"{_show(name)} resolves outside {base}")
    return path


def resolve_inside(root: str | os.PathLike[str], relative: str) -> str:
    """The real path of ``root/relative``; raises :class:`UnsafePathError` if it (or a symlink on the
    way) leads outside the real ``root``."""
    base = os.path.realpath(root)
    path = os.path.realpath(os.path.join(base, relative))
    if os.path.commonpath([base, path]) != base or path == base:
        raise UnsafePathError(f"{relative} resolves to {path}, outside the dataset root {base}")
    return path


def read_file_inside(root: str | os.PathLike[str], relative: str, max_bytes: int) -> tuple[str, bytes]:
    """``(real path, bytes)`` of ``root/relative``, refusing paths out of ``root`` and files over ``max_bytes``.

    The resolved path is opened with ``O_NOFOLLOW`` and its size taken from the open descriptor, so a
    symlink swapped in after the check is refused and the size read is the size of what is read.
    Raises FileNotFoundError, :class:`UnsafePathError`, or :class:`TooLargeError`.
    """
    path = resolve_inside(root, relative)
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise FileNotFoundError(f"{relative} is not a regular file")
        if info.st_size > max_bytes:
            raise TooLargeError(f"{relative} has {info.st_size} bytes, over the limit of {max_bytes}")
        f = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:  # grew since the fstat
        raise TooLargeError(f"{relative} has more than {max_bytes} bytes")
    return path, data


class TooLargeError(ValueError):
    """A file or image over the configured size limits."""


# ------------------------------------------------------------------------------------------------ text
def text_error(value: Any, what: str = "phrase", max_chars: int = MAX_PHRASE_CHARS) -> str | None:
    """Why ``value`` is not clean text (str, valid Unicode, no control characters, not too long)."""
    if not isinstance(value, str):
        return f"{what} is a {type(value).__name__}, not a string"
    if len(value) > max_chars:
        return f"{what} has {len(value)} characters, over the limit of {max_chars}"
    for i, char in enumerate(value):
        category = unicodedata.category(char)
        if category in _FORBIDDEN_CATEGORIES:
            kind = "a lone surrogate" if category == "Cs" else "a control character"
            return f"{what} holds {kind} U+{ord(char):04X} at {i}"
    return None


def structure_error(structure: Any) -> str | None:
    """Why a ``phrase_structure`` (None or a JSON object) holds unclean text or is oversized."""
    if structure is None:
        return None
    seen = 0
    stack: list[tuple[Any, int]] = [(structure, 0)]
    while stack:
        value, depth = stack.pop()
        seen += 1
        if seen > MAX_STRUCTURE_ITEMS or depth > 4:
            return f"phrase_structure is larger than {MAX_STRUCTURE_ITEMS} values or deeper than 4 levels"
        if isinstance(value, str):
            error = text_error(value, "a phrase_structure string")
            if error:
                return error
        elif isinstance(value, dict):
            for key, item in value.items():
                error = text_error(key, "a phrase_structure key")
                if error:
                    return error
                stack.append((item, depth + 1))
        elif isinstance(value, list):
            stack.extend((item, depth + 1) for item in value)
        elif isinstance(value, float) and not math.isfinite(value):
            return "phrase_structure holds a non-finite number"
    return None


# ------------------------------------------------------------------------------------------------ sizes
def is_number(value: Any) -> bool:
    """A finite int or float (not a bool); an int too large for a float is not a number here."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _dimension(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def size_error(width: Any, height: Any, max_pixels: int | None, what: str) -> str | None:
    """Why ``width × height`` is not a usable image size (positive ints, each side and, unless
    ``max_pixels`` is None, the area bounded)."""
    w, h = _dimension(width), _dimension(height)
    if w is None or h is None:
        return f"{what} width/height {_show(width)}x{_show(height)} are not integers"
    if w < 1 or h < 1 or w > MAX_SIDE or h > MAX_SIDE:
        return f"{what} size {w}x{h} is not within 1..{MAX_SIDE} per side"
    if max_pixels is not None and w * h > max_pixels:
        return f"{what} size {w}x{h} = {w * h} pixels, over the limit of {max_pixels}"
    return None


def meta_size(meta: Any) -> tuple[tuple[int, int] | None, str | None]:
    """``((width, height), None)`` from a metadata row, or ``(None, why)`` (the pixel limit is checked
    apart, as its own quarantine reason)."""
    if not isinstance(meta, dict):
        return None, f"the metadata row is a {type(meta).__name__}, not an object"
    missing = [k for k in ("width", "height") if k not in meta]
    if missing:
        return None, f"the metadata row lacks {', '.join(missing)}"
    error = size_error(meta["width"], meta["height"], None, "metadata")
    if error:
        return None, error
    return (_dimension(meta["width"]), _dimension(meta["height"])), None  # type: ignore[return-value]


def polygon_error(instances: list[list[list[Any]]], width: int, height: int) -> str | None:
    """Why polygon coordinates are absurd: over :data:`MAX_POINTS_PER_TASK` points, or a point farther
    than one image size outside the image (``x ∉ [-w, 2w]`` or ``y ∉ [-h, 2h]``). Slightly-outside points
    are normal in PhraseCut and are clipped by the reader instead."""
    points = 0
    for instance in instances:
        for polygon in instance:
            points += len(polygon)
            if points > MAX_POINTS_PER_TASK:
                return f"more than {MAX_POINTS_PER_TASK} polygon points"
            for x, y in polygon:
                if not (-width <= x <= 2 * width and -height <= y <= 2 * height):
                    return f"point ({x:.6g}, {y:.6g}) lies far outside the {width}x{height} image"
    return None


MAX_OUTLINE_PER_SIDE = 100  # a COCO polygon's outline, in (width + height) units


def coco_polygon_error(segmentation: Any, width: int, height: int) -> str | None:
    """Why a COCO polygon segmentation (``[[x1, y1, x2, y2, ...], ...]``) must not reach pycocotools.

    Each polygon is a flat list of an even number (6 or more: pycocotools reads 4 numbers as a box) of
    finite numbers; points obey :func:`polygon_error`'s rules; and the outline (per edge the longer of
    |dx|, |dy|) is at most :data:`MAX_OUTLINE_PER_SIDE` × (width + height), since pycocotools' rasteriser
    allocates memory in proportion to it.
    """
    if not isinstance(segmentation, list) or not segmentation:
        return "the segmentation is not a non-empty list of polygons"
    pairs: list[list[list[float]]] = []
    outline = 0.0
    for i, flat in enumerate(segmentation):
        if (
            not isinstance(flat, list)
            or len(flat) < 6
            or len(flat) % 2
            or not all(is_number(v) for v in flat)
        ):
            return f"polygon {i} is not a flat list of 3+ [x, y] number pairs"
        points = [[flat[k], flat[k + 1]] for k in range(0, len(flat), 2)]
        for (x0, y0), (x1, y1) in zip(points, points[1:] + points[:1]):
            outline += max(abs(x1 - x0), abs(y1 - y0))
        pairs.append(points)
    error = polygon_error([pairs], width, height)
    if error:
        return error
    if outline > MAX_OUTLINE_PER_SIDE * (width + height):
        return f"the outline is {outline:.0f} px long, over {MAX_OUTLINE_PER_SIDE} x (width + height)"
    return None


def header_size(data: bytes) -> tuple[int, int]:
    """``(width, height)`` from an image's header, without decoding its pixels (raises on garbage)."""
    import io
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the caller checks the size
        with Image.open(io.BytesIO(data)) as image:
            return image.size


def check_sample_sizes(record: Any, jpg: bytes, max_pixels: int = LOADER_MAX_PIXELS) -> None:
    """Raise ValueError unless a shard sample's sizes are safe to allocate from: the record's stored and
    original sizes, and the image header, each within :func:`size_error`'s bounds."""
    for what, (w, h) in (
        ("stored", (record.width, record.height)),
        ("original", (record.orig_width, record.orig_height)),
        ("image header", header_size(jpg)),
    ):
        error = size_error(w, h, max_pixels, what)
        if error:
            raise ValueError(f"sample {getattr(record, 'key', '?')}: {error}")


def _show(value: Any, limit: int = 80) -> str:
    """repr of a value, shortened: details may quote hostile input, never at full length."""
    try:
        text = repr(value)
    except RecursionError:  # a container nested deeper than repr can go (a pickle builds those cheaply)
        return f"<a {type(value).__name__} nested too deeply to show>"
    return text if len(text) <= limit else f"{text[: limit - 12]}...({len(text)} chars)"
