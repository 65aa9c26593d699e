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


# ---- training datasets in their official files (training/datasets readers) ----------------

def rect_polygon(rect: Rect) -> list[float]:
    """A rectangle as a COCO polygon [x1, y1, x2, y1, x2, y2, x1, y2] (pixel corners)."""
    x1, y1, x2, y2 = rect
    return [float(x1), float(y1), float(x2 + 1), float(y1), float(x2 + 1), float(y2 + 1), float(x1), float(y2 + 1)]


def write_instructsam(root: Path, name: str = "training/refcoco.json", size: tuple[int, int] = (48, 64)) -> Path:
    """One of the release's training JSONs below `root` (images below `root` too): a
    referring record (phrase with an RLE instance, sentence with a polygon instance and
    two instances as JSON strings, an OCR box, a no-target phrase, a point annotation
    that carries no mask), a record whose `annotation` is a JSON string, and an Inst2Seg
    ("instseg") record with two phrases."""
    root = Path(root)
    h, w = size
    for i in range(3):
        _image(root / "images" / f"{i}.png", size, seed=500 + i)
    a, b, c = (2, 2, 12, 12), (30, 20, 45, 35), (50, 5, 60, 15)
    records = [
        {"image": "images/0.png", "height": h, "width": w, "annotation": [
            {"type": "phrase", "text": "The red mug.", "ann_type": "mask",
             "ann": [json.dumps(rle_encode(rect_mask(size, a)))]},
            {"type": "sentence", "text": "What holds the flowers?", "category": "Vase", "ann_type": "mask",
             "ann": [json.dumps([rect_polygon(b)]), json.dumps([rect_polygon(c)])]},
            {"type": "OCR", "text": "EXIT", "ann_type": "bbox", "ann": [json.dumps([50, 40, 20, 20])]},
            {"type": "phrase", "text": "the purple elephant", "ann_type": "mask", "ann": None},
            {"type": "phrase", "text": "the door handle", "ann_type": "point", "ann": [json.dumps([3, 4])]},
        ]},
        {"image": "images/1.png", "height": h, "width": w, "annotation": json.dumps([
            {"type": "phrase", "text": "the box", "ann_type": "mask", "ann": [rle_encode(rect_mask(size, a))]}])},
        {"image": "images/2.png", "height": h, "width": w, "type": "instseg", "annotation": [
            {"type": "phrase", "text": "cup", "ann_type": "mask", "ann": [json.dumps(rle_encode(rect_mask(size, a)))]},
            {"type": "phrase", "text": "plate", "ann_type": "mask",
             "ann": [json.dumps(rle_encode(rect_mask(size, b))), json.dumps(rle_encode(rect_mask(size, c)))]},
        ]},
        {"image": None, "conversations": [{"from": "human", "value": "hi"}]},
    ]
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def _instances(images: list[dict], annotations: list[dict]) -> dict:
    return {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "thing"}]}


def python2_pickle(obj) -> bytes:
    """`obj` (dicts, lists, bytes as Python 2 `str`, `str` as `unicode`, ints, floats,
    None, bools) pickled with protocol 2 as Python 2's cPickle writes it: byte strings as
    BINSTRING opcodes, which Python 3's pickler never emits (it names `_codecs.encode`)."""
    import struct

    out = bytearray(b"\x80\x02")

    def put(x) -> None:
        if x is None:
            out.extend(b"N")
        elif isinstance(x, bool):
            out.extend(b"\x88" if x else b"\x89")
        elif isinstance(x, int):
            out.extend(b"J" + struct.pack("<i", x))
        elif isinstance(x, float):
            out.extend(b"G" + struct.pack(">d", x))
        elif isinstance(x, bytes):
            out.extend(b"T" + struct.pack("<I", len(x)) + x)
        elif isinstance(x, str):
            data = x.encode("utf-8")
            out.extend(b"X" + struct.pack("<I", len(data)) + data)
        elif isinstance(x, list):
            out.extend(b"](")
            for v in x:
                put(v)
            out.extend(b"e")
        elif isinstance(x, dict):
            out.extend(b"}(")
            for k, v in x.items():
                put(k)
                put(v)
            out.extend(b"u")
        else:
            raise TypeError(f"python2_pickle: {type(x).__name__} is not plain data")

    put(obj)
    return bytes(out + b".")


