"""Print total and trainable parameter counts of a model config as JSON.

    segvlm params --config configs/segvlm_b16.yaml
    segvlm params --model clipseg_b16 decoder.reduce_dim=128

The model is built from its config; nothing is downloaded. A ``backbone.pretrained`` that is a local folder is
loaded (its vocabulary may differ from the architecture's); a hub id is replaced by the random-init
architecture ``backbone.arch``, which has the same parameters.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from segvlm.config import ConfigError, ModelConfig, from_dict, to_dict


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="segvlm params", description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", type=Path, help="YAML file with a top-level `model:` mapping")
    src.add_argument("--model", help="registry preset name (see --list)")
    src.add_argument("--list", action="store_true", help="list the registry presets and exit")
    p.add_argument("overrides", nargs="*", help="model overrides, e.g. decoder.reduce_dim=128")
    return p.parse_args(argv)


def resolve_model_config(config: Path | None, model: str | None, overrides: list[str]) -> ModelConfig:
    """The ModelConfig from a YAML file's ``model:`` section or a registry preset, with overrides."""
    from segvlm.registry import model_config

    if model is not None:
        return model_config(model, overrides)
    assert config is not None
    if not config.is_file():
        raise ConfigError(f"config file not found: {config}")
    try:
        data = yaml.safe_load(config.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{config}: not valid YAML: {err}") from err
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise ConfigError(f"{config}: needs a top-level `model:` mapping")
    try:
        return from_dict(ModelConfig, data["model"], overrides)
    except ConfigError as err:
        raise ConfigError(f"{config}: {err}") from err


def main(argv: list[str] | None = None) -> int:
    """Print ``{"model", "total", "trainable", "modules": {...}}`` for a model config."""
    args = _parse(argv)
    from segvlm.registry import build_model, list_models

    if args.list:
        print("\n".join(list_models()))
        return 0
    try:
        cfg = resolve_model_config(args.config, args.model, list(args.overrides))
    except ConfigError as err:
        print(f"segvlm params: {err}", file=sys.stderr)
        return 2
    ref = cfg.backbone.pretrained
    if ref and not Path(ref).expanduser().is_dir():
        print(
            f"segvlm params: counting {cfg.backbone.arch!r} from config instead of downloading {ref!r}",
            file=sys.stderr,
        )
        data = to_dict(cfg)
        data["backbone"]["pretrained"] = None
        cfg = from_dict(ModelConfig, data)

    counts = build_model(cfg).num_parameters()
    print(json.dumps({"model": cfg.name, **counts}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
