"""Checkpoint folders: save, load, and validate SegVLM weights.

A checkpoint is a folder::

    config.yaml         the resolved ModelConfig
    model.safetensors   weights (keys as in ``SegVLM.state_dict()``)
    meta.json           format_version, backbone_ref, includes_backbone, created, extra (step, run id, ...)
    backbone/           the CLIPModel config and tokenizer (save_pretrained), so the folder predicts standalone

A frozen backbone with a pretrained reference (``cfg.backbone.pretrained``) is not copied: only the reference
is kept and its weights are reloaded from it; everything else (decoder, trainable or non-CLIP backbone parts
such as a conv stem) is in ``model.safetensors``. A trained backbone, or one without a loadable reference,
is saved whole. Folders are written under a temporary sibling name and renamed when complete, so a crash
never leaves a half checkpoint under the final name.

Older checkpoints load too: a config with the decoder switches ``text_kernel`` / ``word_head`` /
``region_head`` is migrated (``text_kernel: true`` is ``head: text_kernel``; the two training-only heads now
live in ``segvlm.task``) and their ``decoder.word_head.*`` / ``decoder.region_head.*`` weights are dropped.
"""

from __future__ import annotations

import datetime
import json
import logging
import shutil
import uuid
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

from segvlm.atomic import publish_dir
from segvlm.backbone import CLIPBackbone, load_clip
from segvlm.config import ConfigError, ModelConfig, from_dict, to_yaml
from segvlm.model import SegVLM
from segvlm.tokenizer import check_tokenizer

__all__ = [
    "FORMAT_VERSION",
    "CheckpointError",
    "load_checkpoint",
    "load_weights",
    "read_meta",
    "save_checkpoint",
    "state_dict_for_checkpoint",
]

FORMAT_VERSION = 1
CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "model.safetensors"
META_FILE = "meta.json"
BACKBONE_DIR = "backbone"
_CLIP_PREFIX = "backbone.clip."
# decoder heads of older checkpoints that only training losses read; inference never needs their weights
_TRAINING_HEADS = ("word_head", "region_head")

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint folder that is missing, incomplete, corrupt or does not fit the model."""


def _unwrap(model: nn.Module) -> SegVLM:
    # DDP / FSDP-style wrappers keep the real model in .module; a training task (segvlm.task) in .model
    while not isinstance(model, SegVLM) and isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    if not isinstance(model, SegVLM) and isinstance(getattr(model, "model", None), SegVLM):
        model = model.model
    if not isinstance(model, SegVLM):
        raise TypeError(f"expected a SegVLM (or a wrapper of one), got {type(model).__name__}")
    return model


def _reference_keys(model: SegVLM, cfg: ModelConfig) -> set[str]:
    """State-dict keys restored from ``cfg.backbone.pretrained`` on load, hence not stored.

    Only for a frozen backbone with a reference: the keys of a plain ``CLIPModel`` of the same config that
    the model has with the same shape and that are not trainable. A conv stem replacing the patch embedding
    is not part of the reference, so it is always stored.
    """
    if not (cfg.backbone.freeze and cfg.backbone.pretrained):
        return set()
    with torch.device("meta"):  # only the key names and shapes, no memory or init cost
        reference = CLIPModel(model.backbone.clip.config).state_dict()
    params = dict(model.named_parameters())
    ours = model.state_dict()
    keys = set()
    for key, value in reference.items():
        full = _CLIP_PREFIX + key
        if (
            full in ours
            and ours[full].shape == value.shape
            and not (full in params and params[full].requires_grad)
        ):
            keys.add(full)
    return keys


def _checksum(state: Mapping[str, Tensor], keys: set[str]) -> float:
    """A cheap fingerprint of the reference weights, to warn when the reference changed since saving."""
    return float(sum(state[k].detach().double().abs().sum().item() for k in sorted(keys)))


def state_dict_for_checkpoint(model: nn.Module, cfg: ModelConfig) -> tuple[dict[str, Tensor], bool]:
    """The tensors a checkpoint stores, and whether they include the whole backbone.

    Returns ``(state, includes_backbone)``: contiguous CPU tensors keyed as in ``SegVLM.state_dict()``,
    without the frozen reference-backbone weights when ``cfg.backbone`` is frozen and has ``pretrained``.
    """
    model = _unwrap(model)
    skip = _reference_keys(model, cfg)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k not in skip}
    return state, not skip


def read_meta(path: str | Path) -> dict[str, Any]:
    """Read and check ``meta.json`` of a checkpoint folder.

    Raises:
        CheckpointError: missing folder or file, invalid JSON, unknown ``format_version``.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: checkpoint folder not found")
    file = folder / META_FILE
    if not file.is_file():
        raise CheckpointError(f"{file}: missing; {folder} is not a complete segvlm checkpoint")
    try:
        meta = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{file}: not valid JSON ({err})") from err
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        found = meta.get("format_version") if isinstance(meta, dict) else None
        raise CheckpointError(f"{file}: unknown format_version {found!r}; this segvlm reads {FORMAT_VERSION}")
    return meta


