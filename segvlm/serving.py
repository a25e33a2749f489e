"""Serving requests: base64 images and phrases in, base64 PNG masks and scores out, within limits.

The served MLflow model (``jobs/serving_model.py``) is a thin wrapper around :func:`serve_rows`; this module has
no MLflow in it so that the request rules are plain functions with plain tests.

A request is a list of rows (a DataFrame's records), each with

* ``image_b64``: the image *file's* bytes (PNG, JPEG, ... anything PIL reads), base64-encoded (standard
  alphabet, padded; a ``data:image/...;base64,`` prefix is accepted). File paths and URLs are refused with a
  clear error and never opened: the server reads nothing but the request.
* ``phrase``: the referring expression.
* ``threshold`` (optional, may be missing or null): foreground if probability > threshold; default the
  checkpoint's, chosen on validation.

Each answer row holds ``mask_png_b64`` (the binary mask, PNG mode L, 0/255, at the image's original size,
base64: the bytes ``segvlm predict --out`` writes for the same inputs), ``width``, ``height``, ``threshold``,
``mask_pixels``, ``foreground`` (share of pixels), ``score`` (mean probability inside the mask, 0 if empty)
and ``max_probability``.

Every row is checked against :class:`RequestLimits` before any model work, so one bad row refuses the whole
request cheaply; errors are :class:`RequestError` naming the row and the field.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from segvlm.inference import (
    ImageError,
    Predictor,
    check_threshold,
    decode_image,
    encode_mask_png,
    normalize_phrase,
    read_image_size,
    segment,
)

__all__ = [
    "IMAGE_COLUMN",
    "OUTPUT_COLUMNS",
    "PHRASE_COLUMN",
    "THRESHOLD_COLUMN",
    "Request",
    "RequestError",
    "RequestLimits",
    "decode_image_b64",
    "parse_rows",
    "serve_rows",
]

IMAGE_COLUMN = "image_b64"
PHRASE_COLUMN = "phrase"
THRESHOLD_COLUMN = "threshold"
# answer fields, in order, with their JSON types (the logged model's output signature is built from these)
OUTPUT_COLUMNS: dict[str, type] = {
    "mask_png_b64": str,
    "width": int,
    "height": int,
    "threshold": float,
    "mask_pixels": int,
    "foreground": float,
    "score": float,
    "max_probability": float,
}

_DATA_URL = re.compile(r"^data:image/[A-Za-z0-9.+-]+;base64,")
# A scheme (file:, s3://, http://), a home or relative folder, a Windows drive or share, or a file extension:
# none of these can occur in standard base64 (its alphabet is A-Z a-z 0-9 + / =).
_PATH_LIKE = re.compile(r"^(?:[A-Za-z][A-Za-z0-9+.-]*:|~|\.\.?[/\\]|\\\\)|\.[A-Za-z0-9]{1,5}$")


class RequestError(ValueError):
    """A request the model refuses (bad or oversized input); the message names the row and the field."""


@dataclasses.dataclass(frozen=True)
class RequestLimits:
    """What one request may hold. Checked before decoding, so an oversized request costs almost nothing.

    Attributes:
        max_rows: rows (image–phrase pairs) per request.
        max_image_bytes: size of one encoded image file (before base64, which adds a third).
        max_pixels: width × height of one image, read from its header before its pixels are decoded.
        max_phrase_chars: characters of one phrase (the tokenizer keeps only the first few dozen tokens).
    """

    max_rows: int = 16
    max_image_bytes: int = 8 * 2**20
    max_pixels: int = 4096 * 4096
    max_phrase_chars: int = 512

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"RequestLimits.{field.name} must be a positive integer, got {value!r}")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> RequestLimits:
        """Limits from a plain mapping (the logged model's ``model_config["limits"]``); unknown keys are errors."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown request limits {unknown}; known: {sorted(known)}")
        return cls(**dict(values))

    @property
    def max_b64_chars(self) -> int:
        """Longest ``image_b64`` string that can hold ``max_image_bytes`` (padded base64, plus a data-URL prefix)."""
        return 4 * math.ceil(self.max_image_bytes / 3) + 64


@dataclasses.dataclass(frozen=True)
class Request:
    """One checked row: the image file's bytes (within the limits, not decoded yet: a request's images are
    decoded one at a time), the normalised phrase and the threshold (``None``: the model's)."""

    image: bytes
    phrase: str
    threshold: float | None


def _preview(text: str, n: int = 48) -> str:
    return repr(text if len(text) <= n else text[:n] + "...")


def decode_image_b64(text: Any, limits: RequestLimits, where: str = IMAGE_COLUMN) -> bytes:
    """A request's ``image_b64`` value -> the image file's bytes, checked against ``limits`` (size in bytes;
    width × height from the header, pixels not decoded yet). Raises :class:`RequestError`.

    Never opens a file: a value that looks like a path or URL is refused as such.
    """
    if isinstance(text, bytes | bytearray):
        try:
            text = bytes(text).decode("ascii")
        except UnicodeDecodeError:
            raise RequestError(f"{where}: not base64 text (non-ASCII bytes)") from None
    if not isinstance(text, str):
        raise RequestError(f"{where}: expected a base64 string, got {type(text).__name__}")
    if len(text) > limits.max_b64_chars:
        raise RequestError(
            f"{where}: {len(text)} characters of base64, over the limit of {limits.max_b64_chars} "
            f"(image files up to {limits.max_image_bytes} bytes)"
        )
    text = _DATA_URL.sub("", text.strip(), count=1)
    path_refusal = (
        f"{where}: {_preview(text)} looks like a file path or URL; the model never opens paths, "
        "send the image file's bytes base64-encoded"
    )
    if not text:
        raise RequestError(f"{where}: empty")
    if _PATH_LIKE.search(text):
        raise RequestError(path_refusal)
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as err:
        # JPEG's base64 starts with "/9j/", so a leading slash alone does not make a path; failing to decode
        # as well does.
        if text.startswith("/"):
            raise RequestError(path_refusal) from None
        raise RequestError(f"{where}: not valid base64 ({err})") from None
    if len(data) > limits.max_image_bytes:
        raise RequestError(
            f"{where}: image file is {len(data)} bytes, over the limit of {limits.max_image_bytes}"
        )
    try:
        width, height = read_image_size(data)
    except ImageError as err:
        if text.startswith("/"):
            raise RequestError(path_refusal) from None
        raise RequestError(f"{where}: {err}") from None
    if width * height > limits.max_pixels:
        raise RequestError(
            f"{where}: image is {width}×{height} = {width * height} pixels, over the limit of {limits.max_pixels}"
        )
    return data


def _threshold(value: Any, where: str) -> float | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None  # a missing value in a DataFrame column is NaN
    if isinstance(value, bool) or not isinstance(value, int | float):
        try:
            value = float(value)  # numpy scalars
        except (TypeError, ValueError):
            raise RequestError(f"{where}: expected a number, got {type(value).__name__}") from None
        if math.isnan(value):
            return None
    try:
        return check_threshold(value)
    except ValueError as err:
        raise RequestError(f"{where}: {err}") from None


def parse_rows(rows: Sequence[Mapping[str, Any]], limits: RequestLimits) -> list[Request]:
    """Check every row (all of them before any model work). Raises :class:`RequestError`."""
    if len(rows) > limits.max_rows:
        raise RequestError(f"request has {len(rows)} rows, over the limit of {limits.max_rows}")
    requests = []
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise RequestError(f"row {i}: expected a record with {IMAGE_COLUMN!r} and {PHRASE_COLUMN!r}")
        missing = [c for c in (IMAGE_COLUMN, PHRASE_COLUMN) if c not in row]
        if missing:
            raise RequestError(f"row {i}: missing {missing} (the image goes in {IMAGE_COLUMN!r} as base64)")
        phrase = row[PHRASE_COLUMN]
        if not isinstance(phrase, str):
            raise RequestError(f"row {i} {PHRASE_COLUMN}: expected a string, got {type(phrase).__name__}")
        if len(phrase) > limits.max_phrase_chars:
            raise RequestError(
                f"row {i} {PHRASE_COLUMN}: {len(phrase)} characters, over the limit of {limits.max_phrase_chars}"
            )
        try:
            phrase = normalize_phrase(phrase)
        except ValueError as err:
            raise RequestError(f"row {i} {PHRASE_COLUMN}: {err}") from None
        threshold = _threshold(row.get(THRESHOLD_COLUMN), f"row {i} {THRESHOLD_COLUMN}")
        image = decode_image_b64(row[IMAGE_COLUMN], limits, where=f"row {i} {IMAGE_COLUMN}")
        requests.append(Request(image, phrase, threshold))
    return requests


def serve_rows(
    predictor: Predictor, rows: Sequence[Mapping[str, Any]], limits: RequestLimits
) -> list[dict[str, Any]]:
    """Answer a request: one dict per row with the fields of :data:`OUTPUT_COLUMNS` (see the module doc)."""
    answers = []
    for i, request in enumerate(parse_rows(rows, limits)):
        try:
            image = decode_image(request.image, max_pixels=limits.max_pixels)
        except ImageError as err:  # a header that reads but pixel data that does not (truncated file)
            raise RequestError(f"row {i} {IMAGE_COLUMN}: {err}") from None
        result = segment(predictor, image, request.phrase, request.threshold)
        answers.append(
            {
                "mask_png_b64": base64.b64encode(encode_mask_png(result.mask)).decode("ascii"),
                "width": image.width,
                "height": image.height,
                "threshold": result.threshold,
                "mask_pixels": int(result.mask.sum()),
                "foreground": result.foreground,
                "score": result.score,
                "max_probability": float(result.probabilities.max()),
            }
        )
    return answers
