"""Convert a transformers CLIPSeg checkpoint into a segvlm checkpoint: ``segvlm convert-clipseg --from SRC --out CKPT``.

Launch: ``segvlm convert-clipseg --from /data/clipseg-rd64-refined --out runs/clipseg_rd64 [--segvlm]
[--image-size 352]`` (same as ``python -m jobs.convert_clipseg ...``).

``--from`` is a local folder saved by ``CLIPSegForImageSegmentation.save_pretrained`` (with its tokenizer) or a
hub id such as ``CIDAS/clipseg-rd64-refined`` (needs network access: on offline machines download it elsewhere
and pass the folder). ``--segvlm`` writes a SegVLM (every SegVLM part on, new parts initialised so that the
untrained model still predicts exactly what CLIPSeg predicts) instead of the CLIPSeg re-implementation.
Errors (missing folder, not a CLIPSeg checkpoint, unreachable hub id) exit with code 2 and one line.
"""

from __future__ import annotations

import argparse
import sys

PROG = "segvlm convert-clipseg"


def main(argv: list[str] | None = None) -> int:
    """``segvlm convert-clipseg --from DIR_OR_HUB_ID --out CKPT [--segvlm] [--image-size N]``."""
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--from", dest="source", required=True, help="CLIPSeg folder or hub id")
    p.add_argument(
        "--out", required=True, help="checkpoint folder to write (replaced atomically if it exists)"
    )
    p.add_argument(
        "--segvlm", action="store_true", help="build SegVLM (all switches on) from the CLIPSeg weights"
    )
    p.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="square input side (default: the size in the folder's processor_config.json or "
        "preprocessor_config.json, else 352)",
    )
    args = p.parse_args(argv)

    from segvlm.config import ConfigError
    from segvlm.convert import ConvertError, convert_clipseg

    try:
        out = convert_clipseg(args.source, args.out, segvlm=args.segvlm, image_size=args.image_size)
    except (ConvertError, ConfigError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    from segvlm.checkpoint import read_meta

    kind = "SegVLM" if args.segvlm else "CLIPSeg"
    size = read_meta(out)["extra"]["input_size"]
    print(f"{PROG}: wrote {kind} checkpoint {out} from {args.source}")
    print(f"{PROG}: input size {size['size']}x{size['size']} (from {size['from']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
