"""Tiny synthetic datasets in the official formats, for tests and CI smoke runs.

Each writer draws random RGB images with rectangular GT instances and returns what it
wrote, so tests can compute the expected metrics by hand.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from training.eval.masks import rle_encode

Rect = tuple[int, int, int, int]  # x1, y1, x2, y2 inclusive


@dataclass
class SyntheticSample:
    """One written sample: its image path and GT instance rectangles."""

    image: Path
    text: str
    rects: list[Rect]
    size: tuple[int, int]  # (H, W)


def rect_mask(size: tuple[int, int], rect: Rect) -> np.ndarray:
    """`(H, W)` bool mask of an inclusive rectangle."""
    m = np.zeros(size, dtype=bool)
    x1, y1, x2, y2 = rect
    m[y1:y2 + 1, x1:x2 + 1] = True
    return m


def _image(path: Path, size: tuple[int, int], seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)


def _rect(i: int, size: tuple[int, int]) -> Rect:
    h, w = size
    x1, y1 = (3 * i) % (w // 2), (2 * i) % (h // 2)
    return (x1, y1, x1 + w // 3, y1 + h // 3)


def write_roborefit_official(root: Path, split: str, n: int = 3,
                             size: tuple[int, int] = (48, 64)) -> list[SyntheticSample]:
    """`root/final_dataset/{split}/roborefit_{split}.json` with Windows-style paths.

    Masks are RGB PNGs with only the red channel set (any channel > 0 is foreground);
    texts carry surrounding quotes; scenes alternate between two names.
    """
    base = Path(root) / "final_dataset" / split
    recs, out = [], []
    for i in range(n):
        stem = f"{i:07d}"
        img = base / "image" / f"{stem}.png"
        _image(img, size, seed=i)
        rect = _rect(i, size)
        mask_rgb = np.zeros((*size, 3), dtype=np.uint8)
        mask_rgb[rect_mask(size, rect), 0] = 255
        (base / "mask").mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask_rgb).save(base / "mask" / f"{stem}.png")
        win = f"final_dataset\\{split}"
        text = "I want to get the red cup" if i % 2 == 0 else "can you give me the blue bowl"
        recs.append({
            "num": i, "text": f'"{text}"', "bbox": list(rect), "scene": f"scene_{i % 2}",
            "rgb_path": f"{win}\\image\\{stem}.png", "depth_path": f"{win}\\depth\\{stem}.png",
            "mask_path": f"{win}\\mask\\{stem}.png",
        })
        out.append(SyntheticSample(img, text, [rect], size))
    (base / f"roborefit_{split}.json").write_text(json.dumps(recs), encoding="utf-8")
    return out


def write_roborefit_qa(root: Path, name: str = "roborefit_testA_qa.json", n: int = 3,
                       size: tuple[int, int] = (48, 64)) -> tuple[Path, list[SyntheticSample]]:
    """The official evaluation's preprocessed form: [{image, question, masks: RLE}]."""
    root = Path(root)
    recs, out = [], []
    for i in range(n):
        rel = f"roborefit/images/{i:07d}.png"
        _image(root / rel, size, seed=100 + i)
        rect = _rect(i, size)
        text = "I want to get the green apple"
        recs.append({"image": rel, "question": text, "masks": rle_encode(rect_mask(size, rect))})
        out.append(SyntheticSample(root / rel, text, [rect], size))
    path = root / name
    path.write_text(json.dumps(recs), encoding="utf-8")
    return path, out


def write_inst2seg(root: Path, name: str = "inst2seg.json", size: tuple[int, int] = (48, 64)) -> Path:
    """Inst2Seg question file: 2 images, queries with 1, 2 and 0 targets (no `mask`)."""
    root = Path(root)
    h, w = size
    recs = []
    for i in range(2):
        rel = f"inst2seg/{i}.png"
        _image(root / rel, size, seed=200 + i)
        a, b = (2, 2, 12, 12), (30, 20, 45, 35)
        recs.append({"image": rel, "height": h, "width": w, "annotation": [
            {"text": "the top-left box", "mask": rle_encode(rect_mask(size, a))},
            {"text": "both boxes", "mask": [rle_encode(rect_mask(size, a)), rle_encode(rect_mask(size, b))]},
            {"text": "the purple elephant"},
        ]})
    path = root / name
    path.write_text(json.dumps(recs), encoding="utf-8")
    return path


