"""Convert a transformers ``CLIPSegForImageSegmentation`` checkpoint into a segvlm checkpoint.

CLIPSeg (``CIDAS/clipseg-rd64-refined`` and friends) is our baseline, so its published weights are the natural
starting point for both the CLIPSeg re-implementation and a SegVLM fine-tune:

- ``clip.*`` (a ``CLIPSegModel``: ``text_model``, ``vision_model``, ``visual_projection``, ``text_projection``,
  ``logit_scale``) has exactly ``CLIPModel``'s parameter names, so ``clip.<name>`` → the backbone's
  ``CLIPModel`` ``<name>``. Its weights are *not* OpenAI's CLIP (CLIPSeg's is a fine-tuned copy with its own
  config), so the checkpoint carries them instead of pointing to a hub id.
- ``decoder.*`` → ``SegDecoder`` 1:1 (``SegDecoder`` mirrors ``CLIPSegDecoder``'s parameter names).
- ``CLIPSegConfig.extract_layers`` are 0-based block indices (``hidden_states[i + 1]``), the same convention as
  ``BackboneConfig.extract_layers``, so they are copied unchanged.
- The tokenizer (a ``CLIPTokenizer``) is copied from the CLIPSeg folder and checked.

With ``segvlm=True`` the decoder is a SegVLM decoder (every SegVLM switch on): the CLIPSeg parts are loaded
the same way and the new parts keep their fresh initialisation, which is zero where it touches the residual
stream, so the converted SegVLM predicts exactly what CLIPSeg predicts until it is trained.

Every key is accounted for: a CLIPSeg key that maps nowhere, or a parameter of ours that no CLIPSeg key fills
(other than SegVLM's new parts), is an error, never a silent random weight.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from segvlm.config import BackboneConfig, DecoderConfig, ModelConfig, validate

__all__ = [
    "SEGVLM_SWITCHES",
    "ConvertError",
    "clip_config_from_clipseg",
    "clipseg_to_segvlm",
    "convert_clipseg",
    "input_size",
    "load_clipseg",
    "model_config_from_clipseg",
    "split_clipseg_state_dict",
]

# The decoder switches that turn CLIPSeg's decoder into SegVLM's (the ``segvlm_b16`` preset's).
SEGVLM_SWITCHES: dict[str, bool] = {
    "cross_attention": True,
    "projector": True,
    "deformable": True,
    "se": True,
    "residual": True,
}
DEFAULT_IMAGE_SIZE = 352  # CLIPSeg's training and inference resolution

_TEXT_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "max_position_embeddings", "hidden_act", "layer_norm_eps", "attention_dropout", "initializer_range",
              "initializer_factor", "pad_token_id", "bos_token_id", "eos_token_id")  # fmt: skip
_VISION_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
                "image_size", "patch_size", "hidden_act", "layer_norm_eps", "attention_dropout",
                "initializer_range", "initializer_factor")  # fmt: skip


class ConvertError(ValueError):
    """The source is missing, unreachable or not a CLIPSeg checkpoint this converter understands."""


# ------------------------------------------------------------------------------------------- loading
def _looks_local(source: str) -> bool:
    """A path-like string rather than a hub id (``name`` or ``owner/name``): it must exist locally."""
    return source.startswith((".", "/", "~")) or "\\" in source or source.count("/") > 1


_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def _check_local_folder(folder: Path) -> dict[str, Any]:
    if not folder.exists():
        raise ConvertError(f"CLIPSeg checkpoint not found: {folder} does not exist")
    if not folder.is_dir():
        raise ConvertError(
            f"{folder} is a file; pass the folder of a CLIPSeg checkpoint (config.json + weights)"
        )
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ConvertError(
            f"{folder} is not a CLIPSeg checkpoint: no config.json (expected a folder saved by "
            f"CLIPSegForImageSegmentation.save_pretrained, e.g. a download of CIDAS/clipseg-rd64-refined)"
        )
    try:
        raw = json.loads(config_file.read_text())
    except (OSError, ValueError) as err:
        raise ConvertError(f"{config_file}: not readable JSON ({err})") from err
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if model_type != "clipseg":
        raise ConvertError(
            f"{folder} is not a CLIPSeg checkpoint: config.json has model_type {model_type!r}, expected 'clipseg'"
        )
    if not any((folder / name).is_file() for name in _WEIGHT_FILES):
        raise ConvertError(
            f"{folder} is not a complete CLIPSeg checkpoint: no weights ({', '.join(_WEIGHT_FILES)})"
        )
    return raw


def load_clipseg(source: str | Path) -> tuple[Any, Any, str]:
    """Load a ``CLIPSegForImageSegmentation`` and its ``CLIPTokenizer`` from a local folder or a hub id.

    Returns:
        ``(model, tokenizer, resolved)`` where ``resolved`` is the folder or hub id actually read.

    Raises:
        ConvertError: the folder is missing / not a CLIPSeg checkpoint / has missing weights or a broken
            tokenizer; or the hub id cannot be fetched (offline machines: download it elsewhere and pass
            the folder).
    """
    from transformers import CLIPSegForImageSegmentation, CLIPTokenizer

    from segvlm.tokenizer import check_tokenizer

    text = str(source)
    local = Path(text).expanduser()
    if local.exists() or _looks_local(text):
        _check_local_folder(local)
        resolved, kwargs = str(local), {"local_files_only": True}
    else:
        resolved, kwargs = text, {}
    try:
        model, info = CLIPSegForImageSegmentation.from_pretrained(
            resolved, output_loading_info=True, **kwargs
        )
        tokenizer = CLIPTokenizer.from_pretrained(resolved, **kwargs)
    except (OSError, ValueError) as err:
        if kwargs:  # a local folder that transformers still refuses
            raise ConvertError(f"cannot load CLIPSeg checkpoint {resolved}: {err}") from err
        offline = os.environ.get("HF_HUB_OFFLINE", "0")
        raise ConvertError(
            f"cannot load CLIPSeg hub id {text!r} (no local folder of that name; HF_HUB_OFFLINE={offline}, "
            f"and machines here have no network): {str(err).strip().rstrip('.')}. Download it on a machine with network access, e.g. "
            f"`hf download {text} --local-dir DIR`, and pass --from DIR"
        ) from err
    # Weights the file lacks would stay random, weights it has beyond the model would be dropped: both are
    # a checkpoint of something else, never something to convert quietly.
    missing = sorted(k for k in info.get("missing_keys", []) if not k.endswith("position_ids"))
    unexpected = sorted(k for k in info.get("unexpected_keys", []) if not k.endswith("position_ids"))
    mismatched = list(info.get("mismatched_keys", []))
    if missing or unexpected or mismatched:
        raise ConvertError(
            f"{resolved}: the weights do not match CLIPSegForImageSegmentation (missing {missing[:8]}, "
            f"unexpected {unexpected[:8]}, shape mismatches {mismatched[:8]})"
        )
    try:
        check_tokenizer(tokenizer, resolved)
    except ValueError as err:
        raise ConvertError(str(err)) from err
    return model.eval(), tokenizer, resolved


# Where a checkpoint's image-processor settings live: transformers 5 saves a processor's settings in
# processor_config.json (under "image_processor"); earlier versions, and hub repos such as CIDAS/*, in
# preprocessor_config.json. The first that exists wins.
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")


def _find_file(resolved: str, name: str) -> Path | None:
    """``name`` beside the weights, in a folder or the hub cache (None when absent)."""
    if Path(resolved).is_dir():
        path = Path(resolved) / name
        return path if path.is_file() else None
    from transformers.utils import cached_file  # a hub id whose weights were just fetched: the cache

    try:
        found = cached_file(resolved, name, _raise_exceptions_for_missing_entries=False)
    except (OSError, ValueError):
        return None
    return Path(found) if found else None


def _processor_config(resolved: str) -> tuple[dict[str, Any], str | None]:
    """The image-processor settings saved with the weights and the file they came from (``{}, None`` when
    neither ``processor_config.json`` nor ``preprocessor_config.json`` is there or readable)."""
    for name in PROCESSOR_FILES:
        path = _find_file(resolved, name)
        if path is None:
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and isinstance(data.get("image_processor"), dict):
            data = data["image_processor"]  # a processor's file holds its parts' settings by name
        if isinstance(data, dict):
            return data, name
    return {}, None


def _processor_image_size(processor: dict[str, Any]) -> int | None:
    """The square input side a CLIPSeg processor feeds the model (``CIDAS/*``: 352), if it says: its center
    crop when it crops, else its resize size."""
    sizes = [processor.get("size")]
    if processor.get("do_center_crop"):
        sizes.insert(0, processor.get("crop_size"))
    for size in sizes:
        if isinstance(size, int) and not isinstance(size, bool):
            return size
        if isinstance(size, dict):
            sides = {size.get("height"), size.get("width")} - {None}
            if len(sides) == 1:
                return int(sides.pop())
            if "shortest_edge" in size:
                return int(size["shortest_edge"])
    return None


def _processor_normalization(processor: dict[str, Any]) -> dict[str, list[float]]:
    """``{"image_mean", "image_std"}`` of the processor when it normalises (CIDAS/*: ImageNet's), else {}."""
    mean, std = processor.get("image_mean"), processor.get("image_std")
    normalizes = processor.get("do_normalize", True) and isinstance(mean, list) and isinstance(std, list)
    if normalizes and len(mean) == len(std) == 3:
        return {"image_mean": [float(v) for v in mean], "image_std": [float(v) for v in std]}
    return {}


# -------------------------------------------------------------------------------------------- config
def clip_config_from_clipseg(hf_config: Any) -> Any:
    """The ``transformers.CLIPConfig`` whose ``CLIPModel`` has exactly the shapes of CLIPSeg's ``clip``."""
    from transformers import CLIPConfig

    text = {k: getattr(hf_config.text_config, k) for k in _TEXT_KEYS}
    vision = {k: getattr(hf_config.vision_config, k) for k in _VISION_KEYS}
    for sub in (text, vision):
        sub["projection_dim"] = hf_config.projection_dim
    return CLIPConfig(
        text_config=text,
        vision_config=vision,
        projection_dim=hf_config.projection_dim,
        logit_scale_init_value=hf_config.logit_scale_init_value,
    )


def model_config_from_clipseg(
    hf_config: Any, *, image_size: int = DEFAULT_IMAGE_SIZE, segvlm: bool = False, name: str | None = None
) -> ModelConfig:
    """Our ``ModelConfig`` for a ``CLIPSegConfig``: backbone blocks and input size, decoder widths.

    CLIPSeg's decoder always uses ReLU in its transformer layers and the vision tower's LayerNorm eps
    (transformers does not read ``decoder_hidden_act``); ``SegDecoder`` does the same. Both heads convert:
    the refined checkpoints' conv3×3-ReLU-ConvT-ReLU-ConvT (``use_complex_transposed_convolution``) and the
    single ConvT of ``CIDAS/clipseg-rd64`` / ``-rd16``.

    Raises:
        ConvertError: a CLIPSeg variant ``SegDecoder`` cannot express.
    """
    from segvlm.decoder import LAYER_NORM_EPS

    vision = hf_config.vision_config
    if abs(float(vision.layer_norm_eps) - LAYER_NORM_EPS) > 1e-12:
        raise ConvertError(
            f"CLIPSeg's decoder LayerNorm eps is the vision tower's ({vision.layer_norm_eps}); segvlm's decoder "
            f"uses {LAYER_NORM_EPS}"
        )
    if not 0 <= hf_config.conditional_layer < len(hf_config.extract_layers):
        raise ConvertError(f"conditional_layer {hf_config.conditional_layer} outside the decoder's blocks")
    if hf_config.use_complex_transposed_convolution and int(vision.patch_size) != 16:
        # HF's kernels are (patch/4, patch/4), ours (patch/4, 4): the same only at patch 16
        raise ConvertError(
            f"the refined CLIPSeg head converts at patch size 16 only, this checkpoint has {vision.patch_size}"
        )
    patch = int(vision.patch_size)
    shape = (vision.hidden_size, vision.num_hidden_layers, patch, hf_config.text_config.hidden_size)
    is_b16 = shape == (768, 12, 16, 512)
    backbone = BackboneConfig(
        arch="vit_b16" if is_b16 else "tiny",  # informative only: the weights and CLIP config travel along
        pretrained=None,
        image_size=int(image_size),
        extract_layers=tuple(int(i) for i in hf_config.extract_layers),
        freeze=True,
        image_stem="patch",
        max_text_length=int(hf_config.text_config.max_position_embeddings),
    )
    switches = SEGVLM_SWITCHES if segvlm else {}
    decoder = DecoderConfig(
        reduce_dim=int(hf_config.reduce_dim),
        num_heads=int(hf_config.decoder_num_attention_heads),
        intermediate_size=int(hf_config.decoder_intermediate_size),
        conditional_layer=int(hf_config.conditional_layer),
        complex_transposed_convolution=bool(hf_config.use_complex_transposed_convolution),
        **switches,
    )
    default = ("segvlm" if segvlm else "clipseg") + ("_b16" if is_b16 else "")
    cfg = ModelConfig(name=name or default, backbone=backbone, decoder=decoder)
    try:
        validate(cfg)
    except ValueError as err:
        raise ConvertError(f"the CLIPSeg config gives an invalid segvlm config: {err}") from err
    return cfg


# -------------------------------------------------------------------------------------------- weights
def split_clipseg_state_dict(state_dict: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Split a CLIPSeg state dict into (``CLIPModel`` state dict, decoder state dict).

    Raises:
        ConvertError: a key that is neither ``clip.*`` nor ``decoder.*``.
    """
    clip, decoder, other = {}, {}, []
    for key, value in state_dict.items():
        if key.startswith("clip."):
            clip[key.removeprefix("clip.")] = value
        elif key.startswith("decoder."):
            decoder[key.removeprefix("decoder.")] = value
        else:
            other.append(key)
    if other:
        raise ConvertError(f"CLIPSeg keys that map to nothing: {sorted(other)}")
    return clip, decoder


def _load_exact(
    module: torch.nn.Module, state: dict[str, Tensor], what: str, allow_missing: set[str] = frozenset()
):
    """``load_state_dict`` that fails on unexpected keys, shape mismatches and unexplained missing keys."""
    own = module.state_dict()
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(k for k in state if k in own and own[k].shape != state[k].shape)
    missing = sorted(set(own) - set(state) - allow_missing)
    if unexpected or mismatched or missing:
        raise ConvertError(
            f"{what}: CLIPSeg weights do not match segvlm's layout: unexpected {unexpected[:8]}, "
            f"shape mismatches {[(k, tuple(state[k].shape), tuple(own[k].shape)) for k in mismatched[:8]]}, "
            f"missing {missing[:8]}"
        )
    module.load_state_dict(state, strict=False)


def clipseg_to_segvlm(
    hf_model: Any, tokenizer: Any, *, image_size: int = DEFAULT_IMAGE_SIZE, segvlm: bool = False
) -> tuple[torch.nn.Module, ModelConfig]:
    """Build our ``SegVLM`` holding a CLIPSeg model's weights.

    Args:
        hf_model: a ``transformers.CLIPSegForImageSegmentation``.
        tokenizer: its ``CLIPTokenizer``.
        image_size: the square input side the model runs at (CLIPSeg: 352).
        segvlm: build SegVLM's decoder (all switches on, new parts freshly initialised) instead of CLIPSeg's.

    Returns:
        ``(model, cfg)``; ``model`` computes the same logits as ``hf_model`` (as B×1×H×W instead of B×H×W).
    """
    from transformers import CLIPModel

    from segvlm.backbone import CLIPBackbone
    from segvlm.registry import build_model

    cfg = model_config_from_clipseg(hf_model.config, image_size=image_size, segvlm=segvlm)
    clip_sd, decoder_sd = split_clipseg_state_dict(hf_model.state_dict())

    clip = CLIPModel(clip_config_from_clipseg(hf_model.config)).eval()
    _load_exact(clip, clip_sd, "clip")
    try:
        backbone = CLIPBackbone(clip, tokenizer, cfg.backbone)
    except ValueError as err:
        raise ConvertError(str(err)) from err
    model = build_model(cfg, backbone=backbone)
    # SegVLM's new parts are exactly the decoder parameters a CLIPSeg decoder of the same widths lacks.
    clipseg_cfg = dataclasses.replace(
        cfg, decoder=dataclasses.replace(cfg.decoder, **dict.fromkeys(SEGVLM_SWITCHES, False))
    )
    reference = build_model(clipseg_cfg, backbone=backbone).decoder
    new_parts = set(model.decoder.state_dict()) - set(reference.state_dict())
    _load_exact(model.decoder, decoder_sd, "decoder", allow_missing=new_parts)
    return model.eval(), cfg


def input_size(resolved: str, image_size: int | None = None) -> tuple[int, str]:
    """The square input side a conversion uses and where it comes from: ``image_size`` when given, else the
    saved processor's size (``processor_config.json`` or ``preprocessor_config.json``), else 352."""
    if image_size:
        return int(image_size), "--image-size"
    processor, name = _processor_config(resolved)
    size = _processor_image_size(processor)
    if size:
        return size, name or ""
    return DEFAULT_IMAGE_SIZE, "CLIPSeg's default (no processor size saved with the weights)"


def convert_clipseg(
    source: str | Path,
    out: str | Path,
    *,
    segvlm: bool = False,
    image_size: int | None = None,
) -> Path:
    """Convert the CLIPSeg checkpoint ``source`` (folder or hub id) into our checkpoint folder ``out``.

    ``image_size`` defaults to the size of the processor saved beside the weights (``processor_config.json``,
    as transformers 5 writes it, or ``preprocessor_config.json``), else 352; the size and where it came from
    are stored in ``meta.json`` ``extra["input_size"]``. The processor's ``image_mean`` / ``image_std`` go to
    ``extra`` too, so that ``segvlm.inference.Predictor`` normalises images as CLIPSeg was trained. Returns
    the checkpoint folder (written atomically by ``save_checkpoint``).
    """
    from segvlm.checkpoint import save_checkpoint

    hf_model, tokenizer, resolved = load_clipseg(source)
    processor, _ = _processor_config(resolved)
    size, size_source = input_size(resolved, image_size)
    model, cfg = clipseg_to_segvlm(hf_model, tokenizer, image_size=size, segvlm=segvlm)
    extra: dict[str, Any] = {
        "converted_from": {
            "source": str(source),
            "format": "transformers CLIPSegForImageSegmentation",
            "segvlm": segvlm,
        },
        "input_size": {"size": size, "from": size_source},
        # The pixel normalisation CLIPSeg was trained with, if its processor says (segvlm.inference uses it).
        **_processor_normalization(processor),
    }
    return Path(save_checkpoint(model, cfg, out, extra=extra))
