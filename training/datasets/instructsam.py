"""The release's training annotation JSONs (`data/training/*.json` of the official
InstructSAM repository: refcoco.json, grefcoco_single.json, roborefit.json,
reason_seg_cat.json, inst2seg.json, ...), in the schema its dataset code reads.

One JSON list (or JSON lines) of records, one image each:

    {"image": "coco/train2014/COCO_train2014_000000000009.jpg",   # below the data root
     "height": 480, "width": 640,
     "type": "instseg",                                         # optional, see below
     "annotation": [                                            # or a JSON string of it;
       {"type": "phrase",        # phrase | sentence | OCR      # "annotations" also read
        "text": "the man in red",
        "category": "man",       # the answer's phrase when type is "sentence"
        "ann_type": "mask",      # mask | bbox | point
        "ann": ["{\"size\": [480, 640], \"counts\": \"...\"}", ...]},   # or null: no target
       ...]}

Each `ann` entry is one instance: a COCO RLE dict (compressed or not) or a polygon list,
as a JSON string or as the object itself; for `ann_type` "bbox" a box `[x, y, w, h]` in
pixels (trained as a filled rectangle, clipped to the image, as the release does).
Records without an annotation (the release's text-only conversations) and "point"
annotations carry no mask to train on and are left out (their count is logged).

Questions, as the release builds them: a "phrase" asks for its text ("Can you segment
'<phrase>' in the image?", the phrase with its first letter lower-cased and a final '.'
dropped) and the answer names the phrase; a "sentence" asks its text as it is and the
answer names its `category`; "OCR" asks "Can you segment the text '<text>' in the
image?". The release draws one of seven question templates at random; we ask the
benchmarks' one, the instruction a model is also evaluated with. Records of type
"instseg" (Inst2Seg) also give one question naming all their phrases at once ("Can you
segment 'a, b and c' in the image?", the answer listing each with its query block), which
the release asks in half of its draws.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from training.datasets import GtLoader, Question
from training.eval.masks import DataError, decode_instances, is_polygon
from training.eval.prompts import grefcoco_prompt
from training.eval.readers import FormatError, field_of, image_size, load_json_records, resolve_path, size_of
from training.eval.samples import GroundTruth

log = logging.getLogger(__name__)

MAX_PHRASES = 10  # phrases in one all-at-once question (the release's MAX_PHRASE_NUM)
ANNOTATION_TYPES = ("phrase", "sentence", "OCR")


def clean_phrase(text: str) -> str:
    """The answer's phrase: stripped, first letter lower-cased, a final '.' dropped."""
    t = str(text).strip()
    if t.endswith("."):
        t = t[:-1].rstrip()
    return t[:1].lower() + t[1:]


