"""The one demo-data builder: the demo's prompt rates (no templates, negatives) on train, negatives only on
test, none on val."""

from __future__ import annotations

from pathlib import Path

from jobs.demo_data import (
    DEMO_PROMPT_RATES,
    DEMO_TEST_PROMPT_RATES,
    demo_data_paths,
    demo_prepare_configs,
)
from pipeline.prompts import GENERATED_KINDS


def test_train_gets_the_demo_prompt_rates_test_negatives_only_and_val_no_synthetic_prompts(
    tmp_path: Path,
) -> None:
    configs = demo_prepare_configs(tmp_path, seed=3, shard_samples=50)
    assert list(configs) == ["train", "val", "test"]
    train = configs["train"]
    assert train.synthetic_prompts and dict(train.prompt_rates) == DEMO_PROMPT_RATES
    assert train.prompt_rates["template"] == 0.0 and train.prompt_rates["negative"] > 0.0
    # test: the scenes' phrases plus negative prompts (the report's no-target accuracy), nothing else
    test = configs["test"]
    assert test.synthetic_prompts and dict(test.prompt_rates) == DEMO_TEST_PROMPT_RATES
    assert set(test.prompt_rates) == set(GENERATED_KINDS)
    assert {k for k, rate in test.prompt_rates.items() if rate > 0} == {"negative"}
    assert 0.1 <= test.prompt_rates["negative"] <= 0.2
    # val picks the threshold: the scenes' phrases alone
    assert not configs["val"].synthetic_prompts and configs["val"].prompt_rates is None
    for split, config in configs.items():
        assert config.source == "scenes" and config.root == str(tmp_path / "scenes")
        assert config.out == str(tmp_path / "shards" / split) == demo_data_paths(tmp_path)[split]
        assert config.seed == 3 and config.shard_samples == 50
