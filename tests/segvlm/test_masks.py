"""COCO RLE masks: round trips through pycocotools and the size check that keeps a mask from shifting."""

import numpy as np
import pytest

from segvlm.masks import decode_rles, encode_rle


def test_rle_round_trip_and_union():
    a = np.zeros((6, 9), np.uint8)
    a[1:3, 2:6] = 1
    b = np.zeros((6, 9), np.uint8)
    b[4:6, 0:2] = 1
    rles = [encode_rle(a), encode_rle(b)]
    assert all(isinstance(r["counts"], str) and r["size"] == [6, 9] for r in rles)
    assert np.array_equal(decode_rles(rles[:1], 6, 9), a)
    assert np.array_equal(decode_rles(rles, 6, 9), a | b)
    assert decode_rles([], 6, 9).sum() == 0


def test_rle_of_another_size_is_refused():
    rle = encode_rle(np.ones((4, 4), np.uint8))
    with pytest.raises(ValueError, match="4x4"):
        decode_rles([rle], 5, 4)
