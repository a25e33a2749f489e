"""Named model presets (timm style) and ``build_model``.

A preset is a function returning a ``ModelConfig``; ``@register_model`` adds it under the function's name
(or an explicit one). ``model_config(name, overrides)`` resolves a preset with ``key.sub=value`` overrides and
validates it; ``build_model(cfg)`` builds the ``SegVLM``. ``configs/<name>.yaml`` spell the presets out.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from segvlm.backbone import CLIPBackbone
from segvlm.config import (
    BackboneConfig,
    ConfigError,
    DecoderConfig,
    ModelConfig,
    from_dict,
    to_dict,
    validate,
)
from segvlm.decoder import SegDecoder
from segvlm.model import SegVLM

__all__ = ["build_model", "list_models", "model_config", "register_model"]

PresetFn = Callable[[], ModelConfig]
_MODELS: dict[str, PresetFn] = {}


def register_model(name: str | None = None) -> Callable[[PresetFn], PresetFn]:
    """Decorator registering a ``() -> ModelConfig`` preset under ``name`` (default: the function's name)."""

    def wrap(fn: PresetFn) -> PresetFn:
        key = name or fn.__name__
        if key in _MODELS:
            raise ValueError(f"model preset {key!r} is already registered")
        _MODELS[key] = fn
        return fn

    return wrap


def list_models() -> list[str]:
    """Sorted names of the registered presets."""
    return sorted(_MODELS)


def model_config(name: str, overrides: Sequence[str] = ()) -> ModelConfig:
    """The preset ``name`` with ``decoder.reduce_dim=128``-style overrides applied, validated.

    Raises:
        ConfigError: unknown preset or invalid override.
    """
    if name not in _MODELS:
        raise ConfigError(f"unknown model preset {name!r}; known: {list_models()}")
    return from_dict(ModelConfig, to_dict(_MODELS[name]()), overrides)


def build_model(cfg: ModelConfig, backbone: CLIPBackbone | None = None) -> SegVLM:
    """Build a ``SegVLM``: the backbone (``CLIPBackbone.from_config``, loading ``cfg.backbone.pretrained``
    if set, unless a built ``backbone`` is given) and a freshly initialised decoder sized to it."""
    validate(cfg)
    if backbone is None:
        backbone = CLIPBackbone.from_config(cfg.backbone)
    decoder = SegDecoder(
        cfg.decoder,
        vision_width=backbone.vision_width,
        text_width=backbone.text_width,
        projection_dim=backbone.projection_dim,
        num_layers=backbone.num_layers,
        patch_size=backbone.patch_size,
        stem_channels=backbone.stem_channels if cfg.decoder.stem_skip else None,
    )
    return SegVLM(backbone, decoder)


# -------------------------------------------------------------------------------------------- presets
@register_model()
def clipseg_b16() -> ModelConfig:
    """CLIPSeg (Lüddecke & Ecker 2022): frozen CLIP ViT-B/16 at 352 px, blocks 3/7/9, D=64 FiLM decoder."""
    return ModelConfig(
        name="clipseg_b16",
        backbone=BackboneConfig(arch="vit_b16", image_size=352, extract_layers=(3, 7, 9), freeze=True),
        decoder=DecoderConfig(reduce_dim=64),
    )


@register_model()
def segvlm_b16() -> ModelConfig:
    """SegVLM on a frozen CLIP ViT-B/16: CLIPSeg plus cross-attention, projector and the deformable/SE
    residual refinement block."""
    base = clipseg_b16()
    return ModelConfig(
        name="segvlm_b16",
        backbone=base.backbone,
        decoder=DecoderConfig(
            reduce_dim=64, cross_attention=True, projector=True, deformable=True, se=True, residual=True
        ),
    )


@register_model()
def segvlm_tiny() -> ModelConfig:
    """A tiny CLIP trained from scratch with a conv stem (+ 1/4-resolution skip) for CPU demos and tests."""
    return ModelConfig(
        name="segvlm_tiny",
        backbone=BackboneConfig(
            arch="tiny",
            image_size=128,
            extract_layers=(1, 2, 3),
            freeze=False,
            image_stem="conv",
            max_text_length=16,
        ),
        decoder=DecoderConfig(
            reduce_dim=64,
            intermediate_size=256,
            cross_attention=True,
            projector=True,
            deformable=True,
            se=True,
            residual=True,
            stem_skip=True,
        ),
    )
