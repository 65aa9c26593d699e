"""Conversions between ROS image messages and numpy arrays (no cv_bridge).

One tested numpy (+ Pillow for compressed images) path: decode sensor_msgs/Image and
CompressedImage into RGB uint8, depth into metres, and encode results (masks, label
images, overlays) back into sensor_msgs/Image. Every malformed input raises
`ImageError` with a message naming the problem, so the node can log it and skip the
frame.
"""

from __future__ import annotations

import array
import io
import sys

import numpy as np

# encoding -> (channels, numpy dtype); the colour encodings the node accepts.
COLOR_ENCODINGS: dict[str, tuple[int, type]] = {
    "rgb8": (3, np.uint8),
    "bgr8": (3, np.uint8),
    "rgba8": (4, np.uint8),
    "bgra8": (4, np.uint8),
    "mono8": (1, np.uint8),
    "mono16": (1, np.uint16),
}
# Depth encodings: 16UC1 in millimetres, 32FC1 in metres (REP 118).
DEPTH_ENCODINGS: dict[str, tuple[int, type]] = {
    "16UC1": (1, np.uint16),
    "mono16": (1, np.uint16),  # some drivers label millimetre depth this way
    "32FC1": (1, np.float32),
}
# Refuse absurd sizes before allocating (a corrupt header must not exhaust memory).
MAX_PIXELS = 64 * 1024 * 1024


class ImageError(ValueError):
    """An image message that cannot be decoded; the message says why.

    `kind` names the problem with a fixed word (encoding, size, step, truncated,
    format, malformed), e.g. to rate-limit warnings per problem.
    """

    def __init__(self, message: str, kind: str = "invalid"):
        super().__init__(message)
        self.kind = kind


def _checked_layout(msg, table: dict[str, tuple[int, type]], kind: str) -> tuple[int, type, int]:
    """Check a sensor_msgs/Image's header against its data length, without decoding.

    Returns `(channels, dtype, bytes per row)`; raises ImageError naming the problem.
    """
    enc = msg.encoding
    if enc not in table:
        raise ImageError(
            f"unsupported {kind} encoding '{enc}' (supported: {', '.join(table)})", "encoding")
    channels, dtype = table[enc]
    h, w, step = int(msg.height), int(msg.width), int(msg.step)
    if h == 0 or w == 0:
        raise ImageError(f"zero-size {kind} image ({w}x{h})", "size")
    if h * w > MAX_PIXELS:
        raise ImageError(f"{kind} image too large ({w}x{h} > {MAX_PIXELS} pixels)", "size")
    row = w * channels * np.dtype(dtype).itemsize
    if step < row:
        raise ImageError(
            f"{kind} image step {step} is smaller than width*bytes per pixel = {row} "
            f"({w} px, {enc})", "step")
    if len(msg.data) < step * h:
        raise ImageError(
            f"truncated {kind} image: {len(msg.data)} bytes, expected step*height = "
            f"{step}*{h} = {step * h}", "truncated")
    return channels, dtype, row


def check_image(msg) -> None:
    """The cheap checks of a colour sensor_msgs/Image (encoding, size, step, data length),
    done before a frame may take the newest good frame's place; decoding comes later."""
    _checked_layout(msg, COLOR_ENCODINGS, "colour")


def check_compressed(msg) -> None:
    """The cheap checks of a sensor_msgs/CompressedImage: data present, and a JPEG or PNG
    signature at its start (the format string varies between drivers)."""
    head = bytes(msg.data[:8])
    if not head:
        raise ImageError(f"empty compressed image (format '{msg.format}')", "size")
    if not (head.startswith(b"\xff\xd8\xff") or head.startswith(b"\x89PNG\r\n\x1a\n")):
        raise ImageError(f"compressed image is neither JPEG nor PNG (format '{msg.format}', "
                         f"starts with {head.hex()})", "format")


def _raw_array(msg, table: dict[str, tuple[int, type]], kind: str) -> np.ndarray:
    """Validate a sensor_msgs/Image and view its data as `(H, W, C)` in native order.

    Handles row padding (step > width * bytes per pixel) and big-endian data.
    """
    channels, dtype, row = _checked_layout(msg, table, kind)
    h, w, step = int(msg.height), int(msg.width), int(msg.step)
    data = msg.data
    buf = data.tobytes() if isinstance(data, np.ndarray) else bytes(data)
    rows = np.frombuffer(buf, dtype=np.uint8, count=step * h).reshape(h, step)[:, :row]
    itemsize = np.dtype(dtype).itemsize
    big = bool(msg.is_bigendian)
    dt = np.dtype(dtype).newbyteorder(">" if big else "<") if itemsize > 1 else np.dtype(dtype)
    arr = np.ascontiguousarray(rows).view(dt).reshape(h, w, channels)
    return arr.astype(np.dtype(dtype).newbyteorder("="), copy=False)


