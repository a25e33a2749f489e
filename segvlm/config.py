"""Frozen dataclass configs, loaded from YAML, overridable with ``key.sub=value``, validated once.

The pattern: every config section is a frozen dataclass with defaults. ``load_config(Cls, path, overrides)``
reads YAML, applies command-line overrides (``model.decoder.reduce_dim=128``), builds the nested
dataclasses (unknown keys are errors), then calls ``validate()`` on every section that defines it.
``to_dict`` / ``flatten`` give the resolved config for logging.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that cannot be turned into a valid config."""


# --------------------------------------------------------------------------------------------- model
@dataclasses.dataclass(frozen=True)
class BackboneConfig:
    """The CLIP backbone.

    ``arch`` names a CLIP architecture built from config when ``pretrained`` is None (parameter counts,
    benchmarks, tiny from-scratch runs). ``pretrained`` is a hub id (``openai/clip-vit-base-patch16``) or
    a local folder holding a transformers ``CLIPModel`` and its ``CLIPTokenizer``.
    """

    arch: str = "vit_b16"  # "vit_b16" | "tiny"
    pretrained: str | None = None
    image_size: int = 352
    extract_layers: tuple[int, ...] = (3, 7, 9)  # 0-indexed transformer blocks
    freeze: bool = True
    image_stem: str = "patch"  # "patch" (CLIP's) | "conv" (small conv stem, for tiny from-scratch runs)
    max_text_length: int = 77

    def validate(self) -> None:
        if self.arch not in ("vit_b16", "tiny"):
            raise ConfigError(f"backbone.arch must be 'vit_b16' or 'tiny', got {self.arch!r}")
        if self.image_stem not in ("patch", "conv"):
            raise ConfigError(f"backbone.image_stem must be 'patch' or 'conv', got {self.image_stem!r}")
        if self.image_size <= 0 or self.image_size % 16:
            raise ConfigError(f"backbone.image_size must be a positive multiple of 16, got {self.image_size}")
        if not self.extract_layers or list(self.extract_layers) != sorted(set(self.extract_layers)):
            raise ConfigError(
                f"backbone.extract_layers must be increasing and unique, got {self.extract_layers}"
            )


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """The decoder over visual tokens. All SegVLM switches off is CLIPSeg's decoder."""

    reduce_dim: int = 64
    num_heads: int = 4
    intermediate_size: int = 2048  # CLIPSeg's decoder MLP width
    conditional_layer: int = 0  # FiLM at the first (deepest) decoder block
    cross_attention: bool = False
    projector: bool = False
    deformable: bool = False
    se: bool = False
    residual: bool = False
    se_reduction: int = 4
    norm: str = "group"  # registry name in segvlm.layers.create_norm
    act: str = "gelu"  # registry name in segvlm.layers.create_act
    stem_skip: bool = False  # add the conv stem's 1/4-resolution features into the upsampler
    # where the phrase's reference object lies, seen from each position ("right of the small hexagon"):
    # segvlm.layers.relational_context, after the projector
    relational_context: bool = False
    # a learned bias of each decoder self-attention head by the offset between two tokens
    # (segvlm.layers.relative_position; zero at init)
    relative_position: bool = False
    # CLIPSeg's head: conv3x3 → ReLU → ConvT → ReLU → ConvT (CIDAS/clipseg-rd64-refined); False = the
    # single ConvT(D → 1, kernel = stride = patch) of HF's default use_complex_transposed_convolution=False
    complex_transposed_convolution: bool = True
    # the head's last layer, a name in ``segvlm.decoder.HEADS`` (checked when the decoder is built): "convt" = CLIPSeg's transposed-conv head;
    # "text_kernel" = the phrase supplies the kernel and bias of a 1×1 conv over the head's 1/4-resolution
    # features (CRIS's text-to-pixel head) in place of CLIPSeg's last ConvT, the logits upsampled bilinearly,
    # so every pixel's score is a phrase-specific readout, never a phrase-free one
    head: str = "convt"
    # how the text kernel's 1/4-resolution logits reach full resolution: "bilinear", or "convex" = each pixel a
    # learned convex combination of the four coarse logits around it, the weights from the image's own
    # pixels and conv-stem features (segvlm.layers.convex_upsample), so mask edges follow image edges
    upsample: str = "bilinear"
    deform_impl: str = "auto"  # "auto" (torchvision on CUDA, native on CPU) | "native" | "torchvision"

    def validate(self) -> None:
        if self.reduce_dim % self.num_heads:
            raise ConfigError(
                f"decoder.reduce_dim {self.reduce_dim} not divisible by num_heads {self.num_heads}"
            )
        if self.se_reduction < 1:
            raise ConfigError("decoder.se_reduction must be >= 1")
        if self.cross_attention and self.reduce_dim % 4:
            raise ConfigError(
                f"decoder.cross_attention needs reduce_dim divisible by 4 (2-D sin-cos), got {self.reduce_dim}"
            )
        for switch, on in (("stem_skip", self.stem_skip), ("head=text_kernel", self.head == "text_kernel")):
            if on and not self.complex_transposed_convolution:
                raise ConfigError(
                    f"decoder.{switch} needs complex_transposed_convolution (it works on the 1/4-resolution "
                    "features after the first ConvT)"
                )
        if self.upsample not in ("bilinear", "convex"):
            raise ConfigError(f"decoder.upsample must be 'bilinear' or 'convex', got {self.upsample!r}")
        if self.upsample == "convex" and self.head != "text_kernel":
            raise ConfigError(
                "decoder.upsample='convex' needs head='text_kernel' (the head whose logits are coarse)"
            )
        if self.deform_impl not in ("auto", "native", "torchvision"):
            raise ConfigError(
                f"decoder.deform_impl must be 'auto', 'native' or 'torchvision', got {self.deform_impl!r}"
            )


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    name: str = "segvlm_b16"
    backbone: BackboneConfig = dataclasses.field(default_factory=BackboneConfig)
    decoder: DecoderConfig = dataclasses.field(default_factory=DecoderConfig)

    def validate(self) -> None:
        if self.decoder.stem_skip and self.backbone.image_stem != "conv":
            raise ConfigError("decoder.stem_skip needs backbone.image_stem='conv'")