def write_reasonseg(root: Path, name: str = "reason_seg_val.json", size: tuple[int, int] = (48, 64)) -> Path:
    """ReasonSeg question file: one long (is_sentence) and one short query, the second
    with an ignore_mask."""
    root = Path(root)
    h, w = size
    recs = []
    for i, is_sentence in enumerate((True, False)):
        rel = f"reasonseg/{i}.png"
        _image(root / rel, size, seed=300 + i)
        rec = {"image": rel, "height": h, "width": w, "is_sentence": is_sentence,
               "question": "What can hold hot coffee?" if is_sentence else "The mug",
               "mask": rle_encode(rect_mask(size, (5, 5, 20, 20)))}
        if not is_sentence:
            rec["ignore_mask"] = rle_encode(rect_mask(size, (40, 30, 50, 40)))
        recs.append(rec)
    path = root / name
    path.write_text(json.dumps(recs), encoding="utf-8")
    return path


def write_grefcoco(root: Path, name: str = "grefcoco_val.json", size: tuple[int, int] = (48, 64)) -> Path:
    """gRefCOCO question file (official AP script): images under coco/val2017, one
    expression with two targets and one with none."""
    root = Path(root)
    h, w = size
    _image(root / "coco" / "val2017" / "000000000001.png", size, seed=400)
    recs = [{
        "image": "COCO_train2014_000000000001.png", "height": h, "width": w,
        "cat": ["the two boxes", "the giraffe"],
        "masks": [[rle_encode(rect_mask(size, (2, 2, 12, 12))), rle_encode(rect_mask(size, (30, 20, 45, 35)))], []],
    }]
    path = root / name
    path.write_text(json.dumps(recs), encoding="utf-8")
    return path


# ---- procedural tabletop scenes (training tests, smoke runs) -------------------------------

def write_roborefit_scenes(root: Path, split: str = "train", n: int = 4,
                           size: tuple[int, int] = (96, 128)) -> Path:
    """RoboRefIt's official layout from the core's tabletop scenes: one sample per scene,
    the expression naming its first mug, the mug's exact mask as the GT. Returns the JSON."""
    from instructsam_core.sample_images import tabletop_scene

    base = Path(root) / "final_dataset" / split
    (base / "image").mkdir(parents=True, exist_ok=True)
    (base / "mask").mkdir(parents=True, exist_ok=True)
    recs = []
    h, w = size
    for i in range(n):
        scene = tabletop_scene(w, h, seed=i)
        target = next(o for o in scene.objects if o.name.endswith("mug"))
        stem = f"{i:07d}"
        Image.fromarray(scene.image).save(base / "image" / f"{stem}.png")
        Image.fromarray(target.mask.astype(np.uint8) * 255).save(base / "mask" / f"{stem}.png")
        ys, xs = np.nonzero(target.mask)
        win = f"final_dataset\\{split}"
        text = f"the {target.name}"
        recs.append({"num": i, "text": text, "bbox": [int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())],
                     "scene": f"scene_{i}", "rgb_path": f"{win}\\image\\{stem}.png",
                     "depth_path": f"{win}\\depth\\{stem}.png", "mask_path": f"{win}\\mask\\{stem}.png"})
    path = base / f"roborefit_{split}.json"
    path.write_text(json.dumps(recs), encoding="utf-8")
    return path


def write_grefcoco_scenes(root: Path, name: str = "grefcoco_train.json", n: int = 2,
                          size: tuple[int, int] = (96, 128)) -> Path:
    """gRefCOCO's JSON from the core's tabletop scenes: per image "the mugs" (every mug,
    two or three instances), "the tray" (one) and "the purple elephant" (none)."""
    from instructsam_core.sample_images import tabletop_scene

    root = Path(root)
    h, w = size
    recs = []
    for i in range(n):
        scene = tabletop_scene(w, h, seed=100 + i)
        image = f"COCO_train2014_{i:012d}.png"  # found as coco/train2017/<suffix>, as the official script does
        (root / "coco" / "train2017").mkdir(parents=True, exist_ok=True)
        Image.fromarray(scene.image).save(root / "coco" / "train2017" / image.split("_")[-1])
        mugs = [rle_encode(o.mask) for o in scene.objects if o.name.endswith("mug")]
        tray = [rle_encode(o.mask) for o in scene.objects if o.name == "tray"]
        recs.append({"image": image, "height": h, "width": w, "cat": ["the mugs", "the tray", "the purple elephant"],
                     "masks": [mugs, tray, []]})
    path = root / name
    path.write_text(json.dumps(recs), encoding="utf-8")
    return path
