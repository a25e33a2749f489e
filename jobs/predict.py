"""Segment one image with one phrase: ``segvlm predict --checkpoint CKPT --image FILE --phrase TEXT --out mask.png``.

Launch: ``segvlm predict --checkpoint runs/demo/best --image cat.jpg --phrase "the black cat" --out mask.png
[--overlay overlay.png] [--save-logits logits.npy] [--threshold T] [--device cpu]``
(same as ``python -m jobs.predict ...``).

Writes a binary mask PNG (mode L, 0/255) at the image's original size, optionally an overlay (image + tinted
mask + caption) and the raw logits at the model's input size as a float32 ``.npy``
(``mask == bilinear(sigmoid(logits), H×W) > threshold``; the threshold is the checkpoint's, chosen on
validation, unless ``--threshold`` is given). Every output is written under a temporary name and renamed, so
a reader never sees half a file. Bad inputs exit with code 2 and a one-line message.

The model ``segvlm train`` registers in MLflow serves the same mask over HTTP (``mlflow models serve``):
the image's bytes go through the same decoding and ``segvlm.inference.segment``, and the PNG it returns
(base64) is this command's ``--out`` file; request and response format in docs/serving.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from segvlm.atomic import write_atomic

PROG = "segvlm predict"


class UsageError(Exception):
    """A bad input: printed as one line, exit code 2."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__.splitlines()[0],
        epilog=(
            "The registered MLflow model answers POST /invocations with the same mask: send "
            '{"dataframe_records": [{"image_b64": <base64 of the image file>, "phrase": "...", '
            '"threshold": <optional>}]} and read predictions[i].mask_png_b64 (this --out PNG, base64), '
            "width, height, threshold, mask_pixels, foreground, score, max_probability. "
            "Limits, errors and serving commands: docs/serving.md."
        ),
    )
    p.add_argument(
        "--checkpoint", required=True, help="checkpoint folder (save_checkpoint / convert-clipseg)"
    )
    p.add_argument("--image", required=True, help="input image file (any format PIL reads)")
    p.add_argument("--phrase", required=True, help="the referring expression, e.g. 'the red circle'")
    p.add_argument("--out", required=True, help="binary mask PNG to write (0/255, original image size)")
    p.add_argument("--overlay", help="also write the image with the mask tinted and the phrase as a caption")
    p.add_argument("--save-logits", help="also write the S×S float32 logits at the model's input size (.npy)")
    p.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="foreground if probability > T (default: the checkpoint's, chosen on validation; else 0.5)",
    )
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default cpu)")
    return p


def _load_image(path: Path):  # -> PIL.Image.Image
    from segvlm.inference import ImageError, decode_image

    if not path.exists():
        raise UsageError(f"image not found: {path}")
    if not path.is_file():
        raise UsageError(f"image is not a file: {path}")
    try:
        # the file's bytes, decoded exactly as the served model decodes a request's base64 bytes
        return decode_image(path.read_bytes())
    except ImageError as err:
        raise UsageError(f"cannot read image {path}: {err}") from err


def run(args: argparse.Namespace) -> dict[str, str]:
    """Do the work; returns the written paths. Raises ``UsageError`` for bad inputs."""
    import numpy as np

    from segvlm.inference import check_threshold, normalize_phrase

    try:
        phrase = normalize_phrase(args.phrase)
    except ValueError:
        raise UsageError("phrase is empty or whitespace: pass --phrase 'the thing to segment'") from None
    if args.threshold is not None:
        try:
            check_threshold(args.threshold)
        except ValueError as err:
            raise UsageError(f"--{err}") from None
    image = _load_image(Path(args.image))

    import torch

    if str(args.device).startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: CUDA is not available on this machine (use --device cpu)")

    from segvlm.checkpoint import CheckpointError
    from segvlm.inference import Predictor, encode_mask_png, overlay, segment

    ckpt = Path(args.checkpoint)
    if not ckpt.exists():
        raise UsageError(f"checkpoint not found: {ckpt}")
    try:
        predictor = Predictor.from_checkpoint(ckpt, device=args.device)
    except CheckpointError as err:
        raise UsageError(f"cannot load checkpoint {ckpt}: {err}") from err

    result = segment(predictor, image, phrase, args.threshold)

    from PIL import Image

    written: dict[str, str] = {}
    out = Path(args.out)
    png = encode_mask_png(result.mask)
    write_atomic(out, lambda tmp: tmp.write_bytes(png))
    written["mask"] = str(out)
    if args.overlay:
        path = Path(args.overlay)
        fmt = Image.registered_extensions().get(path.suffix.lower(), "PNG")
        write_atomic(path, lambda tmp: overlay(image, result.mask, phrase).save(tmp, format=fmt))
        written["overlay"] = str(path)
    if args.save_logits:
        path = Path(args.save_logits)

        def save_npy(tmp: Path) -> None:
            with open(tmp, "wb") as f:  # a file object: np.save would append ".npy" to a bare name
                np.save(f, result.logits.astype(np.float32))

        write_atomic(path, save_npy)
        written["logits"] = str(path)
    print(
        f"{PROG}: {phrase!r}: {result.foreground:.1%} of {image.width}×{image.height} px above "
        f"{result.threshold:g} -> {out}"
    )
    return written


def main(argv: list[str] | None = None) -> int:
    """``segvlm predict --checkpoint CKPT --image FILE --phrase TEXT --out mask.png`` (see module docstring)."""
    args = _parser().parse_args(argv)
    try:
        run(args)
    except UsageError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
