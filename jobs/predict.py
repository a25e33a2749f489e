"""Segment one image with one phrase: ``segvlm predict --checkpoint CKPT --image FILE --phrase TEXT --out mask.png``.

Launch: ``segvlm predict --checkpoint runs/demo/best --image cat.jpg --phrase "the black cat" --out mask.png
[--overlay overlay.png] [--save-logits logits.npy] [--threshold T] [--device cpu]``
(same as ``python -m jobs.predict ...``).

Writes a binary mask PNG (mode L, 0/255) at the image's original size, optionally an overlay (image + tinted
mask + caption) and the raw logits at the model's input size as a float32 ``.npy``
(``mask == bilinear(sigmoid(logits), H×W) > threshold``; the threshold is the checkpoint's, chosen on
validation, unless ``--threshold`` is given). Every output is written under a temporary name and renamed, so
a reader never sees half a file. Bad inputs exit with code 2 and a one-line message.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

PROG = "segvlm predict"


class UsageError(Exception):
    """A bad input: printed as one line, exit code 2."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
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


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` for a temporary file beside ``path``, then rename it onto ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _load_image(path: Path):  # -> PIL.Image.Image
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not path.exists():
        raise UsageError(f"image not found: {path}")
    if not path.is_file():
        raise UsageError(f"image is not a file: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            # Phone photos store their rotation in EXIF; the mask must match the image as people see it.
            return ImageOps.exif_transpose(img).convert("RGB")
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as err:
        raise UsageError(f"cannot read image {path}: not an image or corrupt ({err})") from err


def run(args: argparse.Namespace) -> dict[str, str]:
    """Do the work; returns the written paths. Raises ``UsageError`` for bad inputs."""
    import numpy as np

    phrase = " ".join(str(args.phrase).split())
    if not phrase:
        raise UsageError("phrase is empty or whitespace: pass --phrase 'the thing to segment'")
    if args.threshold is not None:
        from segvlm.inference import check_threshold

        try:
            check_threshold(args.threshold)
        except ValueError as err:
            raise UsageError(f"--{err}") from None
    image = _load_image(Path(args.image))

    import torch

    if str(args.device).startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: CUDA is not available on this machine (use --device cpu)")

    from segvlm.checkpoint import CheckpointError
    from segvlm.inference import Predictor, overlay

    ckpt = Path(args.checkpoint)
    if not ckpt.exists():
        raise UsageError(f"checkpoint not found: {ckpt}")
    try:
        predictor = Predictor.from_checkpoint(ckpt, device=args.device)
    except CheckpointError as err:
        raise UsageError(f"cannot load checkpoint {ckpt}: {err}") from err

    probabilities, logits = predictor.predict(image, phrase)
    threshold = predictor.threshold if args.threshold is None else args.threshold
    mask = probabilities > threshold

    from PIL import Image

    written: dict[str, str] = {}
    out = Path(args.out)
    mask_img = Image.fromarray(mask.astype(np.uint8) * 255, mode="L")
    _atomic_write(out, lambda tmp: mask_img.save(tmp, format="PNG"))
    written["mask"] = str(out)
    if args.overlay:
        path = Path(args.overlay)
        fmt = Image.registered_extensions().get(path.suffix.lower(), "PNG")
        _atomic_write(path, lambda tmp: overlay(image, mask, phrase).save(tmp, format=fmt))
        written["overlay"] = str(path)
    if args.save_logits:
        path = Path(args.save_logits)

        def save_npy(tmp: Path) -> None:
            with open(tmp, "wb") as f:  # a file object: np.save would append ".npy" to a bare name
                np.save(f, logits.astype(np.float32))

        _atomic_write(path, save_npy)
        written["logits"] = str(path)
    share = float(mask.mean())
    print(f"{PROG}: {phrase!r}: {share:.1%} of {image.width}×{image.height} px above {threshold:g} -> {out}")
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
