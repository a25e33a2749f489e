"""Single-image inference: a phrase and an image in, a probability map at the image's own size out.

``Predictor`` wraps a ``SegVLM`` with the preprocessing it was trained with: the image is resized to the
model's square input (``image_size``², CLIP mean/std normalisation, see ``segvlm.preprocess.eval_transform``),
the phrase is tokenized by the backbone's tokenizer, and the sigmoid of the logits is resized back to the
original H×W with bilinear interpolation. Thresholding is left to the caller (``probabilities > t``), so one
forward pass serves any threshold; ``Predictor.threshold`` is the one the checkpoint was calibrated with on
validation (``checkpoint_threshold``), which the CLI and the logged model use unless told otherwise.

``decode_image``, ``segment`` and ``encode_mask_png`` are the one path from an encoded image and a phrase to a
binary PNG mask: ``segvlm predict`` (a local file) and the served MLflow model (base64 in a request) both go
through them, so the two give the same mask for the same bytes, phrase and threshold.

``overlay`` draws a mask over the image with a caption bar naming the phrase, for humans (MLflow image logs,
the ``segvlm predict --overlay`` output).
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFilter, ImageFont, ImageOps, UnidentifiedImageError

from segvlm.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, eval_transform

__all__ = [
    "DEFAULT_THRESHOLD",
    "ImageError",
    "Predictor",
    "Segmentation",
    "check_threshold",
    "checkpoint_threshold",
    "decode_image",
    "encode_mask_png",
    "normalize_phrase",
    "overlay",
    "probabilities_to_size",
    "read_image_size",
    "segment",
]

Tokenize = Callable[[Sequence[str]], Mapping[str, torch.Tensor]]

DEFAULT_THRESHOLD = 0.5  # PhraseCut's and CLIPSeg's decision threshold, for checkpoints that store none


def check_threshold(value: float) -> float:
    """``value`` as a float, or a ValueError saying why it cannot be a decision threshold."""
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"threshold must lie in [0, 1], got {value}")
    return value


def checkpoint_threshold(meta: Mapping[str, Any]) -> float:
    """The decision threshold a checkpoint predicts with: ``extra.threshold`` of its ``meta.json`` (chosen on
    validation by ``segvlm train``), else :data:`DEFAULT_THRESHOLD`."""
    value = (meta.get("extra") or {}).get("threshold")
    if value is None:
        return DEFAULT_THRESHOLD
    value = float(value)
    if not 0.0 < value < 1.0:
        raise ValueError(f"checkpoint meta.json: extra.threshold must lie in (0, 1), got {value}")
    return value


def probabilities_to_size(logits: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``sigmoid(logits)`` resized to ``height × width`` with bilinear interpolation.

    Args:
        logits: ``B×1×h×w`` (or ``h×w``) raw model outputs.

    Returns:
        ``B×1×height×width`` (or ``height×width``) probabilities in ``[0, 1]``, float32.

    The sigmoid comes first so that the interpolation averages probabilities, which keeps them in
    ``[0, 1]``; this is the one recipe the CLI, the tests and the evaluator share, so a mask written by
    ``segvlm predict`` can be recomputed exactly from the saved logits.
    """
    squeeze = logits.dim() == 2
    probs = torch.sigmoid(logits.float())
    if squeeze:
        probs = probs[None, None]
    if probs.shape[-2:] != (height, width):
        probs = F.interpolate(probs, size=(height, width), mode="bilinear", align_corners=False)
    return probs[0, 0] if squeeze else probs