def write_refer(root: Path, dataset: str = "refcoco", size: tuple[int, int] = (48, 64)) -> Path:
    """The refer toolkit's files below `root`: `<dataset>/refs(unc).p` (a Python 2
    protocol-2 pickle, its strings byte strings), `<dataset>/instances.json` (polygon
    segmentations) and the images under `images/mscoco/images/train2014`. Two train refs
    on one image (two and one sentences) and a val ref. Returns the refs file."""
    root = Path(root)
    h, w = size
    rects = [(2, 2, 12, 12), (30, 20, 45, 35), (50, 5, 60, 15)]
    names = ["COCO_train2014_000000000001.jpg", "COCO_train2014_000000000002.jpg"]
    for i, file_name in enumerate(names):
        _image(root / "images" / "mscoco" / "images" / "train2014" / file_name, size, seed=600 + i)
    anns = [{"id": 10 + k, "image_id": 1 if k < 2 else 2, "category_id": 1, "iscrowd": 0,
             "segmentation": [rect_polygon(r)], "area": 0.0, "bbox": [0, 0, 1, 1]} for k, r in enumerate(rects)]
    images = [{"id": i + 1, "file_name": n, "height": h, "width": w} for i, n in enumerate(names)]

    def ref(ref_id, ann_id, image_id, split, sentences):
        return {b"ref_id": ref_id, b"ann_id": ann_id, b"image_id": image_id, b"category_id": 1, b"split": split,
                b"file_name": b"COCO_train2014_x.jpg", b"sent_ids": [s for s, _ in sentences],
                b"sentences": [{b"sent_id": s, b"sent": t, b"raw": t, b"tokens": t.split()} for s, t in sentences]}

    refs = [ref(0, 10, 1, b"train", [(0, b"left box"), (1, b"the box on the left")]),
            ref(1, 11, 1, b"train", [(2, "caf\u00e9 sign".encode("utf-8"))]),
            ref(2, 12, 2, b"val", [(3, b"top right box")])]
    folder = root / dataset
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "instances.json").write_text(json.dumps(_instances(images, anns)), encoding="utf-8")
    path = folder / "refs(unc).p"
    path.write_bytes(python2_pickle(refs))
    return path


def write_grefcoco_official(root: Path, size: tuple[int, int] = (48, 64)) -> Path:
    """gRefCOCO's own files below `root`: `grefcoco/grefs(unc).json` + `instances.json`
    (RLE segmentations), images under `images/train2014`. One image with an expression of
    two objects, one of none ([-1]) and one whose only object is a crowd annotation."""
    root = Path(root)
    h, w = size
    name = "COCO_train2014_000000000009.jpg"
    _image(root / "images" / "train2014" / name, size, seed=700)
    rects = [(2, 2, 12, 12), (30, 20, 45, 35)]
    anns = [{"id": 20 + k, "image_id": 9, "category_id": 1, "iscrowd": 0,
             "segmentation": rle_encode(rect_mask(size, r)), "area": 0.0, "bbox": [0, 0, 1, 1]}
            for k, r in enumerate(rects)]
    anns.append({"id": 22, "image_id": 9, "category_id": 1, "iscrowd": 1, "area": 0.0, "bbox": [0, 0, 1, 1],
                 "segmentation": rle_encode(rect_mask(size, (0, 0, 5, 5)))})

    def ref(ref_id, ann_ids, sent, no_target=False):
        return {"ref_id": ref_id, "ann_id": ann_ids, "image_id": 9, "category_id": [1], "split": "train",
                "no_target": no_target, "sentences": [{"sent_id": ref_id, "sent": sent, "raw": sent, "tokens": []}]}

    folder = root / "grefcoco"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "instances.json").write_text(
        json.dumps(_instances([{"id": 9, "file_name": name, "height": h, "width": w}], anns)), encoding="utf-8")
    path = folder / "grefs(unc).json"
    path.write_text(json.dumps([ref(0, [20, 21], "both boxes"), ref(1, [-1], "the giraffe", True),
                                ref(2, [22], "the crowd")]), encoding="utf-8")
    return path


def write_reasonseg_lisa(root: Path, size: tuple[int, int] = (48, 64)) -> Path:
    """LISA's ReasonSeg split folder `root/ReasonSeg/train`: a long question (two texts)
    whose target polygon has an ignored hole and a 'flag' polygon, and a short one.
    Returns the folder."""
    folder = Path(root) / "ReasonSeg" / "train"
    h, w = size

    def poly(rect):
        x1, y1, x2, y2 = rect
        return [[x1, y1], [x2, y1], [x2, y2], [x1, y2]]

    annotations = {
        "a": {"text": ["What can hold hot coffee?", "Which object keeps drinks warm?"], "is_sentence": True,
              "shapes": [{"label": "target", "points": poly((5, 5, 30, 30))},
                         {"label": "ignore", "points": poly((10, 10, 14, 14))},
                         {"label": "flag", "points": poly((40, 0, 60, 10))}],
              "imageHeight": h, "imageWidth": w},
        "b": {"text": "the mug", "is_sentence": False,
              "shapes": [{"label": "target", "points": poly((40, 20, 50, 40))}]},
    }
    for i, (stem, anno) in enumerate(annotations.items()):
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.random.default_rng(800 + i).integers(0, 256, (*size, 3), dtype=np.uint8)).save(
            folder / f"{stem}.jpg")
        (folder / f"{stem}.json").write_text(json.dumps(anno), encoding="utf-8")
    return folder
