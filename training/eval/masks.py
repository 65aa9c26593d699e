"""Mask I/O for the benchmarks: PNG masks, COCO RLE (own codec), polygons, label maps.

COCO's RLE is read and written here without pycocotools: counts run over the mask in
column-major order, starting with a run of zeros; the compressed string form stores
each count (from the third on, as the difference to the count two before) in 5-bit
groups, each offset by 48, with bit 0x20 marking that more groups follow and bit 0x10
of the last group carrying the sign. Polygon annotations need pycocotools'
rasteriser (exact pixels matter for the metrics), imported only when one is met.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from instructsam_core.fileio import atomic_file
from instructsam_core.postprocess import label_image
from instructsam_core.processing import load_rgb


class DataError(ValueError):
    """A sample's data is missing or malformed; the runner records it as a failure."""


# --------------------------------------------------------------------------- RLE


def _counts_from_string(s: str) -> list[int]:
    counts: list[int] = []
    data = s.encode("ascii")
    p = 0
    while p < len(data):
        x = 0
        k = 0
        more = True
        while more:
            if p >= len(data):
                raise DataError("truncated RLE counts string")
            c = data[p] - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def _counts_to_string(counts: list[int]) -> str:
    out = bytearray()
    for i, cnt in enumerate(counts):
        x = int(cnt) - (int(counts[i - 2]) if i > 2 else 0)
        more = True
        while more:
            c = x & 0x1F
            x >>= 5  # arithmetic shift: negative deltas end on -1
            more = (x != -1) if (c & 0x10) else (x != 0)
            if more:
                c |= 0x20
            out.append(c + 48)
    return out.decode("ascii")


def rle_decode(rle: dict) -> np.ndarray:
    """`(H, W)` bool mask of a COCO RLE dict ({size: [H, W], counts: str | list[int]})."""
    try:
        h, w = (int(v) for v in rle["size"])
        counts = rle["counts"]
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"not a COCO RLE dict (needs 'size' [H, W] and 'counts'): {e}") from e
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    runs = _counts_from_string(counts) if isinstance(counts, str) else [int(c) for c in counts]
    if any(r < 0 for r in runs) or sum(runs) != h * w:
        raise DataError(f"RLE counts sum to {sum(runs)}, expected H*W = {h * w}")
    values = np.zeros(len(runs), dtype=bool)
    values[1::2] = True
    flat = np.repeat(values, runs)
    return flat.reshape((w, h)).T.copy()  # column-major


def rle_encode(mask: np.ndarray) -> dict:
    """COCO compressed RLE ({size, counts: str}) of an `(H, W)` mask."""
    m = np.asarray(mask, dtype=bool)
    h, w = m.shape
    flat = m.T.reshape(-1)  # column-major
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate(([0], change, [flat.size]))
    runs = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        runs = [0] + runs
    if not flat.size:
        runs = []
    return {"size": [h, w], "counts": _counts_to_string(runs)}


def _polygons_to_mask(polys: list, h: int, w: int) -> np.ndarray:
    try:
        from pycocotools import mask as mask_utils
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise DataError(
            "this annotation is a polygon; decoding polygons exactly as the official "
            "evaluation does needs pycocotools (pip install pycocotools)"
        ) from e
    rles = mask_utils.frPyObjects([list(map(float, p)) for p in polys], h, w)
    return mask_utils.decode(mask_utils.merge(rles)).astype(bool)


def is_polygon(x: Any) -> bool:
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(v, (int, float)) for v in x)


def decode_instances(ann: Any, height: int | None = None, width: int | None = None) -> list[np.ndarray]:
    """GT instances of one annotation, as a list of `(H, W)` bool masks (0, 1 or many).

    Accepts what the official question files hold: None (no target), a compressed or
    uncompressed COCO RLE dict, a polygon list (one instance), a list of RLE dicts (one
    instance each) or a list of polygon lists (one instance each). `height`/`width`,
    when given, are checked against each RLE's size.

    Raises:
        DataError: an unknown or malformed annotation, or a size mismatch.
    """
    if ann is None:
        return []
    if isinstance(ann, dict):
        m = rle_decode(ann)
        if height is not None and width is not None and m.shape != (height, width):
            raise DataError(f"GT mask is {m.shape[0]}x{m.shape[1]} but the image is {height}x{width}")
        return [m]
    if isinstance(ann, (list, tuple)):
        if len(ann) == 0:
            return []
        if all(is_polygon(p) for p in ann):
            if height is None or width is None:
                raise DataError("a polygon annotation needs the image height and width")
            return [_polygons_to_mask(list(ann), height, width)]
        out: list[np.ndarray] = []
        for inst in ann:
            if isinstance(inst, dict):
                out.extend(decode_instances(inst, height, width))
            elif isinstance(inst, (list, tuple)) and inst and all(is_polygon(p) for p in inst):
                out.extend(decode_instances(list(inst), height, width))
            else:
                raise DataError(f"unrecognised instance annotation of type {type(inst).__name__}")
        return out
    raise DataError(f"unrecognised mask annotation of type {type(ann).__name__}")


# --------------------------------------------------------------------------- PNG


def read_png_mask(path: Path, *, ignore_value: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Read a mask image: foreground where any colour channel > 0.

    An alpha band (RGBA, LA, PA, ...) is dropped first: it says how opaque a pixel is,
    not whether it is the object, and an opaque background would otherwise be all
    foreground.

    Args:
        path: the mask file.
        ignore_value: LISA's 255. Pixels whose every channel equals it are the ignore
            mask (and not foreground) only in LISA's 0/1/255 layout, i.e. when the mask
            also has pixels of value 1; in a plain binary 0/255 mask 255 is the object.

    Returns:
        `(mask, ignore)`: `(H, W)` bool arrays (`ignore` None when `ignore_value` is;
        all False when the mask is not in the 0/1/ignore layout).

    Raises:
        DataError: the file is missing or not a readable image.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"GT mask not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            bands = im.getbands()
            arr = np.asarray(im)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"unreadable mask image {path}: {e}") from e
    if arr.ndim == 3 and len(bands) == arr.shape[2] and len(bands) > 1 and bands[-1] in ("A", "a"):
        arr = arr[..., :-1]  # drop alpha
    if arr.ndim == 2:
        arr = arr[..., None]
    fg = (arr > 0).any(axis=2)
    ign = None
    if ignore_value is not None:
        ign = (arr == ignore_value).all(axis=2)
        if not (arr == 1).all(axis=2).any():
            ign = np.zeros_like(ign)  # no 1s: a binary 0/255 mask, 255 is foreground
        fg = fg & ~ign
    return fg, ign


def read_rgb(path: Path) -> np.ndarray:
    """`(H, W, 3)` uint8 RGB of an image file.

    Raises:
        DataError: the file is missing or unreadable.
    """
    try:
        return load_rgb(path)
    except (FileNotFoundError, ValueError) as e:
        raise DataError(str(e)) from e


def write_label_png(path: Path, masks: np.ndarray) -> None:
    """Write instances as one label PNG (`postprocess.label_image`: 0 background, i + 1
    for instance i, the earlier instance winning where masks overlap), 8-bit up to 255
    instances, 16-bit beyond; atomically."""
    masks = np.asarray(masks, dtype=bool)
    label = label_image(masks, np.uint8 if masks.shape[0] < 256 else np.uint16)
    with atomic_file(path) as tmp:
        Image.fromarray(label).save(tmp, format="PNG")