def image_to_rgb(msg) -> np.ndarray:
    """Decode a sensor_msgs/Image into `(H, W, 3)` uint8 RGB.

    mono16 is scaled to 8 bits over its full range (value / 257), as image viewers do.
    """
    arr = _raw_array(msg, COLOR_ENCODINGS, "colour")
    enc = msg.encoding
    if enc == "mono16":
        arr = ((arr.astype(np.uint32) + 128) // 257).astype(np.uint8)
    if arr.shape[2] == 1:
        return np.repeat(arr, 3, axis=2)
    if enc.startswith("bgr"):
        arr = arr[:, :, 2::-1]
    return np.ascontiguousarray(arr[:, :, :3])


def compressed_to_rgb(msg) -> np.ndarray:
    """Decode a sensor_msgs/CompressedImage (JPEG or PNG) into `(H, W, 3)` uint8 RGB.

    Pixels are taken as stored: an EXIF orientation tag is not applied, so results stay in
    the camera's pixel frame, aligned with depth and camera_info.
    """
    from PIL import Image, UnidentifiedImageError

    data = bytes(msg.data)
    if not data:
        raise ImageError(f"empty compressed image (format '{msg.format}')", "size")
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format not in ("JPEG", "PNG"):
                raise ImageError(
                    f"compressed image is {im.format}, expected jpeg or png "
                    f"(format field '{msg.format}')", "format")
            if im.width * im.height > MAX_PIXELS:
                raise ImageError(f"compressed image too large ({im.width}x{im.height})", "size")
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                a = np.asarray(im, dtype=np.uint32)
                a = ((a + 128) // 257).clip(0, 255).astype(np.uint8)
                rgb = np.repeat(a[:, :, None], 3, axis=2)
            else:
                rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except ImageError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageError(
            f"malformed compressed image (format '{msg.format}', {len(data)} bytes): {exc}",
            "malformed") from None
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ImageError("zero-size compressed image", "size")
    return np.ascontiguousarray(rgb)


def depth_to_metres(msg) -> np.ndarray:
    """Decode a depth sensor_msgs/Image into `(H, W)` float32 metres, NaN where invalid.

    16UC1 is millimetres, 32FC1 metres; zero, NaN and infinite pixels are invalid.
    """
    arr = _raw_array(msg, DEPTH_ENCODINGS, "depth")[:, :, 0]
    if arr.dtype == np.uint16:
        out = arr.astype(np.float32) * np.float32(1e-3)
        out[arr == 0] = np.nan
    else:
        out = arr.astype(np.float32, copy=True)
        out[~np.isfinite(out) | (out <= 0)] = np.nan
    return out


def numpy_to_image(arr: np.ndarray, encoding: str, header=None):
    """Build a sensor_msgs/Image from `(H, W)` or `(H, W, C)` array (native little-endian)."""
    from sensor_msgs.msg import Image

    arr = np.ascontiguousarray(arr)
    h, w = arr.shape[:2]
    msg = Image()
    if header is not None:
        msg.header = header
    msg.height, msg.width = int(h), int(w)
    msg.encoding = encoding
    msg.is_bigendian = int(sys.byteorder == "big")
    msg.step = int(arr.strides[0]) if h else 0
    msg.data = as_uint8_array(arr)
    return msg


def as_uint8_array(data) -> array.array:
    """Bytes (or a contiguous numpy array) as `array.array('B')`, for a uint8[] field.

    The generated message setters take an array.array('B') as is; bytes, lists and
    numpy arrays are checked element by element on Humble (slow for images).
    """
    if isinstance(data, np.ndarray):
        data = np.ascontiguousarray(data).tobytes()
    return array.array("B", data)


def crop_mask(mask: np.ndarray, box: np.ndarray) -> np.ndarray:
    """mono8 crop (255/0) of a full-size bool mask to an inclusive xyxy box."""
    x1, y1, x2, y2 = (int(v) for v in box)
    return mask[y1:y2 + 1, x1:x2 + 1].astype(np.uint8) * np.uint8(255)
