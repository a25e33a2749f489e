"""Targets with COCO RLEs (instances stored at the ORIGINAL image size) at every place a target mask is made:
the training crop, the evaluation item and its ground truth at the original size.

The records imitate a capped image (``--max-side``): the stored JPEG is 64×48, the original 128×96, so an RLE
is twice the stored size and the box has to be mapped. The shapes are axis-aligned rectangles placed so that
the RLE and the same rectangle drawn as a PhraseCut polygon give exactly the same mask at the resolutions
used here (nearest sampling of the RLE and PhraseCut's inclusive polygon raster agree on them).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from pipeline.augment import object_fraction, random_object_crop
from pipeline.loader import DataConfig, make_eval_loader, make_train_loader
from pipeline.schema import ImageRecord, Task
from segvlm.masks import decode_rles, encode_rle, rasterize_polygons
from segvlm.preprocess import original_size_mask, region_mask, target_mask_array
from tests.pipeline.test_loader import fake_tokenize, iou

STORED = (64, 48)  # width, height of the stored image
ORIGINAL = (128, 96)  # the original image: RLEs live at this size


def rect_rle(rows: tuple[int, int], cols: tuple[int, int]) -> dict:
    """COCO RLE of the original-size rectangle ``rows[0] ≤ y < rows[1]``, ``cols[0] ≤ x < cols[1]``."""
    mask = np.zeros((ORIGINAL[1], ORIGINAL[0]), np.uint8)
    mask[rows[0] : rows[1], cols[0] : cols[1]] = 1
    return encode_rle(mask)


def rect_polygon(x0: float, y0: float, x1: float, y1: float) -> list[list[float]]:
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]


# original rows 16..47, cols 40..103 = stored rows 8..23, cols 20..51 (PhraseCut fills a polygon inclusively)
RLE_A = rect_rle((16, 48), (40, 104))
POLY_A = [[rect_polygon(20, 8, 51, 23)]]
# original rows 60..91, cols 100..123 = stored rows 30..45, cols 50..61
RLE_B = rect_rle((60, 92), (100, 124))
POLY_B = [[rect_polygon(50, 30, 61, 45)]]
POLY_C = [[rect_polygon(4, 30, 15, 45)]]  # a plain polygon instance (stored pixels)


def original_rect(rows: tuple[int, int], cols: tuple[int, int]) -> np.ndarray:
    mask = np.zeros((ORIGINAL[1], ORIGINAL[0]), np.uint8)
    mask[rows[0] : rows[1], cols[0] : cols[1]] = 1
    return mask


# POLY_C at the original size: x 4..15 and y 30..45 scaled by 2, filled inclusively: cols 8..30, rows 60..90
GT_C = original_rect((60, 91), (8, 31))
GROUND_TRUTH = {  # per task kind, at the original size, by hand
    "rle": original_rect((16, 48), (40, 104)),
    "mixed": GT_C | original_rect((60, 92), (100, 124)),
    "poly": GT_C,
    "none": np.zeros((ORIGINAL[1], ORIGINAL[0]), np.uint8),
}


# the targets as half-open rectangles (x0, y0, x1, y1) of stored pixels
STORED_RECTS = {
    "rle": [(20, 8, 52, 24)],
    "mixed": [(4, 30, 16, 46), (50, 30, 62, 46)],
    "poly": [(4, 30, 16, 46)],
}


def in_rects(xs: np.ndarray, ys: np.ndarray, rects: list[tuple], margin: float) -> np.ndarray:
    """H×W: whether the point (xs[j], ys[i]) lies in a rectangle grown by ``margin`` (shrunk if < 0)."""
    out = np.zeros((len(ys), len(xs)), bool)
    for x0, y0, x1, y1 in rects:
        cols = (xs >= x0 - margin) & (xs < x1 + margin)
        rows = (ys >= y0 - margin) & (ys < y1 + margin)
        out |= rows[:, None] & cols[None, :]
    return out


def rle_record(image_id: int, negative: bool = False) -> tuple[ImageRecord, bytes, dict[str, list]]:
    """One capped image with four tasks: RLE only, polygon + RLE, polygon only, no target (a gRefCOCO
    no-target expression), and with ``negative`` a synthetic negative prompt. Returns the record, its JPEG
    and, per task, the same target as polygons."""
    tasks = [
        Task(task_id=f"{image_id}__rle", phrase="the wide box", polygons=[], rles=[RLE_A]),
        Task(task_id=f"{image_id}__mixed", phrase="the two boxes", polygons=POLY_C, rles=[RLE_B]),
        Task(task_id=f"{image_id}__poly", phrase="the left box", polygons=POLY_C),
        Task(task_id=f"{image_id}__none", phrase="the purple star", polygons=[]),
    ]
    as_polygons = {
        f"{image_id}__rle": POLY_A,
        f"{image_id}__mixed": POLY_C + POLY_B,
        f"{image_id}__poly": POLY_C,
        f"{image_id}__none": [],
    }
    if negative:
        tasks.append(Task(task_id=f"{image_id}__neg", phrase="the red moon", polygons=[], kind="negative"))
        as_polygons[f"{image_id}__neg"] = []
    buffer = io.BytesIO()
    Image.new("RGB", STORED, (90 + image_id, 120, 140)).save(buffer, format="JPEG", quality=95)
    record = ImageRecord(
        source="grefcoco",
        image_id=image_id,
        split="val",
        width=STORED[0],
        height=STORED[1],
        orig_width=ORIGINAL[0],
        orig_height=ORIGINAL[1],
        tasks=tasks,
    )
    return record, buffer.getvalue(), as_polygons


def write_rle_shards(
    folder: Path, n_images: int, split: str = "val", negative: bool = False
) -> tuple[dict, dict]:
    """One shard of ``n_images`` RLE records; returns ``({task_id: task}, {task_id: target as polygons})``."""
    folder.mkdir(parents=True, exist_ok=True)
    tasks, polygons = {}, {}
    with wds.TarWriter(str(folder / f"{split}-000000.tar")) as sink:
        for image_id in range(n_images):
            record, jpg, as_polygons = rle_record(image_id, negative)
            sink.write({"__key__": record.key, "jpg": jpg, "json": record.to_json()})
            tasks |= {t.task_id: t for t in record.tasks}
            polygons |= as_polygons
    (folder / "sizes.json").write_text(json.dumps({f"{split}-000000.tar": n_images}))
    return tasks, polygons


# ------------------------------------------------------------------------------------------ the masks
def test_rle_target_equals_the_same_shape_as_a_polygon_at_crop_and_eval_resolution() -> None:
    stored = {"stored_size": STORED, "original_size": ORIGINAL}
    for box, size in [((16, 0, 64, 48), 24), ((0, 0, 64, 48), 32), ((16, 0, 64, 48), 48)]:
        rle_only = target_mask_array([], box, size, rles=[RLE_A], **stored)
        np.testing.assert_array_equal(rle_only, target_mask_array(POLY_A, box, size))
        assert rle_only.sum() > 0
        mixed = target_mask_array(POLY_C, box, size, rles=[RLE_B], **stored)
        np.testing.assert_array_equal(mixed, target_mask_array(POLY_C + POLY_B, box, size))
        assert (mixed & ~target_mask_array(POLY_C, box, size)).any(), "the RLE part is missing"
    # hand-computed: the crop (16, 0)-(64, 48) at 24² halves the stored pixels; RLE_A covers stored
    # rows 8..23 and cols 20..51, i.e. output rows 4..11 and cols (20-16)/2 = 2 .. (51-16)/2 = 17
    expected = np.zeros((24, 24), np.uint8)
    expected[4:12, 2:18] = 1
    np.testing.assert_array_equal(
        target_mask_array([], (16, 0, 64, 48), 24, rles=[RLE_A], **stored), expected
    )


def test_polygons_only_targets_are_bit_identical_to_the_polygon_raster() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        polygons = [[[[float(x), float(y)] for x, y in rng.uniform(0, [64, 48], (6, 2))]]]
        x0, y0 = rng.integers(0, 16, 2)
        side = int(rng.integers(16, 48 - y0))
        box = (int(x0), int(y0), int(x0) + side, int(y0) + side)
        size = int(rng.integers(8, 64))
        direct = rasterize_polygons(
            polygons, size, size, scale_x=size / side, scale_y=size / side, offset_x=x0, offset_y=y0
        )
        assert np.array_equal(target_mask_array(polygons, box, size), direct)
        assert np.array_equal(
            target_mask_array(polygons, box, size, rles=[], stored_size=STORED, original_size=ORIGINAL),
            direct,
        )


def test_rle_crops_stay_aligned_with_the_polygon_they_encode() -> None:
    """Irregular shapes, random crops: an RLE (made at the original size from a polygon) cropped through the
    box map equals that polygon rasterised at the crop, up to the 1-px edge conventions: IoU ≥ 0.85 each,
    no shift (centroids within 0.6 px)."""
    rng = np.random.default_rng(1)
    for _ in range(25):
        centre = rng.uniform([40, 30], [88, 66])
        angles = np.sort(rng.uniform(0, 2 * np.pi, 7))
        radius = rng.uniform(12, 28, 7)
        original = [
            [float(centre[0] + r * np.cos(a)), float(centre[1] + r * np.sin(a))]
            for a, r in zip(angles, radius)
        ]
        rle = encode_rle(rasterize_polygons([[original]], *ORIGINAL))
        stored_polygon = [[[[x / 2, y / 2] for x, y in original]]]
        stored_mask = rasterize_polygons(stored_polygon, *STORED)
        box = random_object_crop(*STORED, stored_mask, rng=rng, scale=(0.5, 1.0))
        size = 96
        from_rle = target_mask_array(
            [], box, size, rles=[rle], stored_size=STORED, original_size=ORIGINAL
        ).astype(bool)
        from_polygon = target_mask_array(stored_polygon, box, size).astype(bool)
        if from_polygon.sum() < 100:
            continue
        assert iou(from_rle, from_polygon) >= 0.85
        (ry, rx), (py, px) = (np.argwhere(m).mean(0) for m in (from_rle, from_polygon))
        assert abs(ry - py) < 0.6 * size / 48 and abs(rx - px) < 0.6 * size / 48


def test_rle_targets_need_the_stored_size_and_a_matching_original_size() -> None:
    with pytest.raises(ValueError, match="stored_size"):
        target_mask_array([], (0, 0, 64, 48), 16, rles=[RLE_A])
    small = encode_rle(np.ones((10, 10), np.uint8))
    with pytest.raises(ValueError, match="10x10"):
        target_mask_array(
            [], (0, 0, 64, 48), 16, rles=[RLE_A, small], stored_size=STORED, original_size=ORIGINAL
        )
    with pytest.raises(ValueError, match="96x128"):
        original_size_mask([], 64, 48, 64, 48, rles=[RLE_A])  # the record says the original is 64×48
    with pytest.raises(ValueError, match="96x128"):
        target_mask_array([], (0, 0, 64, 48), 16, rles=[RLE_A], stored_size=STORED, original_size=STORED)


def test_an_rle_that_does_not_fit_its_record_is_named_in_the_error(tmp_path: Path) -> None:
    """Evaluation stops on it (a skipped task would change the metric) with the shard, sample, task and
    reason; training skips that image and goes on."""
    record, jpg, _ = rle_record(0)
    record.tasks[0].rles = [encode_rle(np.ones((48, 64), np.uint8))]  # the stored size, not the original
    good, good_jpg, _ = rle_record(1)
    with wds.TarWriter(str(tmp_path / "train-000000.tar")) as sink:
        for r, j in ((record, jpg), (good, good_jpg)):
            sink.write({"__key__": r.key, "jpg": j, "json": r.to_json()})
    loader = make_eval_loader(tmp_path, split="train", batch_size=4, image_size=16, tokenizer=fake_tokenize)
    with pytest.raises(ValueError, match=r"grefcoco_0.*train-000000\.tar.*task '0__rle'.*48x64"):
        list(loader)
    data = DataConfig(train_shards=str(tmp_path), num_workers=0, negative_rate=0.0, shuffle_buffer=1)
    stream, _ = make_train_loader(
        data,
        batch_size=4,
        image_size=16,
        tokenizer=fake_tokenize,
        seed=0,
        steps_per_epoch=3,
        return_dataset=True,
    )
    keys = {key for batch in stream for key in batch["key"]}
    assert keys == {good.key}


def test_ground_truth_at_the_original_size_is_polygons_union_rles() -> None:
    gt = original_size_mask(POLY_C, *STORED, *ORIGINAL, rles=[RLE_B])
    # POLY_C: 23 cols × 31 rows at the original size; RLE_B: 24 cols × 32 rows, apart from it
    assert gt.shape == (96, 128) and int(gt.sum()) == 23 * 31 + 24 * 32
    np.testing.assert_array_equal(gt, GROUND_TRUTH["mixed"])
    whole = region_mask([], (0, 0, 64, 48), 128, 96, rles=[RLE_A], stored_size=STORED, original_size=ORIGINAL)
    np.testing.assert_array_equal(
        whole, decode_rles([RLE_A], 96, 128)
    )  # at the original size: the RLE itself


# ------------------------------------------------------------------------------------------ the loaders
def test_eval_items_carry_rles_and_their_targets(tmp_path: Path) -> None:
    tasks, polygons = write_rle_shards(tmp_path, 3)
    size = 32
    seen = set()
    for batch in make_eval_loader(
        tmp_path, split="val", batch_size=5, image_size=size, tokenizer=fake_tokenize
    ):
        for i, task_id in enumerate(batch["task_id"]):
            task = tasks[task_id]
            seen.add(task_id)
            assert batch["rles"][i] == task.rles
            assert int(batch["num_instances"][i]) == len(task.polygons) + len(task.rles)
            expected = target_mask_array(polygons[task_id], (0, 0, *STORED), size)
            np.testing.assert_array_equal(batch["masks"][i, 0].numpy(), expected)
            assert (batch["masks"][i].sum() > 0) == task.has_target
            # the ground truth at the original size, from what the batch carries
            ow, oh = int(batch["orig_width"][i]), int(batch["orig_height"][i])
            gt = original_size_mask(batch["polygons"][i], ow, oh, ow, oh, rles=batch["rles"][i])
            np.testing.assert_array_equal(gt, GROUND_TRUTH[task_id.split("__")[1]])
    assert seen == set(tasks)


def test_train_crops_of_rle_targets(tmp_path: Path) -> None:
    """Training items of RLE-only and mixed tasks: the crop keeps its share of the target (the RLE counts),
    and the mask is the target cropped (checked against the target's rectangles)."""
    tasks, polygons = write_rle_shards(tmp_path, 6, split="train")
    # small crops that must keep 30% of the target: a crop box chosen without the RLEs would often fail it
    data = DataConfig(
        train_shards=str(tmp_path),
        num_workers=0,
        negative_rate=0.0,
        crop_scale=(0.4, 0.5),
        min_object_fraction=0.3,
    )
    stream, _ = make_train_loader(
        data,
        batch_size=8,
        image_size=48,
        tokenizer=fake_tokenize,
        seed=3,
        steps_per_epoch=12,
        return_dataset=True,
    )
    counted = {"rle": 0, "mixed": 0}
    for batch in stream:
        for i, task_id in enumerate(batch["task_id"]):
            task, kind = tasks[task_id], task_id.split("__")[1]
            box = [int(v) for v in batch["crop_box"][i]]
            mask = batch["masks"][i, 0].numpy().astype(np.uint8)
            expected = target_mask_array(
                task.polygons, box, 48, rles=task.rles, stored_size=STORED, original_size=ORIGINAL
            )
            np.testing.assert_array_equal(mask, expected)
            if kind == "none":
                assert mask.sum() == 0
                continue
            full = rasterize_polygons(polygons[task_id], *STORED)
            assert object_fraction(full, box) >= 0.3, task_id
            # independent of the code under test: where an output pixel's centre lies, in stored pixels,
            # against the target's rectangles; 1 px of tolerance at their edges
            side = box[2] - box[0]
            centres = box[0] + (np.arange(48) + 0.5) * side / 48, box[1] + (np.arange(48) + 0.5) * side / 48
            inside, near = (in_rects(*centres, STORED_RECTS[kind], margin) for margin in (-1, 1))
            assert mask[inside].all() and not mask[~near].any(), task_id
            counted[kind] = counted.get(kind, 0) + 1
    assert counted["rle"] >= 5 and counted["mixed"] >= 5, counted
