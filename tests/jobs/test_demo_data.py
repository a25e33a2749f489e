"""The one demo-data builder: the demo's prompt rates (no templates, negatives) on train, none elsewhere."""

from __future__ import annotations

from pathlib import Path

from jobs.demo_data import DEMO_PROMPT_RATES, demo_data_paths, demo_prepare_configs


def test_train_gets_the_demo_prompt_rates_and_val_test_get_no_synthetic_prompts(tmp_path: Path) -> None:
    configs = demo_prepare_configs(tmp_path, seed=3, shard_samples=50)
    assert list(configs) == ["train", "val", "test"]
    train = configs["train"]
    assert train.synthetic_prompts and dict(train.prompt_rates) == DEMO_PROMPT_RATES
    assert train.prompt_rates["template"] == 0.0 and train.prompt_rates["negative"] > 0.0
    assert not configs["val"].synthetic_prompts and not configs["test"].synthetic_prompts
    for split, config in configs.items():
        assert config.source == "scenes" and config.root == str(tmp_path / "scenes")
        assert config.out == str(tmp_path / "shards" / split) == demo_data_paths(tmp_path)[split]
        assert config.seed == 3 and config.shard_samples == 50