def save_checkpoint(
    model: nn.Module, cfg: ModelConfig, path: str | Path, extra: Mapping[str, Any] | None = None
) -> Path:
    """Write ``model`` (a SegVLM, possibly DDP-wrapped) and ``cfg`` as a checkpoint folder at ``path``.

    The folder is assembled under a temporary sibling name and renamed into place; an existing checkpoint
    at ``path`` is replaced only once the new one is complete. ``extra`` (JSON-serialisable: step, MLflow
    run id, ...) is stored in ``meta.json``. Returns ``path``.
    """
    model = _unwrap(model)
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.mkdir()
        state, includes_backbone = state_dict_for_checkpoint(model, cfg)
        meta: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "model_name": cfg.name,
            "backbone_ref": cfg.backbone.pretrained,
            "includes_backbone": includes_backbone,
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "extra": dict(extra or {}),
        }
        if not includes_backbone:
            full = model.state_dict()
            meta["backbone_checksum"] = _checksum(full, _reference_keys(model, cfg))
        (tmp / CONFIG_FILE).write_text(to_yaml(cfg))
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        model.backbone.clip.config.save_pretrained(tmp / BACKBONE_DIR)
        if model.backbone.tokenizer is not None:
            model.backbone.tokenizer.save_pretrained(tmp / BACKBONE_DIR)
        # meta.json last: its presence marks a complete folder even if a rename were interrupted
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, default=str) + "\n")

        publish_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _read_weights(file: Path) -> dict[str, Tensor]:
    if not file.is_file():
        raise CheckpointError(f"{file}: missing")
    try:
        return load_file(str(file))
    except Exception as err:  # safetensors raises its own SafetensorError / OSError for truncated files
        raise CheckpointError(f"{file}: corrupt or truncated safetensors file ({err})") from err


def _migrate_config(data: dict[str, Any]) -> list[str]:
    """Rewrite (in place) a model config dict of an older checkpoint to today's keys; the changes made."""
    decoder = data.get("decoder")
    if not isinstance(decoder, dict):
        return []
    changes = []
    if "text_kernel" in decoder:
        if decoder.pop("text_kernel"):
            decoder["head"] = "text_kernel"
            changes.append("decoder.text_kernel=true → decoder.head=text_kernel")
        else:
            changes.append("dropped decoder.text_kernel=false")
    for head in _TRAINING_HEADS:
        if head in decoder:
            changes.append(f"dropped decoder.{head}={decoder.pop(head)}")
    return changes


def _drop_training_heads(state: dict[str, Tensor]) -> list[str]:
    """Remove (in place) the weights of the training-only heads of older checkpoints; the keys removed."""
    prefixes = tuple(f"decoder.{head}." for head in _TRAINING_HEADS)
    dropped = sorted(k for k in state if k.startswith(prefixes))
    for key in dropped:
        del state[key]
    return dropped


def _log_migration(where: str | Path, changes: list[str], dropped: list[str]) -> None:
    if dropped:
        heads = sorted({k.split(".")[1] for k in dropped})
        changes = [*changes, f"dropped {len(dropped)} tensors of training-only heads {', '.join(heads)}"]
    if changes:
        log.warning("%s: older checkpoint migrated on load: %s", where, "; ".join(changes))


def load_weights(
    model: nn.Module, source: str | Path | Mapping[str, Tensor], *, includes_backbone: bool | None = None
) -> None:
    """Load checkpoint weights into a built ``model`` (a SegVLM, possibly wrapped), checking every key.

    Args:
        model: the model to fill, built from the checkpoint's config (``build_model``).
        source: a checkpoint folder, or a state dict as ``state_dict_for_checkpoint`` returns.
        includes_backbone: whether ``source`` holds the whole backbone; read from ``meta.json`` for a
            folder, required as ``True``/``False`` for a state dict (default: True).

    Raises:
        CheckpointError: naming the weights file, for a missing/corrupt file, missing or unexpected keys, or
            shape mismatches.
    """
    model = _unwrap(model)
    if isinstance(source, Mapping):
        state, where = dict(source), "state dict"
        includes_backbone = True if includes_backbone is None else includes_backbone
    else:
        folder = Path(source)
        meta = read_meta(folder)
        if includes_backbone is None:
            includes_backbone = bool(meta.get("includes_backbone", True))
        file = folder / WEIGHTS_FILE
        state, where = _read_weights(file), str(file)
    _log_migration(where, [], _drop_training_heads(state))
    _load_checked(model, state, includes_backbone=includes_backbone, where=where)


