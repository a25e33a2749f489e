"""Config loading: YAML + ``key.path=value`` overrides into frozen dataclasses, validated once."""

from __future__ import annotations

import dataclasses

import pytest

from jobs.config import ExperimentConfig
from segvlm.config import ConfigError, load_config, to_yaml


def test_overrides_reach_nested_fields_with_their_types(tmp_path) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text("optim:\n  lr: 1.0e-3\ntrain:\n  batch_size: 8\n")
    cfg = load_config(
        ExperimentConfig,
        path,
        ["optim.lr=3e-4", "optim.weight_decay=1E-2", "train.batch_size=4", "data.crop_scale=[0.8, 1.0]"],
    )
    # 3e-4 without a dot is a string to YAML 1.1; it must still become the float a user meant
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.optim.weight_decay == pytest.approx(1e-2)
    assert cfg.train.batch_size == 4
    assert cfg.data.crop_scale == (0.8, 1.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optim.lr = 1.0  # type: ignore[misc]


def test_a_resolved_config_round_trips_through_yaml(tmp_path) -> None:
    cfg = load_config(ExperimentConfig, None, ["optim.lr=2e-4", "model.decoder.se=true"])
    path = tmp_path / "resolved.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config(ExperimentConfig, path) == cfg


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lr=fast", r"optim\.lr: expected a number, got 'fast'"),
        ("train.batch_size=2.5", r"train\.batch_size: expected an integer"),
        ("optim.learning_rate=1.0", r"unknown key\(s\) \['learning_rate'\]"),
        ("optim.lr", r"not of the form key\.path=value"),
    ],
)
def test_bad_overrides_name_the_key_and_the_reason(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(ExperimentConfig, None, [override])


def test_reports_are_strict_json_with_null_for_undefined_metrics() -> None:
    import json

    from jobs.common import to_json

    text = to_json({"official/negative/empty_rate": float("nan"), "rows": [1.5, float("inf")], "n": 3})
    assert json.loads(text) == {"official/negative/empty_rate": None, "rows": [1.5, None], "n": 3}
    assert "NaN" not in text and "Infinity" not in text