class Predictor:
    """Run a SegVLM model on one image and one phrase at a time.

    Args:
        model: a ``segvlm.model.SegVLM`` (``forward(pixel_values, input_ids, attention_mask) -> B×1×S×S``).
        image_size: the model's square input side ``S`` in pixels.
        tokenize: ``phrases -> {"input_ids", "attention_mask"}`` (``B×T`` tensors); defaults to
            ``model.backbone.tokenize``.
        device: where to run; the model is moved there and put in eval mode.
        image_mean, image_std: per-channel normalisation the model was trained with, when it is not CLIP's
            (transformers' CLIPSeg checkpoints were trained with ImageNet's; ``convert_clipseg`` records
            theirs in the checkpoint's meta and ``from_checkpoint`` passes it on).
        threshold: the decision threshold callers apply to the probabilities by default
            (``from_checkpoint``: the checkpoint's, see :func:`checkpoint_threshold`).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        image_size: int,
        *,
        tokenize: Tokenize | None = None,
        device: str | torch.device = "cpu",
        image_mean: tuple[float, float, float] | None = None,
        image_std: tuple[float, float, float] | None = None,
        threshold: float = DEFAULT_THRESHOLD,
    ) -> None:
        if tokenize is None:
            backbone = getattr(model, "backbone", None)
            if backbone is None or not hasattr(backbone, "tokenize"):
                raise TypeError("pass tokenize=..., the model has no backbone.tokenize")
            tokenize = backbone.tokenize
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.image_size = int(image_size)
        self.tokenize = tokenize
        self.threshold = float(threshold)
        # eval_transform normalises with CLIP's mean/std; an affine map turns that into another mean/std.
        self._renorm: tuple[torch.Tensor, torch.Tensor] | None = None
        if image_mean is not None or image_std is not None:
            mean = torch.tensor(image_mean or OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
            std = torch.tensor(image_std or OPENAI_CLIP_STD).view(1, 3, 1, 1)
            clip_mean = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
            clip_std = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
            # x_clip = (p - m_c)/s_c  ->  (p - m)/s = x_clip·(s_c/s) + (m_c - m)/s
            self._renorm = (clip_std / std, (clip_mean - mean) / std)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "cpu") -> Predictor:
        """Load a checkpoint folder written by ``segvlm.checkpoint.save_checkpoint``.

        Raises:
            segvlm.checkpoint.CheckpointError: the folder is missing, not a valid checkpoint, or has no
                tokenizer.
        """
        from segvlm.checkpoint import CheckpointError, load_checkpoint

        model, cfg, meta = load_checkpoint(path)
        if getattr(model.backbone, "tokenizer", None) is None:
            raise CheckpointError(
                f"{Path(path) / 'backbone'}: no tokenizer saved, so phrases cannot be tokenized"
            )
        extra = meta.get("extra") or {}
        mean, std = extra.get("image_mean"), extra.get("image_std")
        return cls(
            model,
            cfg.backbone.image_size,
            device=device,
            image_mean=tuple(mean) if mean else None,
            image_std=tuple(std) if std else None,
            threshold=checkpoint_threshold(meta),
        )

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """PIL image (any size, any mode) -> ``1×3×S×S`` normalised float32 on ``self.device``."""
        pixels = eval_transform(image.convert("RGB"), self.image_size).unsqueeze(0)
        if self._renorm is not None:
            scale, shift = self._renorm
            pixels = pixels * scale + shift
        return pixels.to(self.device)

    @torch.inference_mode()
    def predict_logits(self, image: Image.Image, phrase: str) -> torch.Tensor:
        """The model's raw output for one pair: ``S×S`` float32 logits on the CPU."""
        if not phrase or not phrase.strip():
            raise ValueError("phrase is empty")
        tokens = self.tokenize([phrase.strip()])
        logits = self.model(
            self.preprocess(image),
            tokens["input_ids"].to(self.device),
            tokens["attention_mask"].to(self.device),
        )
        return logits.float()[0, 0].cpu()

    def predict(self, image: Image.Image, phrase: str) -> tuple[np.ndarray, np.ndarray]:
        """Segment the region of ``image`` that ``phrase`` refers to.

        Returns:
            ``(probabilities, logits)``: probabilities as an ``H×W`` float32 array at the image's original
            size (``image.height × image.width``), and the logits as an ``S×S`` float32 array at the model's
            input size. ``probabilities == probabilities_to_size(logits, H, W)``.
        """
        logits = self.predict_logits(image, phrase)
        probs = probabilities_to_size(logits, image.height, image.width)
        return probs.numpy().astype(np.float32, copy=False), logits.numpy().astype(np.float32, copy=False)


# ------------------------------------------------------------------------- bytes in, mask out (shared)
class ImageError(ValueError):
    """Bytes that are not a readable image, or an image over the pixel limit."""


def read_image_size(data: bytes) -> tuple[int, int]:
    """``(width, height)`` from an encoded image's header, without decoding its pixels. Raises ImageError."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.size
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as err:
        raise ImageError(f"not an image or corrupt ({err})") from None


def decode_image(data: bytes, *, max_pixels: int | None = None) -> Image.Image:
    """Encoded image bytes (PNG, JPEG, WebP, ... anything PIL reads) -> the RGB image as people see it.

    ``max_pixels``: refuse an image whose width × height (read from its header, before any pixel is decoded)
    exceeds it, so a small file that declares a huge canvas never reaches the allocator. The EXIF
    orientation is applied (phone photos store their rotation there; the mask must match the image as
    shown). Multi-frame files give their first frame.

    Raises:
        ImageError: not an image, truncated or corrupt, or over ``max_pixels``.
    """
    try:
        img = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as err:
        raise ImageError(f"not an image or corrupt ({err})") from None
    with img:
        width, height = img.size
        if max_pixels is not None and width * height > max_pixels:
            raise ImageError(
                f"image is {width}×{height} = {width * height} pixels, over the limit of {max_pixels}"
            )
        try:
            img.load()
            return ImageOps.exif_transpose(img).convert("RGB")
        except (Image.DecompressionBombError, OSError, ValueError, SyntaxError) as err:
            raise ImageError(f"not an image or corrupt ({err})") from None


def normalize_phrase(phrase: str) -> str:
    """``phrase`` with runs of whitespace collapsed to one space; ValueError when nothing is left."""
    text = " ".join(str(phrase).split())
    if not text:
        raise ValueError("phrase is empty or whitespace")
    return text


@dataclasses.dataclass(frozen=True)
class Segmentation:
    """One phrase's mask on one image.

    Attributes:
        mask: ``H×W`` bool at the image's original size, ``probabilities > threshold``.
        probabilities: ``H×W`` float32 in ``[0, 1]`` (see :meth:`Predictor.predict`).
        logits: ``S×S`` float32 at the model's input size.
        threshold: the decision threshold applied.
        phrase: the phrase as the model saw it (whitespace collapsed).
    """

    mask: np.ndarray
    probabilities: np.ndarray
    logits: np.ndarray
    threshold: float
    phrase: str

    @property
    def foreground(self) -> float:
        """Share of the image's pixels in the mask, in ``[0, 1]``."""
        return float(self.mask.mean())

    @property
    def score(self) -> float:
        """Mean probability over the mask's pixels (how sure the model is of what it marked); 0 if empty."""
        return float(self.probabilities[self.mask].mean()) if self.mask.any() else 0.0


