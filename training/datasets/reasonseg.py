"""ReasonSeg in LISA's files: a split folder (`ReasonSeg/train`, `val`, `test`) of images
`<name>.jpg`, each with its annotation `<name>.json` (labelme's layout):

    {"text": ["What can hold hot coffee?", ...],   # one or more questions (or one string)
     "is_sentence": true,                          # long (a sentence) or short (a phrase)
     "shapes": [{"label": "target", "points": [[x, y], ...]},   # polygons in pixels
                {"label": "ignore", "points": ...}, ...],
     "imageHeight": 480, "imageWidth": 640}         # optional; else read from the image

The GT is LISA's: the polygons are filled largest first (a smaller one painted over a
larger), "target" ones as the object, those whose label contains "ignore" as pixels left
out of evaluation (and not the object in training), "flag" ones dropped. The object is one
mask (ReasonSeg labels a region, not instances). Vertices are truncated to whole pixels
and each polygon is filled with its outline, as LISA does with OpenCV; we rasterise with
Pillow, whose edge pixels can differ from OpenCV's by one. The file is read as UTF-8,
else as cp1252, as LISA reads it. One question per text, with the benchmark's prompt
(`reasonseg_prompt`: long "<q> Please output the segmentation mask.", short "Please
segment the '<q>' in the image.").
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from training.eval.masks import DataError
from training.eval.prompts import reasonseg_prompt, strip_quotes
from training.eval.readers import FormatError, field_of, image_size, prompted
from training.eval.samples import GroundTruth, Sample


def _read_annotation(path: Path) -> dict:
    raw = path.read_bytes()
    for encoding in ("utf-8", "cp1252"):
        try:
            data = json.loads(raw.decode(encoding))
            break
        except (UnicodeDecodeError, json.JSONDecodeError):
            continue
    else:
        raise FormatError(f"{path}: not a JSON annotation (UTF-8 or cp1252)")
    if not isinstance(data, dict):
        raise FormatError(f"{path}: expected a JSON object")
    return data


def fill_polygon(points: list, size: tuple[int, int]) -> np.ndarray:
    """`(H, W)` bool: a polygon (vertices truncated to whole pixels) filled, outline included."""
    h, w = size
    vertices = [(int(float(x)), int(float(y))) for x, y in points]
    canvas = Image.new("L", (w, h), 0)
    if vertices:
        ImageDraw.Draw(canvas).polygon(vertices, fill=1, outline=1)
    return np.asarray(canvas, dtype=bool)


def lisa_label_map(shapes: list[dict], size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """`(target, ignore)` `(H, W)` bool masks of LISA's polygons (see the module's docstring)."""
    kept = [s for s in shapes if str(s.get("label", "")).lower() != "flag"]
    filled = [fill_polygon(s.get("points", []), size) for s in kept]
    label = np.zeros(size, dtype=np.uint8)
    for i in np.argsort([-int(m.sum()) for m in filled], kind="stable"):  # largest first
        label[filled[i]] = 255 if "ignore" in str(kept[i].get("label", "")).lower() else 1
    return label == 1, label == 255


def _polygon_gt(shapes: list[dict], size: tuple[int, int] | None, image: Path):
    def load() -> GroundTruth:
        shape = size or image_size(image)
        try:
            target, ignore = lisa_label_map(shapes, shape)
        except (TypeError, ValueError) as err:
            raise DataError(f"malformed polygon in the annotation of {image.name}: {err}") from err
        return GroundTruth.from_masks([target] if target.any() else [], shape, ignore=ignore)

    return load


def read_reasonseg_folder(folder: Path) -> list[Sample]:
    """One sample per question of every `<name>.jpg` + `<name>.json` of a split folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FormatError(f"ReasonSeg folder not found: {folder}")
    images = sorted(folder.glob("*.jpg"))
    if not images:
        raise FormatError(f"{folder}: no <name>.jpg images (LISA's ReasonSeg layout)")
    out = []
    for image in images:
        path = image.with_suffix(".json")
        if not path.is_file():
            raise FormatError(f"{folder}: {image.name} has no annotation {path.name}")
        anno = _read_annotation(path)
        texts = field_of(anno, "text", where=str(path))
        texts = texts if isinstance(texts, list) else [texts]
        is_sentence = bool(anno.get("is_sentence", False))
        size = (int(anno["imageHeight"]), int(anno["imageWidth"])) if {"imageHeight", "imageWidth"} <= set(anno) else None
        load = _polygon_gt(field_of(anno, "shapes", where=str(path)), size, image)
        for k, question in enumerate(texts):
            text = strip_quotes(question)
            out.append(Sample(sample_id=f"{image.stem}-{k}", image=image, text=text,
                              **prompted(lambda t, s=is_sentence: reasonseg_prompt(t, s), text),
                              group="long" if is_sentence else "short", load_gt=load))
    return out
