"""Mask I/O of the benchmarks: RLE codec, PNG masks, annotation variants, label PNGs."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from training.eval.masks import (
    DataError, decode_instances, read_png_mask, read_rgb, rle_decode, rle_encode, write_label_png,
)


@pytest.mark.parametrize("shape", [(1, 1), (7, 5), (40, 33)])
@pytest.mark.parametrize("fill", ["empty", "full", "random", "first_pixel"])
def test_rle_round_trips(shape, fill):
    rng = np.random.default_rng(0)
    m = {"empty": np.zeros(shape, bool), "full": np.ones(shape, bool),
         "random": rng.random(shape) > 0.5, "first_pixel": np.eye(*shape, dtype=bool)}[fill]
    np.testing.assert_array_equal(rle_decode(rle_encode(m)), m)


def test_rle_matches_pycocotools_both_ways():
    mu = pytest.importorskip("pycocotools.mask")
    rng = np.random.default_rng(1)
    for _ in range(20):
        m = rng.random((rng.integers(1, 60), rng.integers(1, 60))) > rng.random()
        ref = mu.encode(np.asfortranarray(m.astype(np.uint8)))
        assert rle_encode(m)["counts"] == ref["counts"].decode()
        np.testing.assert_array_equal(rle_decode({"size": ref["size"], "counts": ref["counts"].decode()}), m)


def test_uncompressed_rle_is_read():
    # 2x3, column-major: [0 0 | 1 1 | 0 1] -> runs 2 zeros, 2 ones, 1 zero, 1 one
    m = rle_decode({"size": [2, 3], "counts": [2, 2, 1, 1]})
    np.testing.assert_array_equal(m, [[False, True, False], [False, True, True]])


def test_bad_rle_is_a_data_error():
    with pytest.raises(DataError, match="expected H\\*W"):
        rle_decode({"size": [2, 2], "counts": [1, 1]})
    with pytest.raises(DataError, match="not a COCO RLE"):
        rle_decode({"counts": "abc"})


def test_annotation_variants_decode_to_instances():
    a = np.zeros((6, 8), bool)
    a[1:3, 1:4] = True
    b = np.zeros((6, 8), bool)
    b[4:6, 5:8] = True
    assert decode_instances(None) == []
    assert decode_instances([]) == []
    (one,) = decode_instances(rle_encode(a), 6, 8)
    np.testing.assert_array_equal(one, a)
    two = decode_instances([rle_encode(a), rle_encode(b)], 6, 8)
    assert len(two) == 2 and (two[1] == b).all()
    with pytest.raises(DataError, match="GT mask is 6x8 but the image is 5x8"):
        decode_instances(rle_encode(a), 5, 8)
    with pytest.raises(DataError, match="unrecognised"):
        decode_instances("mask.png")


def test_polygons_decode_with_pycocotools():
    pytest.importorskip("pycocotools")
    # one instance made of one square polygon, and a list of two single-polygon instances
    square = [1.0, 1.0, 5.0, 1.0, 5.0, 5.0, 1.0, 5.0]
    (m,) = decode_instances([square], 10, 10)
    assert m.dtype == bool and m[3, 3] and not m[8, 8]
    assert len(decode_instances([[square], [[6.0, 6.0, 9.0, 6.0, 9.0, 9.0]]], 10, 10)) == 2


def test_png_mask_any_channel_is_foreground(tmp_path):
    arr = np.zeros((4, 5, 3), np.uint8)
    arr[0, 0, 2] = 1  # blue only
    arr[1, 1, 0] = 200
    Image.fromarray(arr).save(tmp_path / "m.png")
    m, ign = read_png_mask(tmp_path / "m.png")
    assert ign is None and m.sum() == 2 and m[0, 0] and m[1, 1]


def test_png_mask_255_can_be_ignored(tmp_path):
    arr = np.array([[0, 1, 255]], np.uint8)
    Image.fromarray(arr).save(tmp_path / "m.png")
    m, ign = read_png_mask(tmp_path / "m.png", ignore_value=255)
    np.testing.assert_array_equal(m, [[False, True, False]])
    np.testing.assert_array_equal(ign, [[False, False, True]])


def test_missing_and_unreadable_files_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="GT mask not found"):
        read_png_mask(tmp_path / "nope.png")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="unreadable mask image"):
        read_png_mask(tmp_path / "bad.png")
    with pytest.raises(DataError, match="image not found"):
        read_rgb(tmp_path / "nope.png")


def test_label_png_keeps_each_instance_and_earlier_wins_overlaps(tmp_path):
    masks = np.zeros((3, 4, 4), bool)
    masks[0, :2, :2] = True
    masks[1, 1:3, 1:3] = True  # overlaps instance 0 at (1, 1)
    masks[2, 3, 3] = True
    write_label_png(tmp_path / "l.png", masks)
    label = np.asarray(Image.open(tmp_path / "l.png"))
    assert label.dtype == np.uint8
    assert label[1, 1] == 1 and label[2, 2] == 2 and label[3, 3] == 3 and label[3, 0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l.png"]  # no temporary left


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_png_mask_alpha_band_is_not_foreground(tmp_path, mode):
    fg = np.zeros((6, 8), bool)
    fg[1:3, 2:5] = True
    bands = 4 if mode == "RGBA" else 2
    arr = np.zeros((6, 8, bands), np.uint8)
    arr[..., -1] = 255               # opaque everywhere, background included
    arr[fg, :-1] = 255               # white object
    path = tmp_path / "m.png"
    Image.fromarray(arr, mode).save(path)
    assert Image.open(path).mode == mode
    mask, ignore = read_png_mask(path)
    np.testing.assert_array_equal(mask, fg)
    assert int(mask.sum()) == 6 and ignore is None
    # transparent object pixels with a colour still count (alpha plays no part)
    arr[..., -1] = 0
    Image.fromarray(arr, mode).save(path)
    np.testing.assert_array_equal(read_png_mask(path)[0], fg)


def test_png_mask_255_is_ignore_only_in_the_0_1_255_layout(tmp_path):
    lisa = np.zeros((5, 5), np.uint8)
    lisa[0, :] = 1      # foreground
    lisa[4, :] = 255    # ignored
    Image.fromarray(lisa).save(tmp_path / "lisa.png")
    mask, ignore = read_png_mask(tmp_path / "lisa.png", ignore_value=255)
    np.testing.assert_array_equal(mask, lisa == 1)
    np.testing.assert_array_equal(ignore, lisa == 255)

    binary = np.zeros((5, 5), np.uint8)
    binary[1:3, 1:4] = 255  # a plain 0/255 mask: 255 is the object
    Image.fromarray(binary).save(tmp_path / "binary.png")
    mask, ignore = read_png_mask(tmp_path / "binary.png", ignore_value=255)
    np.testing.assert_array_equal(mask, binary == 255)
    assert int(mask.sum()) == 6
    assert ignore is not None and not ignore.any()
