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
    # CLIPSeg's head: conv3x3 → ReLU → ConvT → ReLU → ConvT (CIDAS/clipseg-rd64-refined); False = the
    # single ConvT(D → 1, kernel = stride = patch) of HF's default use_complex_transposed_convolution=False
    complex_transposed_convolution: bool = True
    # the phrase supplies the kernel and bias of the head's last layer, a 1×1 conv over its 1/4-resolution
    # features (CRIS's text-to-pixel head), instead of CLIPSeg's last ConvT; the logits are upsampled
    # bilinearly. Every pixel's score is then a phrase-specific readout, never a phrase-free one.
    text_kernel: bool = False
    # dense embeddings of the deepest visual tokens for the region–phrase loss (loss.region); training only
    region_head: bool = False
    # the deepest visual tokens and the pooled phrase mapped into the token-embedding space of the text
    # tower, for the word losses (loss.words); training only
    word_head: bool = False
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
        for switch in ("stem_skip", "text_kernel"):
            if getattr(self, switch) and not self.complex_transposed_convolution:
                raise ConfigError(
                    f"decoder.{switch} needs complex_transposed_convolution (it works on the 1/4-resolution "
                    "features after the first ConvT)"
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


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """RAF loss: ``bce·BCE + focal·Focal(alpha, gamma) + dice·AdaptiveDice(dice_alpha, dice_smooth)``."""

    bce: float = 1.0
    focal: float = 1.0
    dice: float = 1.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    dice_alpha: float = 1.0  # exponent a of the self-adjusting factor (1 - p)^a
    dice_smooth: float = 1.0
    # weight of the region–phrase alignment term (segvlm.losses.region_phrase_loss; needs
    # model.decoder.region_head); not part of RAF, logged as its own term
    region: float = 0.0
    # weight of the two word terms (needs model.decoder.word_head): the target region (region_word_loss)
    # and the phrase (word_prediction_loss) each name the words of the phrase's subject, its attributes and
    # name, among the text tower's token embeddings; logged as words_region and words_phrase
    words: float = 0.0

    def validate(self) -> None:
        if self.region < 0:
            raise ConfigError(f"loss.region must be >= 0, got {self.region}")
        if self.words < 0:
            raise ConfigError(f"loss.words must be >= 0, got {self.words}")
        weights = (self.bce, self.focal, self.dice)
        if min(weights) < 0 or sum(weights) == 0:
            raise ConfigError(f"loss weights must be >= 0 and not all zero, got {weights}")
        if not 0 <= self.focal_alpha <= 1:
            raise ConfigError(f"loss.focal_alpha must lie in [0, 1], got {self.focal_alpha}")


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


# ------------------------------------------------------------------------------ experiment (training)
@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the shards are and how the loaders read them (``pipeline.loader``)."""

    train_shards: str = ""  # folder or URI written by `segvlm prepare` (with manifest.parquet)
    val_shards: str = ""  # empty: no validation
    train_split: str = "train"
    val_split: str = "val"
    negative_rate: float = 0.2
    phrase_type_balance: bool = False
    num_workers: int = 1  # DataLoader workers per training worker
    shuffle_buffer: int = 1000
    # side of CLIPSeg's random square crop as a share of the shorter image side; (1, 1) turns cropping off,
    # which phrases about relations and superlatives ("the largest circle") need on small scenes
    crop_scale: tuple[float, float] = (0.5, 1.0)
    # > 1: up to this many phrases of an image share its crop in a batch and the image is encoded once for
    # all of them; cheaper per task, and each batch shows the same pixels under different phrases
    phrases_per_image: int = 1
    # probability of a horizontal flip of a training crop, its phrases mirrored with it (left <-> right)
    hflip: float = 0.0

    def validate(self) -> None:
        if not 0.0 <= self.hflip <= 1.0:
            raise ConfigError(f"data.hflip must lie in [0, 1], got {self.hflip}")
        if self.phrases_per_image < 1:
            raise ConfigError(f"data.phrases_per_image must be >= 1, got {self.phrases_per_image}")
        if not 0 <= self.negative_rate < 1:
            raise ConfigError(f"data.negative_rate must lie in [0, 1), got {self.negative_rate}")
        if self.num_workers < 0:
            raise ConfigError("data.num_workers must be >= 0")
        low, high = self.crop_scale
        if not 0 < low <= high <= 1:
            raise ConfigError(f"data.crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW + linear warm-up + cosine decay (CLIPSeg: lr 1e-3 → 1e-4, batch 64, 20k iterations)."""

    lr: float = 1e-3
    min_lr: float = 1e-4
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 500
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    # the text tower's lr as a share of lr: a from-scratch text tower at lr 1e-3 collapses (every phrase
    # maps to nearly the same embedding within ~100 steps), while the decoder wants the full rate
    text_lr_scale: float = 1.0

    def validate(self) -> None:
        if not 0 < self.text_lr_scale <= 1:
            raise ConfigError(f"optim.text_lr_scale must lie in (0, 1], got {self.text_lr_scale}")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError(
                f"optim: need 0 <= min_lr <= lr and lr > 0, got lr={self.lr} min_lr={self.min_lr}"
            )
        if self.warmup_steps < 0 or self.grad_clip < 0:
            raise ConfigError("optim.warmup_steps and optim.grad_clip must be >= 0")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The training run: steps, batch, distribution, validation and checkpoint cadence."""

    steps: int = 20000
    batch_size: int = 64  # global batch per optimizer step, split over workers and accumulation
    grad_accum: int = 1
    precision: str = "auto"  # "auto": bf16 autocast on GPU, float32 on CPU | "bf16" | "fp32"
    seed: int = 0
    num_workers: int = 1  # Ray Train workers
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    torch_threads: int = 0  # per worker; 0 = cpus_per_worker
    val_every: int = 1000
    val_max_tasks: int = 0  # 0 = the whole validation split
    # store the decision threshold with the best validation mean IoU (ThresholdSweep) in each checkpoint, for
    # eval / predict / the logged model to predict with; false: 0.5
    calibrate_threshold: bool = True
    ckpt_every: int = 1000
    keep_checkpoints: int = 2  # best k by validation mean IoU
    max_failures: int = 2
    log_every: int = 20
    overlays: int = 8  # prediction overlays logged per validation
    time_budget_s: float = 0.0  # > 0: stop (and run the final validation) after this many seconds
    run_name: str = ""  # Ray Train run name; rerunning with the same name resumes
    # locations: a folder or a URI (s3://...)
    storage_path: str = ""  # Ray Train storage (checkpoints); "" = <workdir>/ray_results
    best_path: str = ""  # where the best checkpoint is copied; "" = <workdir>/<run_name>/best

    def validate(self) -> None:
        if self.steps <= 0 or self.batch_size <= 0 or self.grad_accum <= 0 or self.num_workers <= 0:
            raise ConfigError("train.steps, batch_size, grad_accum and num_workers must be positive")
        if self.batch_size % (self.num_workers * self.grad_accum):
            raise ConfigError(
                f"train.batch_size {self.batch_size} must be divisible by num_workers × grad_accum "
                f"= {self.num_workers * self.grad_accum}"
            )
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"train.precision must be auto, bf16 or fp32, got {self.precision!r}")
        if self.val_every <= 0 or self.ckpt_every <= 0 or self.log_every <= 0:
            raise ConfigError("train.val_every, ckpt_every and log_every must be positive")

    @property
    def micro_batch(self) -> int:
        """Samples per worker per forward pass."""
        return self.batch_size // (self.num_workers * self.grad_accum)


@dataclasses.dataclass(frozen=True)
class TrackingConfig:
    """MLflow: rank 0 logs, other ranks do nothing."""

    uri: str = ""  # "" = sqlite:///<workdir>/mlflow.db with artifacts in <workdir>/mlartifacts
    experiment: str = "segvlm"
    registered_model: str = "segvlm"  # the best checkpoint is registered under this name with alias "best"
    system_metrics: bool = True
    # rank 0 logs through a Ray actor on the driver's node (jobs/tracking_relay.py): "auto" = when `uri` is an
    # http(s) server on a loopback address, which a worker on another node cannot reach | "on" | "off".
    # An unquoted YAML on/off reads as true/false: accepted as the same.
    relay: str | bool = "auto"

    def validate(self) -> None:
        if self.relay not in ("auto", "on", "off", True, False):
            raise ConfigError(f"tracking.relay must be auto, on or off, got {self.relay!r}")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """Everything one training run needs; the YAML presets in configs/ are files of this shape."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    tracking: TrackingConfig = dataclasses.field(default_factory=TrackingConfig)
    workdir: str = "runs"  # local folder for the MLflow store, Ray results and reports

    def validate(self) -> None:
        # a region head without its loss would hold parameters no gradient reaches (DDP refuses those)
        for loss, head, what in (
            ("region", "region_head", "region–phrase"),
            ("words", "word_head", "word"),
        ):
            weight, on = getattr(self.loss, loss), getattr(self.model.decoder, head)
            if (weight > 0) != on:
                raise ConfigError(
                    f"loss.{loss}={weight} and model.decoder.{head}={on}: the {what} loss needs the head and "
                    "the head is only trained by that loss; set both or neither"
                )
