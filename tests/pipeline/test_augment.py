"""Training augmentation (pipeline/augment.py): random square crops that keep part of the target."""

from __future__ import annotations

import numpy as np

from pipeline.augment import object_fraction, random_object_crop


def test_object_fraction_by_hand() -> None:
    mask = np.zeros((10, 10), np.uint8)
    mask[0:2, 0:5] = 1  # 10 object pixels
    assert object_fraction(mask, (0, 0, 3, 3)) == 6 / 10
    assert object_fraction(mask, (5, 5, 10, 10)) == 0.0
    assert object_fraction(np.zeros((4, 4), np.uint8), (0, 0, 1, 1)) == 1.0  # empty target: anything goes


def test_random_object_crop_keeps_five_percent() -> None:
    """Definition: ``object_fraction(full-resolution mask, box) >= 0.05`` for every crop, including tiny
    objects in a corner and on wide images, and boxes are square and inside the image."""
    rng = np.random.default_rng(0)
    for trial in range(300):
        w, h = int(rng.integers(20, 200)), int(rng.integers(20, 200))
        mask = np.zeros((h, w), np.uint8)
        ow, oh = (
            int(rng.integers(1, max(2, w // (1 + trial % 8)))),
            int(rng.integers(1, max(2, h // (1 + trial % 8)))),
        )
        x, y = int(rng.integers(0, w - ow + 1)), int(rng.integers(0, h - oh + 1))
        mask[y : y + oh, x : x + ow] = 1
        box = random_object_crop(w, h, mask, rng=rng, scale=(0.2, 0.6))
        x0, y0, x1, y1 = box
        assert x1 - x0 == y1 - y0 >= 1 and 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        assert object_fraction(mask, box) >= 0.05, (trial, box)
        bbox_box = random_object_crop(w, h, (x, y, x + ow, y + oh), rng=rng, scale=(0.2, 0.6))
        assert object_fraction(mask, bbox_box) >= 0.05
    # empty targets: any square crop
    box = random_object_crop(50, 30, None, rng=rng)
    assert box[2] - box[0] == box[3] - box[1] <= 30