def _load_checked(model: SegVLM, state: dict[str, Tensor], *, includes_backbone: bool, where: str) -> None:
    expected = model.state_dict()
    optional = set() if includes_backbone else _reference_keys(model, _config_of(model))
    missing = sorted(set(expected) - set(state) - optional)
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{k}: {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(state) & set(expected))
        if state[k].shape != expected[k].shape
    ]
    problems = []
    for label, items in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("shape mismatch", mismatched),
    ):
        if items:
            more = f" (+{len(items) - 8} more)" if len(items) > 8 else ""
            problems.append(f"{label}: {', '.join(items[:8])}{more}")
    if problems:
        raise CheckpointError(f"{where}: weights do not fit the model; " + "; ".join(problems))
    with torch.no_grad():
        model.load_state_dict(state, strict=False)


def _config_of(model: SegVLM) -> ModelConfig:
    # The backbone knows its own BackboneConfig; _reference_keys only reads the backbone section.
    return ModelConfig(backbone=model.backbone.cfg)


def _load_backbone(folder: Path, cfg: ModelConfig, meta: dict[str, Any]) -> CLIPBackbone:
    backbone_dir = folder / BACKBONE_DIR
    tokenizer = None
    if (backbone_dir / "tokenizer_config.json").is_file():
        try:
            tokenizer = CLIPTokenizer.from_pretrained(str(backbone_dir))
            check_tokenizer(tokenizer, str(backbone_dir))
        except (OSError, ValueError) as err:
            raise CheckpointError(f"{backbone_dir}: cannot load the tokenizer ({err})") from err

    if meta.get("includes_backbone", True):
        try:
            clip_config = CLIPConfig.from_pretrained(str(backbone_dir))
        except (OSError, ValueError) as err:
            raise CheckpointError(
                f"{backbone_dir / 'config.json'}: missing or invalid CLIP config ({err})"
            ) from err
        clip = CLIPModel(clip_config)  # random init, overwritten by model.safetensors
    else:
        ref = cfg.backbone.pretrained or meta.get("backbone_ref")
        try:
            clip, ref_tokenizer = load_clip(str(ref))
        except OSError as err:
            raise CheckpointError(
                f"{folder / META_FILE}: backbone reference {ref!r} cannot be loaded: {err}"
            ) from err
        tokenizer = tokenizer or ref_tokenizer
    return CLIPBackbone(clip, tokenizer, cfg.backbone)


def load_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[SegVLM, ModelConfig, dict[str, Any]]:
    """Load a checkpoint folder written by ``save_checkpoint``.

    Returns ``(model, cfg, meta)`` with the model in eval mode on ``map_location``.

    Raises:
        CheckpointError: naming the offending file: missing folder/file, unknown ``format_version``,
            invalid config, corrupt or truncated weights, missing/unexpected keys, shape mismatch.
    """
    from segvlm.registry import build_model  # registry imports this module's neighbours; keep import light

    folder = Path(path)
    meta = read_meta(folder)
    config_file = folder / CONFIG_FILE
    if not config_file.is_file():
        raise CheckpointError(f"{config_file}: missing")
    try:
        data = yaml.safe_load(config_file.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{config_file}: not valid YAML ({err})") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{config_file}: invalid model config (top level must be a mapping)")
    changes = _migrate_config(data)
    try:
        cfg = from_dict(ModelConfig, data)
    except ConfigError as err:
        raise CheckpointError(f"{config_file}: invalid model config ({err})") from err

    weights_file = folder / WEIGHTS_FILE
    state = _read_weights(weights_file)  # before building: fail fast on a corrupt file
    _log_migration(folder, changes, _drop_training_heads(state))
    model = build_model(cfg, backbone=_load_backbone(folder, cfg, meta))
    _load_checked(
        model, state, includes_backbone=bool(meta.get("includes_backbone", True)), where=str(weights_file)
    )

    if "backbone_checksum" in meta:
        keys = _reference_keys(model, cfg)
        if keys and abs(_checksum(model.state_dict(), keys) - meta["backbone_checksum"]) > 1e-6 * max(
            1.0, abs(meta["backbone_checksum"])
        ):
            warnings.warn(
                f"{folder}: the weights of backbone reference {cfg.backbone.pretrained!r} differ from those the "
                "checkpoint was trained with; predictions will differ",
                stacklevel=2,
            )
    return model.to(map_location).eval(), cfg, meta