# ------------------------------------------------------------------------------------------ machinery
def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML value to the annotated type ``tp`` (dataclass, tuple, Optional, scalar)."""
    origin = typing.get_origin(tp)
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return _build(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{where}: {value!r} matches none of {tp}: {errors}")
    if origin is tuple:
        if isinstance(value, str) or not isinstance(value, Sequence):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        item_tp = args[0] if args else Any
        return tuple(_convert(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        _, val_tp = typing.get_args(tp)
        return {str(k): _convert(v, val_tp, f"{where}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads 3e-4 (no dot) as a string; it is a number to anyone typing an override
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def _build(cls: type[T], data: Mapping[str, Any], where: str = "") -> T:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where or cls.__name__}: unknown key(s) {unknown}; known: {sorted(names)}")
    kwargs = {k: _convert(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def validate(cfg: Any) -> None:
    """Call ``validate()`` on ``cfg`` and every nested dataclass, children first."""
    for field in dataclasses.fields(cfg):
        child = getattr(cfg, field.name)
        if dataclasses.is_dataclass(child):
            validate(child)
    if hasattr(cfg, "validate"):
        cfg.validate()


def _parse_scalar(text: str) -> Any:
    """Parse an override's right-hand side the way YAML would (``1e-3``, ``true``, ``[3,7,9]``, ``null``)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"cannot parse override value {text!r}: {err}") from err


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with ``a.b.c=value`` overrides applied (creating missing mappings)."""
    import copy

    out = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.path=value")
        key, _, raw = item.partition("=")
        parts = key.strip().split(".")
        node = out
        for part in parts[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a mapping")
            node = nxt
        node[parts[-1]] = _parse_scalar(raw)
    return out


def from_dict(cls: type[T], data: Mapping[str, Any], overrides: Sequence[str] = ()) -> T:
    """Build and validate ``cls`` from a plain mapping plus overrides."""
    cfg = _build(cls, apply_overrides(dict(data or {}), overrides))
    validate(cfg)
    return cfg


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Load ``cls`` from a YAML file (or defaults when ``path`` is None) with overrides, validated."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from err
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    try:
        return from_dict(cls, data, overrides)
    except ConfigError as err:
        raise ConfigError(f"{path or cls.__name__}: {err}") from err


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples become lists) suitable for YAML/JSON."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, tuple | list):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(cfg)


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """``{"model.decoder.reduce_dim": 64, ...}`` for logging as run parameters."""
    flat: dict[str, Any] = {}
    for key, value in (to_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg).items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