def segment(
    predictor: Predictor, image: Image.Image, phrase: str, threshold: float | None = None
) -> Segmentation:
    """Segment what ``phrase`` refers to in ``image``: the one recipe of ``segvlm predict`` and the served model.

    ``threshold``: ``None`` for the predictor's (the checkpoint's, chosen on validation). Raises ValueError
    for an empty phrase or a threshold outside ``[0, 1]``.
    """
    text = normalize_phrase(phrase)
    t = predictor.threshold if threshold is None else check_threshold(threshold)
    probabilities, logits = predictor.predict(image, text)
    return Segmentation(probabilities > t, probabilities, logits, t, text)


def encode_mask_png(mask: np.ndarray) -> bytes:
    """``H×W`` bool mask -> PNG bytes: 8-bit grayscale (mode L), 0 background, 255 foreground, W×H pixels."""
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(mask, dtype=bool).astype(np.uint8) * 255).save(buffer, format="PNG")
    return buffer.getvalue()


# -------------------------------------------------------------------------------------------- overlay
def _caption_font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:  # Pillow >= 10.1 ships a scalable default font; older ones only a tiny bitmap font
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def _fit_text(draw: ImageDraw.ImageDraw, text: str, font: Any, max_width: float) -> str:
    """``text``, shortened with an ellipsis until it fits ``max_width`` pixels."""
    if draw.textlength(text, font=font) <= max_width:
        return text
    while text and draw.textlength(text + "…", font=font) > max_width:
        text = text[:-1]
    return text + "…"


def overlay(
    image: Image.Image,
    mask: np.ndarray,
    phrase: str,
    *,
    color: tuple[int, int, int] = (255, 40, 40),
    alpha: float = 0.45,
) -> Image.Image:
    """The image with ``mask`` tinted and outlined, above a caption bar that shows ``phrase``.

    Args:
        image: the original image (any mode; drawn as RGB).
        mask: ``H×W`` boolean (or 0/1, or probabilities > 0.5 count as foreground) at the image's size.
        phrase: the caption.

    Returns:
        An RGB image of width ``W`` and height ``H + caption height``: rows ``[0, H)`` are the image, with
        ``color`` blended in at ``alpha`` inside the mask and drawn fully along the mask's boundary; the rows
        below are a dark bar with the phrase in white.
    """
    base = image.convert("RGB")
    width, height = base.size
    mask = np.asarray(mask)
    if mask.shape != (height, width):
        raise ValueError(f"mask is {mask.shape}, image is {height}×{width}")
    fg = mask > 0.5 if mask.dtype.kind == "f" else mask.astype(bool)

    rgb = np.asarray(base, dtype=np.float32)
    tint = np.asarray(color, dtype=np.float32)
    rgb[fg] = (1 - alpha) * rgb[fg] + alpha * tint
    # Contour = mask minus its erosion: inside the mask, so it never hides context; ~0.5% of the image wide.
    mask_img = Image.fromarray(fg.astype(np.uint8) * 255, mode="L")
    radius = max(1, round(min(width, height) / 200))
    eroded = np.asarray(mask_img.filter(ImageFilter.MinFilter(2 * radius + 1))) > 0
    rgb[fg & ~eroded] = tint
    painted = Image.fromarray(np.clip(rgb + 0.5, 0, 255).astype(np.uint8), mode="RGB")

    font = _caption_font(max(10, min(24, width // 20)))
    probe = ImageDraw.Draw(painted)
    _, top, _, bottom = probe.textbbox((0, 0), "Ag", font=font)
    pad = max(2, (bottom - top) // 3)
    bar = bottom - top + 2 * pad
    canvas = Image.new("RGB", (width, height + bar), (20, 20, 20))
    canvas.paste(painted, (0, 0))
    draw = ImageDraw.Draw(canvas)
    text = _fit_text(draw, " ".join(phrase.split()), font, width - 2 * pad)
    draw.text((pad, height + pad - top), text, fill=(255, 255, 255), font=font)
    return canvas
