"""Image/depth decoding, label image, mask crops and overlay: the node's numpy paths."""

from __future__ import annotations

import io

import numpy as np
import pytest

from instructsam_ros.conversions import (ImageError, compressed_to_rgb, crop_mask,
                                         depth_to_metres, image_to_rgb,
                                         numpy_to_image)


def _rgb(h=5, w=7, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _msg(arr: np.ndarray, encoding: str, pad: int = 0, big: bool = False):
    """A sensor_msgs/Image with `pad` bytes of row padding and the given byte order."""
    from sensor_msgs.msg import Image

    a = arr.reshape(arr.shape[0], arr.shape[1], -1)
    if big:
        a = a.astype(a.dtype.newbyteorder(">"))
    rows = a.reshape(a.shape[0], -1).view(np.uint8)
    rows = np.concatenate([rows, np.full((rows.shape[0], pad), 0xAB, np.uint8)], axis=1)
    m = Image()
    m.height, m.width, m.encoding = arr.shape[0], arr.shape[1], encoding
    m.is_bigendian = int(big)
    m.step = rows.shape[1]
    m.data = rows.tobytes()
    return m


@pytest.mark.parametrize("pad", [0, 3])
@pytest.mark.parametrize("encoding", ["rgb8", "bgr8", "rgba8", "bgra8"])
def test_colour_encodings_decode_to_rgb(encoding, pad):
    rgb = _rgb()
    alpha = np.full(rgb.shape[:2] + (1,), 200, np.uint8)
    src = {"rgb8": rgb, "bgr8": rgb[:, :, ::-1], "rgba8": np.concatenate([rgb, alpha], 2),
           "bgra8": np.concatenate([rgb[:, :, ::-1], alpha], 2)}[encoding]
    out = image_to_rgb(_msg(np.ascontiguousarray(src), encoding, pad=pad))
    assert out.dtype == np.uint8 and out.shape == rgb.shape
    np.testing.assert_array_equal(out, rgb)


@pytest.mark.parametrize("pad", [0, 2])
def test_mono8_is_replicated_to_three_channels(pad):
    g = _rgb()[:, :, 0]
    out = image_to_rgb(_msg(g, "mono8", pad=pad))
    np.testing.assert_array_equal(out, np.stack([g, g, g], 2))


@pytest.mark.parametrize("big", [False, True])
def test_mono16_scales_full_range_in_either_byte_order(big):
    g = np.array([[0, 257, 65535], [128, 32896, 1000]], np.uint16)
    out = image_to_rgb(_msg(g, "mono16", pad=2, big=big))
    expected = ((g.astype(np.uint32) + 128) // 257).astype(np.uint8)
    np.testing.assert_array_equal(out[:, :, 0], expected)
    assert out[0, 2, 1] == 255 and out[0, 1, 2] == 1


def test_unknown_encoding_is_named():
    with pytest.raises(ImageError, match="unsupported colour encoding 'yuv422'"):
        image_to_rgb(_msg(_rgb(), "yuv422"))


def test_step_smaller_than_row_is_rejected():
    m = _msg(_rgb(), "rgb8")
    m.step = 7 * 3 - 1
    with pytest.raises(ImageError, match="step 20 is smaller than width"):
        image_to_rgb(m)


def test_truncated_data_is_rejected():
    m = _msg(_rgb(), "rgb8", pad=4)
    m.data = bytes(m.data)[:-5]
    with pytest.raises(ImageError, match="truncated colour image"):
        image_to_rgb(m)


def test_zero_size_is_rejected():
    m = _msg(_rgb(), "rgb8")
    m.width = 0
    with pytest.raises(ImageError, match="zero-size"):
        image_to_rgb(m)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_compressed_png_and_jpeg_decode(fmt):
    from PIL import Image
    from sensor_msgs.msg import CompressedImage

    rgb = np.zeros((32, 48, 3), np.uint8)
    rgb[8:24, 10:30] = (200, 40, 20)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format=fmt, quality=95)
    out = compressed_to_rgb(CompressedImage(format=fmt.lower(), data=buf.getvalue()))
    assert out.shape == rgb.shape
    tol = 0 if fmt == "PNG" else 12  # JPEG is lossy
    assert np.abs(out.astype(int) - rgb.astype(int)).max() <= (tol if fmt == "PNG" else 255)
    assert np.abs(out[16, 20].astype(int) - (200, 40, 20)).max() <= tol


def test_compressed_jpeg_is_decoded_as_stored_whatever_its_exif_orientation():
    from sensor_msgs.msg import CompressedImage

    from instructsam_core.testing import sideways_jpeg_with_exif

    rgb = np.zeros((32, 48, 3), np.uint8)
    rgb[4:12, 6:30] = (200, 40, 20)
    data, upright = sideways_jpeg_with_exif(rgb)
    out = compressed_to_rgb(CompressedImage(format="jpeg", data=data))
    # camera pixels stay in the camera's frame (aligned with depth and camera_info)
    np.testing.assert_array_equal(out, np.rot90(upright, k=1))
    assert out.shape == (48, 32, 3)


@pytest.mark.parametrize("data", [b"", b"\x89PNG\r\n\x1a\n garbage", b"\xff\xd8\xff\xe0 not a jpeg",
                                  b"GIF89a......"])
def test_malformed_compressed_is_rejected(data):
    from sensor_msgs.msg import CompressedImage

    with pytest.raises(ImageError, match="compressed image"):
        compressed_to_rgb(CompressedImage(format="jpeg", data=data))


def test_depth_16uc1_millimetres_and_32fc1_metres_with_invalid_pixels():
    mm = np.array([[0, 1000], [2500, 65535]], np.uint16)
    d = depth_to_metres(_msg(mm, "16UC1", pad=2))
    assert np.isnan(d[0, 0])
    np.testing.assert_allclose(d[~np.isnan(d)], [1.0, 2.5, 65.535], rtol=1e-6)
    m = np.array([[np.nan, 0.5], [0.0, np.inf]], np.float32)
    d = depth_to_metres(_msg(m, "32FC1", big=True))
    assert d[0, 1] == np.float32(0.5)
    assert np.isnan(d[0, 0]) and np.isnan(d[1, 0]) and np.isnan(d[1, 1])


def test_depth_rejects_colour_encoding():
    with pytest.raises(ImageError, match="unsupported depth encoding 'rgb8'"):
        depth_to_metres(_msg(_rgb(), "rgb8"))


def test_numpy_to_image_round_trips_through_the_decoder():
    rgb = _rgb(9, 11)
    np.testing.assert_array_equal(image_to_rgb(numpy_to_image(rgb, "rgb8")), rgb)
    m = numpy_to_image(np.arange(12, dtype=np.uint16).reshape(3, 4), "mono16")
    assert (m.height, m.width, m.step, m.encoding) == (3, 4, 8, "mono16")


def test_crop_mask_uses_inclusive_box():
    mask = np.zeros((10, 10), bool)
    mask[2:5, 3:8] = True
    crop = crop_mask(mask, np.array([3, 2, 7, 4]))
    assert crop.shape == (3, 5) and crop.dtype == np.uint8 and (crop == 255).all()


def test_overlay_is_bgr_same_size_and_colours_masks():
    from instructsam_core.result import Result
    from instructsam_ros.overlay import PALETTE, overlay_bgr

    rgb = np.zeros((120, 160, 3), np.uint8)
    masks = np.zeros((1, 120, 160), bool)
    masks[0, 60:100, 40:120] = True
    result = Result(masks=masks, scores=np.array([0.9], np.float32), boxes=np.array([[40, 60, 119, 99]]),
                    phrases=["mug"], phrase_indices=np.zeros(1, np.int64), slots=np.zeros(1, np.int64),
                    image_size=(120, 160))
    out = overlay_bgr(rgb, result, "the mug")
    assert out.shape == rgb.shape and out.dtype == np.uint8
    r, g, b = (int(c) for c in PALETTE[0])
    assert tuple(out[80, 80]) == (b // 2, g // 2, r // 2)  # BGR, alpha 0.5 over black
    assert (out[:20] > 200).all(axis=2).any()  # white banner text (the instruction)
    assert not out[110:, :30].any()  # background stays untouched


def test_numpy_to_image_sets_data_as_a_uint8_array(monkeypatch):
    """array.array('B') is the form the generated setters take without checking every
    byte in Python (bytes are checked element by element on Humble)."""
    import array

    import sensor_msgs.msg

    class Recorder:  # the real Image converts whatever it is given: record the raw value
        header = None

    monkeypatch.setattr(sensor_msgs.msg, "Image", Recorder)
    rgb = _rgb(4, 6)
    msg = numpy_to_image(rgb[:, ::-1], "rgb8")  # non-contiguous input is fine too
    assert type(msg.data) is array.array and msg.data.typecode == "B"
    assert msg.data.tobytes() == np.ascontiguousarray(rgb[:, ::-1]).tobytes()
    assert msg.step == 6 * 3