def _parse(value: Any, where: str) -> Any:
    """A field the release may store as a JSON string (datasets' flattened columns)."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as err:
            raise FormatError(f"{where}: not valid JSON: {err}") from err
    return value


def _instance_mask(item: Any, size: tuple[int, int] | None, where: str) -> np.ndarray:
    h, w = size if size else (None, None)
    item = _parse(item, where)
    if isinstance(item, dict):
        masks = decode_instances(item, h, w)
    elif isinstance(item, list) and item and all(is_polygon(p) for p in item):
        masks = decode_instances(item, h, w)  # the polygons of one instance, merged
    elif is_polygon(item):
        masks = decode_instances([item], h, w)
    else:
        raise DataError(f"{where}: an instance is neither an RLE dict nor a polygon list")
    return masks[0]


def _box_mask(item: Any, size: tuple[int, int], where: str) -> np.ndarray:
    box = _parse(item, where)
    if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
        raise DataError(f"{where}: a box must be [x, y, w, h], got {box!r}")
    h, w = size
    x1, y1 = int(max(box[0], 0)), int(max(box[1], 0))
    bw, bh = int(min(box[2], w - x1)), int(min(box[3], h - y1))
    mask = np.zeros((h, w), dtype=bool)
    mask[y1:y1 + max(bh, 0), x1:x1 + max(bw, 0)] = True
    return mask


def annotation_gt(ann: dict, size: tuple[int, int] | None, image: Path, where: str) -> GtLoader:
    """Lazy GT of one annotation: its instances (none when `ann` is null)."""
    items = ann.get("ann")
    boxes = ann.get("ann_type") == "bbox"

    def load() -> GroundTruth:
        shape = size or image_size(image)
        if not items:
            return GroundTruth.from_masks([], shape)
        if boxes:
            masks = [_box_mask(item, shape, f"{where}.ann[{k}]") for k, item in enumerate(items)]
        else:
            masks = [_instance_mask(item, size, f"{where}.ann[{k}]") for k, item in enumerate(items)]
        for m in masks:
            if m.shape != masks[0].shape:
                raise DataError(f"{where}: instances of one annotation differ in size")
        return GroundTruth.from_masks(masks, masks[0].shape)

    return load


def _question(ann: dict, where: str) -> tuple[str, str, str | None]:
    """`(instruction, phrase, error)` of one annotation."""
    kind = field_of(ann, "type", where=where)
    text = str(field_of(ann, "text", where=where) or "").strip()
    if kind == "phrase":
        phrase = clean_phrase(text)
        instruction = grefcoco_prompt(phrase) if phrase else ""
    elif kind == "sentence":
        phrase = clean_phrase(field_of(ann, "category", where=where) or "")
        instruction = text
    elif kind == "OCR":
        phrase = text
        instruction = f"Can you segment the text '{phrase}' in the image?"
    else:
        raise FormatError(f"{where}: annotation type {kind!r} is none of {', '.join(ANNOTATION_TYPES)}")
    error = None if (text and phrase) else "bad_text: empty annotation text"
    return instruction, phrase, error


def read_instructsam(json_path: Path, data_root: Path) -> list[Question]:
    """The questions of one of the release's training JSONs, one per annotation (plus one
    all-phrases question per "instseg" record); images resolved below `data_root`."""
    json_path, data_root = Path(json_path), Path(data_root)
    out: list[Question] = []
    left_out: Counter[str] = Counter()
    for i, rec in enumerate(load_json_records(json_path)):
        where = f"{json_path}[{i}]"
        anns = _parse(rec.get("annotation", rec.get("annotations")), f"{where}.annotation")
        if rec.get("image") is None or not anns:
            left_out["records without an image or annotation"] += 1
            continue
        if not isinstance(anns, list):
            raise FormatError(f"{where}: 'annotation' must be a list, got {type(anns).__name__}")
        image = resolve_path(data_root, rec["image"])
        size = size_of(rec)
        together: list[tuple[str, GtLoader]] = []
        for j, ann in enumerate(anns):
            at = f"{where}.annotation[{j}]"
            if not isinstance(ann, dict):
                raise FormatError(f"{at}: expected an object, got {type(ann).__name__}")
            if ann.get("ann_type", "mask") not in ("mask", "bbox"):
                left_out[f"'{ann.get('ann_type')}' annotations"] += 1
                continue
            instruction, phrase, error = _question(ann, at)
            load = annotation_gt(ann, size, image, at)
            out.append(Question(key=str(i), image=image, question_id=f"{i:06d}-{j}", instruction=instruction,
                                phrases=[(phrase, load)], error=error))
            if ann["type"] == "phrase" and not error:
                together.append((phrase, load))
        if rec.get("type") == "instseg" and len(together) > 1:
            for c in range(0, len(together), MAX_PHRASES):
                chunk = together[c:c + MAX_PHRASES]
                names = [p for p, _ in chunk]
                joined = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
                out.append(Question(key=f"{i}:all{c}", image=image, question_id=f"{i:06d}-all{c}",
                                    instruction=grefcoco_prompt(joined), phrases=chunk))
    if left_out:
        log.warning("%s: left out (no mask to train on): %s", json_path,
                    ", ".join(f"{n} {what}" for what, n in left_out.items()))
    return out
