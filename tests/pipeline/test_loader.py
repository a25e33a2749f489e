"""Transforms and WebDataset loaders: alignment, exact-once evaluation, equal batch counts, augmentation."""

from __future__ import annotations

import dataclasses
import io
import json
import pickle
import tarfile
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image, ImageDraw

from pipeline.augment import mirror_phrase, object_fraction, random_object_crop
from pipeline.loader import DataConfig, eval_assignment, list_shards, make_eval_loader, make_train_loader
from pipeline.schema import ImageRecord, Task
from segvlm.masks import rasterize_polygons
from segvlm.preprocess import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    crop_resize,
    decode_image,
    eval_transform,
    target_mask,
    target_mask_array,
)

COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30)}
BACKGROUND = (128, 128, 128)


def fake_tokenize(phrases: list[str]) -> dict[str, torch.Tensor]:
    """Word hashes padded to 8 tokens: enough to check that phrases reach the batch."""
    ids = torch.zeros(len(phrases), 8, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, phrase in enumerate(phrases):
        words = [zlib.crc32(w.encode()) % 1000 + 1 for w in phrase.split()][:8]
        ids[i, : len(words)] = torch.tensor(words)
        mask[i, : len(words)] = 1
    return {"input_ids": ids, "attention_mask": mask}


SIDES = {"triangle": " on the left", "rectangle": " on the right"}  # where make_record draws them


def make_record(
    image_id: int,
    rng: np.random.Generator,
    *,
    width: int,
    height: int,
    negatives: bool,
    sides: bool = False,
) -> tuple:
    """An image with a red right triangle (legs left and bottom) on the left, a blue rectangle on the
    right and a green diamond in the middle; one task per object, types cycling. ``sides``: the triangle's
    and the rectangle's phrases say where they are (``SIDES``)."""
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    w, h = width, height
    jx, jy = rng.uniform(-0.05, 0.05, 2)
    tri = [
        [(0.05 + jx) * w, (0.9 + jy) * h],
        [(0.35 + jx) * w, (0.9 + jy) * h],
        [(0.05 + jx) * w, (0.2 + jy) * h],
    ]
    rect = [
        [(0.65 - jx) * w, (0.3 + jy) * h],
        [0.95 * w, (0.3 + jy) * h],
        [0.95 * w, 0.8 * h],
        [(0.65 - jx) * w, 0.8 * h],
    ]
    dia = [[0.5 * w, 0.35 * h], [0.58 * w, 0.5 * h], [0.5 * w, 0.65 * h], [0.42 * w, 0.5 * h]]
    # the diamond's name varies, so other images' phrases can be valid negatives for this one
    third = ("diamond", "kite", "gem", "rhombus")[image_id % 4]
    objects = [("red", "triangle", tri), ("blue", "rectangle", rect), ("green", third, dia)]
    types = ["name", "attribute", "relation", "verbose"]
    tasks = []
    for j, (colour, name, poly) in enumerate(objects):
        draw.polygon([tuple(p) for p in poly], fill=COLOURS[colour])
        kind = types[(image_id + j) % 4]
        tasks.append(
            Task(
                task_id=f"{image_id}__{j}",
                phrase=f"{colour} {name}" + (SIDES.get(name, "") if sides else ""),
                polygons=[[[[float(x), float(y)] for x, y in poly]]],
                boxes=[],
                phrase_structure={"name": name, "attributes": [colour], "type": kind},
                kind="original",
            )
        )
    if negatives:
        tasks.append(
            Task(
                task_id=f"{image_id}__neg",
                phrase="purple star",
                polygons=[],
                phrase_structure={"name": "star", "attributes": ["purple"], "type": "attribute"},
                kind="negative",
            )
        )
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=95)
    record = ImageRecord(source="test", image_id=image_id, split="train", width=w, height=h, tasks=tasks)
    return record, buf.getvalue()


