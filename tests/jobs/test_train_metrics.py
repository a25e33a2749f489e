"""What a training run logs about its data mixture: each source's path, split, weight, manifest hash and
image count; the mixture's identity; and the share of tasks each source supplied in a logging window."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from jobs.train_metrics import StepWindow, describe_mixture, mixture_hash
from pipeline import manifest as mf
from pipeline.loader import DataConfig, ShardSource
from tests.pipeline.test_mixture import write_source


def test_the_logged_mixture_names_each_source_and_its_data(tmp_path: Path) -> None:
    small, large = str(tmp_path / "small"), str(tmp_path / "large")
    write_source(Path(small), [3, 2], first_id=0)
    write_source(Path(large), [8] * 6, first_id=1000, split="extra")
    data = DataConfig(train_shards=(ShardSource(small, 4.0), ShardSource(large, 1.0, "extra")))
    sources = describe_mixture(data)
    hashes = mf.manifest_hash(small), mf.manifest_hash(large)
    assert sources == [
        {"path": small, "split": "train", "weight": 0.8, "manifest_hash": hashes[0], "images": 5},
        {"path": large, "split": "extra", "weight": 0.2, "manifest_hash": hashes[1], "images": 48},
    ]
    assert hashes[0] != hashes[1]
    expected = [[hashes[0], "train", 0.8], [hashes[1], "extra", 0.2]]
    assert mixture_hash(sources) == hashlib.sha256(json.dumps(expected).encode()).hexdigest()
    assert mixture_hash(sources[:1]) == mf.manifest_hash(small)  # one source: its manifest hash, as before
    moved = [{**s, "path": f"s3://elsewhere/{i}"} for i, s in enumerate(sources)]
    assert mixture_hash(moved) == mixture_hash(sources)  # the data, not where it lies
    reweighted = [{**sources[0], "weight": 0.5}, {**sources[1], "weight": 0.5}]
    assert mixture_hash(reweighted) != mixture_hash(sources)
    assert describe_mixture(DataConfig(train_shards=small)) == [{**sources[0], "weight": 1.0}]


def test_the_step_window_reports_each_sources_share_of_the_tasks() -> None:
    window = StepWindow()
    window.count_sources(torch.tensor([0, 0, 1, 0]), 3)
    window.count_sources(torch.tensor([1, 0, 0, 0]), 3)
    window.steps = 2
    means = window.summarize(torch.device("cpu"), batch_size=4)
    assert means["source_share/0"] == pytest.approx(6 / 8)
    assert means["source_share/1"] == pytest.approx(2 / 8)
    assert means["source_share/2"] == 0.0
    assert window.source_tasks is None  # reset with the window
    assert not any(k.startswith("source_share") for k in window.summarize(torch.device("cpu"), batch_size=4))
