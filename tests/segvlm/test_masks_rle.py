"""COCO compressed RLEs are checked before pycocotools decodes them: its decoder trusts the counts and
writes outside its buffer when they do not add up to height × width."""

from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as coco_mask

from segvlm.masks import decode_rles, encode_rle, rle_area, rle_counts, rle_error


def _runs(mask: np.ndarray) -> list[int]:
    """Column-major runs starting with zeros, computed directly from the pixels."""
    flat = mask.reshape(-1, order="F")
    edges = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], edges, [flat.size]])
    runs = np.diff(bounds).tolist()
    return ([0] if flat[0] else []) + runs


def test_counts_parse_exactly_as_pycocotools_encodes_them():
    rng = np.random.default_rng(0)
    shapes = [(1, 1), (3, 7), (40, 30), (480, 640)]
    for (h, w), density in zip(shapes * 3, [0.0, 0.5, 0.02, 1.0] * 3, strict=True):
        mask = (rng.random((h, w)) < density).astype(np.uint8)
        mask[h // 3 :, : w // 2] = 1  # long runs: multi-character values and negative differences
        rle = encode_rle(mask)
        assert rle_counts(rle["counts"]) == _runs(mask)
        assert rle_error(rle, h, w) is None
        assert (
            rle_area(rle) == int(mask.sum()) == int(coco_mask.area({**rle, "counts": rle["counts"].encode()}))
        )
        assert np.array_equal(decode_rles([rle], h, w), mask)


@pytest.mark.parametrize(
    ("counts", "why"),
    [
        ("7", "cover 7 pixels"),  # pycocotools "decodes" this into garbage memory
        ("", "cover 0 pixels"),
        ("\x00abc", "outside '0'..'o'"),
        ("p0", "outside '0'..'o'"),
        ("o", "end inside a value"),  # the last character says another one follows
        ("ooooooo0", "longer than 6 characters"),
        ("O", "negative"),  # -1
        ("000O", "negative"),  # a difference below the run two before
    ],
)
def test_hostile_counts_are_refused_before_decoding(counts, why):
    rle = {"size": [7, 9], "counts": counts}
    assert why in rle_error(rle, 7, 9)
    with pytest.raises(ValueError, match="RLE"):
        decode_rles([rle], 7, 9)


def test_shape_and_type_errors():
    good = encode_rle(np.ones((7, 9), np.uint8))
    assert rle_error(good, 7, 9) is None
    assert "its image 9x7" in rle_error(good, 9, 7)
    assert "not [height, width]" in rle_error({**good, "size": [7.0, 9]}, 7, 9)
    assert "not a compressed string" in rle_error({**good, "counts": [63]}, 7, 9)
    assert "not an object" in rle_error([good], 7, 9)


def test_an_rle_target_in_a_box_that_reaches_past_the_image_is_background_outside_it():
    from segvlm.preprocess import region_mask

    # a 10 × 8 image (w × h) whose RLE covers everything; the box (-5, -5)–(15, 15) at 20 × 20 output
    # pixels: output pixel (i, j) samples original pixel (floor(-5 + i + 0.5), floor(-5 + j + 0.5))
    rle = encode_rle(np.ones((8, 10), np.uint8))
    got = region_mask(
        [], (-5.0, -5.0, 15.0, 15.0), 20, 20, rles=[rle], stored_size=(10, 8), original_size=(10, 8)
    )
    want = np.zeros((20, 20), np.uint8)
    want[5:13, 5:15] = 1  # rows -> y in 0..7, columns -> x in 0..9
    assert np.array_equal(got, want)
    # a stored image at half the original size: the same box in stored pixels maps through the scale
    got = region_mask([], (0.0, 0.0, 5.0, 4.0), 10, 8, rles=[rle], stored_size=(5, 4), original_size=(10, 8))
    assert np.array_equal(got, np.ones((8, 10), np.uint8))
