"""Weighted training mixtures: ``data.train_shards`` as a list of ``{path, weight, split}``. Each image comes
from source d with probability w_d, whatever the sources' sizes, on every rank; seeded; parsed from YAML and
from the command line, and validated once."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from jobs.config import ExperimentConfig
from pipeline import manifest as mf
from pipeline import shards
from pipeline.loader import DataConfig, ShardSource, make_train_loader
from segvlm.config import ConfigError, load_config, to_yaml
from tests.pipeline.test_loader import fake_tokenize, make_record


def write_source(folder: Path, sizes: list[int], first_id: int, split: str = "train") -> set[str]:
    """Shards ``{split}-*.tar`` of ``make_record`` images (3 objects, 3 positive tasks each) numbered from
    ``first_id`` (so two sources never share a key), with ``sizes.json`` and ``manifest.parquet``; returns
    the keys."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(first_id)
    rows, counts, keys, image_id = [], {}, set(), first_id
    for i, n in enumerate(sizes):
        name = f"{split}-{i:06d}.tar"
        with wds.TarWriter(str(folder / name)) as sink:
            for _ in range(n):
                record, jpg = make_record(image_id, rng, width=40, height=32, negatives=False)
                sink.write({"__key__": record.key, "jpg": jpg, "json": record.to_json()})
                rows += mf.manifest_rows(record, name)
                keys.add(record.key)
                image_id += 1
        counts[name] = n
    fs, base = shards.resolve(str(folder))
    mf.write_manifest(fs, base, rows, counts)
    return keys


@pytest.fixture
def two_sources(tmp_path: Path) -> tuple[DataConfig, list[set[str]]]:
    """A small source (5 images) at weight 0.8 and a large one (48 images, its own split) at 0.2: drawn by
    size, the small one would supply 9% of the images."""
    small = write_source(tmp_path / "small", [3, 2], first_id=0)
    large = write_source(tmp_path / "large", [8] * 6, first_id=1000, split="extra")
    data = DataConfig(
        train_shards=(
            ShardSource(str(tmp_path / "small"), 4.0),  # relative weights: normalised to 0.8 / 0.2
            ShardSource(str(tmp_path / "large"), 1.0, split="extra"),
        ),
        negative_rate=0.0,
        phrases_per_image=3,  # an image's 3 tasks stay together: a batch of 9 holds exactly 3 images
        shuffle_buffer=20,
        num_workers=0,
    )
    return data, [small, large]


def images_by_source(
    data: DataConfig, keys: list[set[str]], *, rank: int, seed: int, steps: int
) -> list[int]:
    """The source of every image rank ``rank`` of 2 draws in ``steps`` batches of 9 tasks (3 images),
    checked against the keys each source holds."""
    stream, info = make_train_loader(
        data,
        batch_size=9,
        image_size=16,
        tokenizer=fake_tokenize,
        seed=seed,
        rank=rank,
        world_size=2,
        steps_per_epoch=steps,
        return_dataset=True,
    )
    assert [s.weight for s in info.sources] == pytest.approx([0.8, 0.2])
    assert info.source_images == [5, 48] and info.num_images == 53 and info.num_shards == 8
    drawn = []
    for batch in stream:
        assert batch["source"].shape == (9,) and batch["pixel_values"].shape[0] == 3
        for slot in range(3):
            members = (batch["image_index"] == slot).nonzero().flatten().tolist()
            sources = {int(batch["source"][i]) for i in members}
            assert len(members) == 3 and len(sources) == 1
            source = sources.pop()
            assert {batch["key"][i] for i in members} <= keys[source], "an item tagged with the wrong source"
            drawn.append(source)
    assert len(drawn) == 3 * steps
    return drawn


def test_each_rank_draws_images_by_weight_not_by_source_size(two_sources) -> None:
    """402 images per rank, each from the small source with p = 0.8: its share lies within 4 binomial
    standard deviations, sqrt(0.8 · 0.2 / 402) ≈ 0.020, of 0.8 on each rank and over both."""
    data, keys = two_sources
    steps, p = 134, 0.8
    per_rank = [images_by_source(data, keys, rank=rank, seed=5, steps=steps) for rank in (0, 1)]
    assert per_rank[0] != per_rank[1], "ranks must draw independently"
    for drawn in [*per_rank, per_rank[0] + per_rank[1]]:
        share = drawn.count(0) / len(drawn)
        assert abs(share - p) <= 4 * math.sqrt(p * (1 - p) / len(drawn)), share
        assert set(drawn) == {0, 1}