def write_shards(
    folder: Path,
    sizes: list[int],
    *,
    split: str = "train",
    width: int = 96,
    height: int = 72,
    negatives: bool = False,
    seed: int = 0,
    plant: bool = False,
    sides: bool = False,
) -> dict[str, ImageRecord]:
    """Shards ``{split}-{i:06d}.tar`` with ``sizes[i]`` images each, plus ``sizes.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    records: dict[str, ImageRecord] = {}
    image_id = 0
    for i, n in enumerate(sizes):
        path = folder / f"{split}-{i:06d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for _ in range(n):
                record, jpg = make_record(
                    image_id, rng, width=width, height=height, negatives=negatives, sides=sides
                )
                sample = {"__key__": record.key, "jpg": jpg, "json": record.to_json()}
                if plant:
                    sample["pickle"] = b"not a pickle at all"  # decoding it would raise
                sink.write(sample)
                records[record.key] = record
                image_id += 1
        if plant:  # a stray member of its own
            with tarfile.open(path, "a") as tar:
                data = pickle.dumps({"boom": 1})
                info = tarfile.TarInfo("x.pickle")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    (folder / "sizes.json").write_text(json.dumps({f"{split}-{i:06d}.tar": n for i, n in enumerate(sizes)}))
    return records


def all_tasks(records: dict[str, ImageRecord]) -> dict[str, tuple[ImageRecord, Task]]:
    return {t.task_id: (r, t) for r in records.values() for t in r.tasks}


def unnormalize(pixels: torch.Tensor) -> np.ndarray:
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(3, 1, 1)
    return ((pixels * std + mean) * 255).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()


def colour_mask(rgb: np.ndarray, colour: str) -> np.ndarray:
    return (np.abs(rgb.astype(int) - np.array(COLOURS[colour])).sum(-1) < 90).astype(np.uint8)


def grow(mask: np.ndarray) -> np.ndarray:
    """Binary dilation by one pixel (3×3)."""
    padded = np.pad(mask, 1)
    h, w = mask.shape
    return np.any([padded[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)], axis=0)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


# ----------------------------------------------------------------------------------------------- transforms


@pytest.mark.parametrize("size", [128, 352])
def test_target_mask_aligned_with_high_resolution_raster(size: int) -> None:
    """Rasterising the polygons directly at S after crop+resize ≈ cropping and resizing an 8× raster:
    IoU ≥ 0.95 (on average at 128 px, where PhraseCut's outline=1 convention fattens a mask by up to a
    pixel; on every sample at 352 px) and no shift (centroids within a pixel — the int cast of the vertices — and 0.15 px on average)."""
    rng = np.random.default_rng(1)
    w, h = 160, 120
    ious, shifts = [], []
    for _ in range(30):
        centre = rng.uniform([40, 30], [120, 90])
        angles = np.sort(rng.uniform(0, 2 * np.pi, 7))
        radius = rng.uniform(15, 40, 7)
        poly = [
            [float(centre[0] + r * np.cos(a)), float(centre[1] + r * np.sin(a))]
            for a, r in zip(angles, radius)
        ]
        polygons = [[poly]]
        box = random_object_crop(w, h, rasterize_polygons(polygons, w, h), rng=rng, scale=(0.5, 1.0))
        direct = target_mask_array(polygons, box, size)
        hi = rasterize_polygons(polygons, 8 * w, 8 * h, scale_x=8, scale_y=8)
        resized = np.asarray(crop_resize(Image.fromarray(hi * 255), tuple(8 * v for v in box), size)) >= 128
        ious.append(iou(direct, resized))
        ys, xs = np.nonzero(direct)
        ys2, xs2 = np.nonzero(resized)
        shifts.append((xs.mean() - xs2.mean(), ys.mean() - ys2.mean()))
        # the image pixels follow the same map: paint the polygon, crop+resize, threshold on colour
        image = Image.new("RGB", (w, h), BACKGROUND)
        ImageDraw.Draw(image).polygon([tuple(p) for p in poly], fill=COLOURS["red"])
        assert iou(direct, colour_mask(np.asarray(crop_resize(image, box, size)), "red")) >= 0.9
        assert target_mask(polygons, box, size).shape == (1, size, size)
    assert np.mean(ious) >= 0.95
    shifts = np.array(shifts)
    assert np.abs(shifts).max() < 1.0 and np.abs(shifts.mean(0)).max() < 0.15
    if size >= 352:
        assert min(ious) >= 0.95


def test_decode_image_draft_and_eval_transform() -> None:
    _, jpg = make_record(0, np.random.default_rng(0), width=512, height=384, negatives=False)
    image, reduction = decode_image(jpg, min_size=(86, 64))
    assert reduction == 4 and image.size == (128, 96)
    full, r1 = decode_image(jpg)
    assert r1 == 1 and full.size == (512, 384)
    pixels = eval_transform(full, 32)
    assert pixels.shape == (3, 32, 32) and pixels.dtype == torch.float32


# ----------------------------------------------------------------------------------------------- evaluation


def test_eval_round_trip(tmp_path: Path) -> None:
    records = write_shards(tmp_path, [3, 4], split="val", negatives=True)
    expected = all_tasks(records)
    size = 48
    seen = {}
    for batch in make_eval_loader(
        tmp_path, split="val", batch_size=5, image_size=size, tokenizer=fake_tokenize, num_workers=0
    ):
        b = batch["pixel_values"].shape[0]
        assert batch["pixel_values"].shape == (b, 3, size, size)
        assert batch["masks"].shape == (b, 1, size, size) and batch["input_ids"].shape == (b, 8)
        for i, task_id in enumerate(batch["task_id"]):
            assert task_id not in seen
            seen[task_id] = True
            record, task = expected[task_id]
            assert batch["phrase"][i] == task.phrase and batch["kind"][i] == task.kind
            assert batch["key"][i] == record.key and batch["phrase_type"][i] == task.phrase_type
            assert (
                int(batch["orig_width"][i]) == record.orig_width
                and int(batch["orig_height"][i]) == record.orig_height
            )
            assert batch["polygons"][i] == task.polygons and int(batch["num_instances"][i]) == len(
                task.polygons
            )
            direct = rasterize_polygons(
                task.polygons, size, size, scale_x=size / record.width, scale_y=size / record.height
            )
            np.testing.assert_array_equal(batch["masks"][i, 0].numpy(), direct)  # exact
            assert batch["input_ids"][i].equal(fake_tokenize([task.phrase])["input_ids"][0])
    assert set(seen) == set(expected)


def test_eval_assignment_partitions_samples() -> None:
    """Pure check over many layouts: every (shard, sample) lands in exactly one slot."""
    for sizes in ([5], [1, 7, 2], [3, 3], [0, 4, 1, 9, 2], [2] * 9):
        for world in (1, 2, 3):
            for workers in (1, 2, 3):
                owners: Counter = Counter()
                for rank in range(world):
                    for worker in range(workers):
                        shards, mod, rem = eval_assignment(len(sizes), rank, world, worker, workers)
                        stream = [(s, j) for s in shards for j in range(sizes[s])]
                        owners.update(item for k, item in enumerate(stream) if k % mod == rem)
                total = [(s, j) for s in range(len(sizes)) for j in range(sizes[s])]
                assert set(owners) == set(total) and all(c == 1 for c in owners.values()), (
                    sizes,
                    world,
                    workers,
                )


@pytest.mark.parametrize("sizes", [[3, 4], [6], [1, 5, 2, 4, 3]], ids=["2-shards", "1-shard", "5-uneven"])
def test_eval_every_task_once_over_ranks_and_workers(tmp_path: Path, sizes: list[int]) -> None:
    records = write_shards(tmp_path, sizes, split="val", width=40, height=32, negatives=True)
    expected = all_tasks(records)
    counts: Counter = Counter()
    for rank in range(2):
        loader = make_eval_loader(
            tmp_path,
            split="val",
            batch_size=4,
            image_size=16,
            tokenizer=fake_tokenize,
            rank=rank,
            world_size=2,
            num_workers=2,
        )
        for batch in loader:
            counts.update(batch["task_id"])
    assert set(counts) == set(expected)
    assert max(counts.values()) == 1


# ----------------------------------------------------------------------------------------------- training


def test_train_ranks_get_equal_batch_counts(tmp_path: Path) -> None:
    write_shards(tmp_path, [1, 7, 2], width=40, height=32)
    counts = []
    for rank in range(2):
        loader, info = make_train_loader(
            DataConfig(train_shards=str(tmp_path), num_workers=2, shuffle_buffer=8, task_shuffle_buffer=8),
            batch_size=4,
            image_size=16,
            tokenizer=fake_tokenize,
            seed=3,
            rank=rank,
            world_size=2,
            steps_per_epoch=5,
        )
        assert len(loader) == 5 and info.batches_per_worker == [3, 2] and info.num_images == 10
        batches = list(loader)
        assert all(b["pixel_values"].shape == (4, 3, 16, 16) for b in batches)
        counts.append(len(batches))
        counts.append(len(list(loader)))  # a second epoch too
    assert counts == [5, 5, 5, 5]
    _, info = make_train_loader(
        DataConfig(train_shards=str(tmp_path), num_workers=0),
        batch_size=4,
        image_size=16,
        tokenizer=fake_tokenize,
        world_size=3,
        rank=2,
        samples_per_epoch=100,
    )
    assert info.steps_per_epoch == 9  # ceil(100 / (4 · 3)), the same on every rank


def test_train_is_seeded(tmp_path: Path) -> None:
    write_shards(tmp_path, [4, 4], width=40, height=32)

    def first(seed: int, rank: int) -> dict:
        stream, _ = make_train_loader(
            DataConfig(train_shards=str(tmp_path), num_workers=0),
            batch_size=6,
            image_size=16,
            tokenizer=fake_tokenize,
            seed=seed,
            rank=rank,
            world_size=2,
            steps_per_epoch=2,
            return_dataset=True,
        )
        return next(iter(stream))

    a, b, c = first(1, 0), first(1, 0), first(1, 1)
    assert a["task_id"] == b["task_id"] and a["pixel_values"].equal(b["pixel_values"])
    assert a["task_id"] != c["task_id"] or not a["pixel_values"].equal(c["pixel_values"])


def _train_items(folder: Path, n_batches: int, **kwargs) -> list[dict]:
    knobs = {f.name for f in dataclasses.fields(DataConfig)}
    data = DataConfig(
        train_shards=str(folder), num_workers=0, **{k: kwargs.pop(k) for k in knobs & set(kwargs)}
    )
    stream, _ = make_train_loader(
        data,
        batch_size=kwargs.pop("batch_size", 16),
        image_size=kwargs.pop("image_size", 48),
        tokenizer=fake_tokenize,
        seed=kwargs.pop("seed", 0),
        steps_per_epoch=n_batches,
        return_dataset=True,
        **kwargs,
    )
    items = []
    for batch in stream:
        for i in range(batch["pixel_values"].shape[0]):
            items.append({k: (v[i] if isinstance(v, list | torch.Tensor) else v) for k, v in batch.items()})
    return items


@pytest.mark.parametrize("width,height", [(96, 72), (512, 384)], ids=["small", "draft-decoded"])
def test_train_crops_masks_and_orientation(tmp_path: Path, width: int, height: int) -> None:
    """Crops keep ≥ 5% of the object (exactly, on the full-resolution raster of the stored image); masks
    are binary and lie on pixels of the object's colour; the left-legged triangle keeps its legs on the
    left (no flips)."""
    records = write_shards(tmp_path, [6, 6], width=width, height=height)
    expected = all_tasks(records)
    items = _train_items(tmp_path, 12, negative_rate=0.0)
    assert len(items) == 12 * 16
    overlaps = []
    for item in items:
        record, task = expected[item["task_id"]]
        box = [int(v) for v in item["crop_box"]]
        full = rasterize_polygons(task.polygons, record.width, record.height)
        assert object_fraction(full, box) >= 0.05
        mask = item["masks"][0].numpy()
        assert set(np.unique(mask)) <= {0.0, 1.0}
        np.testing.assert_array_equal(mask, target_mask_array(task.polygons, box, 48))
        colour, name = task.phrase.split()
        rgb = unnormalize(item["pixel_values"])
        if mask.sum() >= 20:
            # the object's colour lies under the mask; boundary pixels blur into the background (JPEG,
            # resampling, PhraseCut's outline=1 raster), so the mask is a little larger than the colour
            # (1 px of tolerance: compare with the mask grown and shrunk by one pixel)
            painted, target = colour_mask(rgb, colour).astype(bool), mask > 0
            assert (painted & grow(target)).sum() >= 0.95 * painted.sum(), task.phrase
            core = ~grow(~target)
            if core.sum() >= 30:  # slivers at the crop's edge have no interior to judge
                assert (painted & core).sum() >= 0.8 * core.sum(), task.phrase
            overlaps.append(iou(target, painted))
        if name == "triangle" and mask.sum() >= 40:
            cols = np.flatnonzero(mask.any(0))
            mid = (cols[0] + cols[-1] + 1) / 2
            left, right = mask[:, : int(mid)].sum(), mask[:, int(np.ceil(mid)) :].sum()
            assert left > right, "triangle flipped"
    assert np.mean(overlaps) >= 0.75


def test_train_phrases_per_image_share_one_crop(tmp_path: Path) -> None:
    """With phrases_per_image = k, up to k tasks of an image share one crop that keeps ≥ 5% of their union,
    the batch stores that crop once (``image_index`` maps tasks to it), and every task's mask is its own
    target in that crop. With the default k = 1 every task has its own image slot."""
    records = write_shards(tmp_path, [6, 6], width=96, height=72, negatives=True)
    expected = all_tasks(records)
    stream, _ = make_train_loader(
        DataConfig(train_shards=str(tmp_path), negative_rate=0.25, phrases_per_image=2, num_workers=0),
        batch_size=8,
        image_size=48,
        tokenizer=fake_tokenize,
        steps_per_epoch=10,
        return_dataset=True,
    )
    images = tasks = 0
    for batch in stream:
        index = batch["image_index"]
        assert index.shape == (8,) and batch["masks"].shape == (8, 1, 48, 48)
        n = batch["pixel_values"].shape[0]
        assert sorted(set(index.tolist())) == list(range(n))  # every stored crop is used
        images, tasks = images + n, tasks + 8
        for slot in range(n):
            members = (index == slot).nonzero().flatten().tolist()
            assert 1 <= len(members) <= 2
            assert len({batch["key"][i] for i in members}) == 1
            assert len({tuple(batch["crop_box"][i].tolist()) for i in members}) == 1
            box = [int(v) for v in batch["crop_box"][members[0]]]
            record = expected[batch["task_id"][members[0]]][0]
            targets = [expected[batch["task_id"][i]][1] for i in members if batch["kind"][i] != "negative"]
            if targets:
                union = rasterize_polygons(
                    [p for t in targets for p in t.polygons], record.width, record.height
                )
                assert object_fraction(union, box) >= 0.05
            rgb = unnormalize(batch["pixel_values"][slot])
            for i in members:
                if batch["kind"][i] == "negative":
                    assert batch["masks"][i].sum() == 0
                    continue
                task = expected[batch["task_id"][i]][1]
                mask = batch["masks"][i][0].numpy()
                np.testing.assert_array_equal(mask, target_mask_array(task.polygons, box, 48))
                if mask.sum() >= 20:  # the task's own colour under its mask, in the shared pixels
                    painted = colour_mask(rgb, task.phrase.split()[0]).astype(bool)
                    assert (painted & grow(mask > 0)).sum() >= 0.95 * painted.sum(), task.phrase
    assert images < 0.7 * tasks  # each image holds 3 objects: most crops serve two phrases

    single = next(
        iter(
            make_train_loader(
                DataConfig(train_shards=str(tmp_path), num_workers=0),
                batch_size=8,
                image_size=48,
                tokenizer=fake_tokenize,
                steps_per_epoch=1,
                return_dataset=True,
            )[0]
        )
    )
    assert single["image_index"].tolist() == list(range(8)) and single["pixel_values"].shape[0] == 8
    with pytest.raises(ValueError, match="phrases_per_image"):
        make_train_loader(
            DataConfig(train_shards=str(tmp_path), phrases_per_image=0, num_workers=0),
            batch_size=8,
            image_size=48,
            tokenizer=fake_tokenize,
        )


def test_train_hflip_mirrors_pixels_masks_and_phrases_together(tmp_path: Path) -> None:
    """``hflip``: a flipped crop's pixels, every mask on it and every phrase of it are mirrored together
    (left <-> right in the phrase), phrases sharing a crop share the flip, and the rate holds."""
    records = write_shards(tmp_path, [8, 8], width=96, height=72, sides=True)
    expected = all_tasks(records)
    stream, _ = make_train_loader(
        DataConfig(
            train_shards=str(tmp_path),
            negative_rate=0.0,
            phrases_per_image=2,
            hflip=0.5,
            crop_scale=(1.0, 1.0),
            num_workers=0,
        ),
        batch_size=8,
        image_size=48,
        tokenizer=fake_tokenize,
        steps_per_epoch=24,
        seed=3,
        return_dataset=True,
    )
    flips = []
    for batch in stream:
        index = batch["image_index"]
        for slot in range(batch["pixel_values"].shape[0]):
            members = (index == slot).nonzero().flatten().tolist()
            flipped = {bool(batch["flipped"][i]) for i in members}
            assert len(flipped) == 1  # one crop, one flip
            flips.append(flipped.pop())
            rgb = unnormalize(batch["pixel_values"][slot])
            for i in members:
                task = expected[batch["task_id"][i]][1]
                box = [int(v) for v in batch["crop_box"][i]]
                target = target_mask_array(task.polygons, box, 48)
                mask = batch["masks"][i][0].numpy().astype(np.uint8)
                if flips[-1]:
                    np.testing.assert_array_equal(mask, target[:, ::-1])
                    assert batch["phrase"][i] == mirror_phrase(task.phrase)
                else:
                    np.testing.assert_array_equal(mask, target)
                    assert batch["phrase"][i] == task.phrase
                if mask.sum() >= 20:  # the task's own colour lies under its (mirrored) mask
                    painted = colour_mask(rgb, task.phrase.split()[0]).astype(bool)
                    assert (painted & grow(mask > 0)).sum() >= 0.95 * painted.sum(), batch["phrase"][i]
                name = task.phrase_structure["name"]
                # what the word losses ask the target to be called: attributes and name, not sides
                assert batch["target_words"][i] == f"{task.phrase_structure['attributes'][0]} {name}"
                if name in SIDES and mask.sum() >= 40:  # the phrase still says where the target is
                    cols = np.flatnonzero(mask.any(0))
                    side = "left" if (cols[0] + cols[-1]) / 2 < 24 else "right"
                    assert batch["phrase"][i].endswith(f"on the {side}"), (batch["phrase"][i], side)
    assert 0.3 <= np.mean(flips) <= 0.7, np.mean(flips)
    with pytest.raises(ValueError, match="hflip"):
        make_train_loader(
            DataConfig(train_shards=str(tmp_path), hflip=1.5, num_workers=0),
            batch_size=8,
            image_size=48,
            tokenizer=fake_tokenize,
        )


def test_target_words_name_the_subject_in_the_singular() -> None:
    from pipeline.loader import _target_words

    def words(structure, kind="original"):
        return _target_words(
            Task(task_id="t", phrase="p", polygons=[[]], phrase_structure=structure, kind=kind)
        )

    assert (
        words({"name": "crosses", "attributes": ["small", "Red"], "type": "attribute"}) == "small red cross"
    )
    assert words({"name": "baseball caps", "attributes": [], "relation_descriptions": [["on", "man"]]}) == (
        "baseball cap"
    )
    assert words({"name": "glass", "attributes": ["empty"]}) == "empty glass"
    assert words({"name": "star"}, kind="negative") == "" and words(None) == ""


@pytest.mark.parametrize("shard_negatives", [False, True])
def test_train_negative_rate(tmp_path: Path, shard_negatives: bool) -> None:
    records = write_shards(tmp_path, [10, 10], width=40, height=32, negatives=shard_negatives)
    items = _train_items(tmp_path, 40, image_size=16, negative_rate=0.3, seed=5)
    kinds = Counter(item["kind"] for item in items)
    rate = kinds["negative"] / len(items)
    assert 0.25 <= rate <= 0.35, rate
    names_by_key = {
        k: {t.phrase_structure["name"] for t in r.tasks if t.kind != "negative"} for k, r in records.items()
    }
    for item in items:
        if item["kind"] == "negative":
            assert item["masks"].sum() == 0 and item["target_words"] == ""
            assert item["phrase"].split()[-1] not in names_by_key[item["key"]]
            if shard_negatives:
                assert item["phrase"] == "purple star"
        else:
            assert item["masks"].sum() > 0
    none = _train_items(tmp_path, 5, image_size=16, negative_rate=0.0)
    assert all(item["kind"] != "negative" for item in none)


def test_train_phrase_type_balance(tmp_path: Path) -> None:
    write_shards(tmp_path, [12, 12], width=40, height=32)
    # skew the data: relation/verbose phrases are rare when only every fourth image keeps them
    for path in tmp_path.glob("train-*.tar"):
        samples = list(wds.WebDataset(str(path), shardshuffle=False))
        with wds.TarWriter(str(path)) as sink:
            for k, sample in enumerate(samples):
                record = ImageRecord.from_json(sample["json"])
                if k % 4:
                    record.tasks = [
                        t for t in record.tasks if t.phrase_type in ("name", "attribute")
                    ] or record.tasks[:1]
                sink.write({"__key__": sample["__key__"], "jpg": sample["jpg"], "json": record.to_json()})
    plain = Counter(i["phrase_type"] for i in _train_items(tmp_path, 30, image_size=16, negative_rate=0.0))
    even = Counter(
        i["phrase_type"]
        for i in _train_items(tmp_path, 30, image_size=16, negative_rate=0.0, phrase_type_balance=True)
    )
    spread = lambda c: max(c.values()) / min(c.values())  # noqa: E731
    assert spread(even) < spread(plain) and spread(even) < 1.6, (plain, even)


def test_planted_pickle_is_never_decoded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    records = write_shards(tmp_path, [3, 2], split="val", width=40, height=32, plant=True)
    with tarfile.open(tmp_path / "val-000000.tar") as tar:
        names = tar.getnames()
    assert "x.pickle" in names and any(n.endswith(".pickle") and n != "x.pickle" for n in names)

    def refuse(*args, **kwargs):
        raise AssertionError("a pickle was decoded")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    seen = []
    for batch in make_eval_loader(
        tmp_path, split="val", batch_size=4, image_size=16, tokenizer=fake_tokenize
    ):
        assert not any("pickle" in k for k in batch)
        seen += batch["task_id"]
    assert sorted(seen) == sorted(all_tasks(records))
    trained = _train_items(tmp_path, 2, image_size=16, train_split="val")
    assert len(trained) == 32


def test_list_shards(tmp_path: Path) -> None:
    write_shards(tmp_path, [1, 2], split="val", width=40, height=32)
    urls, sizes = list_shards(tmp_path, "val")
    assert [Path(u).name for u in urls] == ["val-000000.tar", "val-000001.tar"] and sizes[
        "val-000001.tar"
    ] == 2
    (tmp_path / "sizes.json").unlink()
    assert list_shards(tmp_path, "val")[0] == urls
    assert list_shards(str(tmp_path / "val-{000000..000001}.tar"), "val")[0] == urls
    with pytest.raises(FileNotFoundError):
        list_shards(tmp_path, "train")