def test_a_mixture_is_seeded(two_sources) -> None:
    data, _ = two_sources

    def first_batches(seed: int, rank: int) -> list[dict]:
        stream, _ = make_train_loader(
            data,
            batch_size=9,
            image_size=16,
            tokenizer=fake_tokenize,
            seed=seed,
            rank=rank,
            world_size=2,
            steps_per_epoch=6,
            return_dataset=True,
        )
        return list(stream)

    a, b, other_rank, other_seed = (
        first_batches(1, 0),
        first_batches(1, 0),
        first_batches(1, 1),
        first_batches(2, 0),
    )
    for x, y in zip(a, b, strict=True):
        assert x["source"].equal(y["source"]) and x["task_id"] == y["task_id"]
        assert x["pixel_values"].equal(y["pixel_values"]) and x["crop_box"].equal(y["crop_box"])
    sequence = [(b["source"].tolist(), b["task_id"]) for b in a]
    assert sequence != [(b["source"].tolist(), b["task_id"]) for b in other_rank]
    assert sequence != [(b["source"].tolist(), b["task_id"]) for b in other_seed]


def test_a_plain_folder_is_a_mixture_of_one(tmp_path: Path) -> None:
    """``train_shards: DIR`` and ``[{path: DIR, weight: 3}]`` read the same images with the same crops."""
    write_source(tmp_path / "only", [4, 3], first_id=0)

    def batches(train_shards) -> list[dict]:
        data = DataConfig(train_shards=train_shards, shuffle_buffer=10, num_workers=0)
        stream, info = make_train_loader(
            data,
            batch_size=6,
            image_size=16,
            tokenizer=fake_tokenize,
            seed=4,
            steps_per_epoch=4,
            return_dataset=True,
        )
        assert info.sources == (ShardSource(str(tmp_path / "only"), 1.0, "train"),)
        return list(stream)

    plain, listed = batches(str(tmp_path / "only")), batches((ShardSource(str(tmp_path / "only"), 3.0),))
    for x, y in zip(plain, listed, strict=True):
        assert x["task_id"] == y["task_id"] and x["pixel_values"].equal(y["pixel_values"])
        assert x["source"].tolist() == [0] * 6


# ----------------------------------------------------------------------------------------------- config


def test_a_mixture_from_yaml_and_from_the_command_line(tmp_path: Path) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text(
        "data:\n"
        "  train_split: trn\n"
        "  train_shards:\n"
        "    - {path: s3://b/refcoco/train, weight: 0.8}\n"
        "    - path: shards/gref\n"
        "      weight: 0.2\n"
        "      split: extra\n"
    )
    from_yaml = load_config(ExperimentConfig, path)
    assert from_yaml.data.train_shards == (
        ShardSource("s3://b/refcoco/train", 0.8),
        ShardSource("shards/gref", 0.2, "extra"),
    )
    assert from_yaml.data.train_sources() == (
        ShardSource("s3://b/refcoco/train", 0.8, "trn"),
        ShardSource("shards/gref", 0.2, "extra"),
    )
    # on the command line: the same list in YAML's one-line form (4:1 normalises to the same 0.8 / 0.2)
    override = "[{path: s3://b/refcoco/train, weight: 4}, {path: shards/gref, weight: 1, split: extra}]"
    from_cli = load_config(ExperimentConfig, None, ["data.train_split=trn", f"data.train_shards={override}"])
    assert from_cli.data.train_sources() == from_yaml.data.train_sources()
    assert [s.weight for s in from_cli.data.train_sources()] == pytest.approx([0.8, 0.2])
    # a plain folder still reads as before: one source at weight 1
    plain = load_config(ExperimentConfig, path, ["data.train_shards=s3://b/phrasecut/train"])
    assert plain.data.train_shards == "s3://b/phrasecut/train"
    assert plain.data.train_sources() == (ShardSource("s3://b/phrasecut/train", 1.0, "trn"),)
    # the resolved config (as logged) loads back to the same mixture
    resolved = tmp_path / "resolved.yaml"
    resolved.write_text(to_yaml(from_cli))
    assert load_config(ExperimentConfig, resolved) == from_cli


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("[{path: a, weight: 0}]", r"train_shards\[0\]\.weight must be a finite number > 0, got 0\.0"),
        (
            "[{path: a}, {path: b, weight: -0.5}]",
            r"train_shards\[1\]\.weight must be a finite number > 0, got -0\.5",
        ),
        ("[{path: a, weight: nan}]", r"train_shards\[0\]\.weight must be a finite number > 0, got nan"),
        ("[{path: a, weight: .inf}]", r"train_shards\[0\]\.weight must be a finite number > 0, got inf"),
        ("[]", r"train_shards: a mixture needs at least one"),
        (
            "[{path: s3://b/x}, {path: s3://b/x/, weight: 2}]",
            r"train_shards\[1\]: s3://b/x \(split 'train'\) is already",
        ),
        ("[{path: ''}]", r"train_shards\[0\]\.path is empty"),
        ("[{path: a, wieght: 1}]", r"unknown key\(s\) \['wieght'\]"),
    ],
)
def test_bad_mixtures_name_the_source_and_the_reason(value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(ExperimentConfig, None, [f"data.train_shards={value}"])


def test_the_same_folder_under_two_splits_is_two_sources() -> None:
    cfg = load_config(ExperimentConfig, None, ["data.train_shards=[{path: a}, {path: a, split: extra}]"])
    assert [s.split for s in cfg.data.train_sources()] == ["train", "extra"]
