"""RoboRefIt benchmark (VL-Grasp): mask mIoU on testA / testB, as in the paper's table.

    instructsam-eval-roborefit --checkpoint CKPT --data-root DATA --output-dir OUT
    instructsam-eval-roborefit --checkpoint CKPT --question-file roborefit_testA_qa.json \
        --data-root DATA --output-dir OUT
    instructsam-eval-roborefit --checkpoint CKPT --question-file shared/data/roborefit_example \
        --output-dir OUT                       # a folder of image_<id>.png + text_<id>.txt

Protocol (REFERENCE.md): prompt = expression with its first letter capitalised, '?' if
it starts with will/would/can/could else '.', + " Please output the segmentation
mask."; slots with sigmoid(score) > 0.5; IoU of the union of kept masks with the GT
mask, I / (U + 1e-12); an empty prediction or a failure scores 0 and counts. Records
without a GT mask run predict-only.
"""

from __future__ import annotations

from pathlib import Path

from typing import Any, Callable

from training.eval.cli import base_parser, guarded, prompt_from_args, run_benchmark, split_name
from training.eval.masks import DataError, decode_instances, is_polygon
from training.eval.prompts import PromptFn, roborefit_prompt, strip_quotes
from training.eval.readers import (FormatError, ann_gt, field_of, identified_records, load_json_records,
                                   image_size, mask_path_gt, parse_box, prompted, resolve_path, size_of)
from training.eval.samples import GroundTruth, Sample
from training.eval.summary import BenchmarkSpec
from training.metrics import INSTRUCTSAM_IOU

# --------------------------------------------------------------------------- reader


def roborefit_official_file(data_root: Path, split: str) -> Path:
    """`final_dataset/{split}/roborefit_{split}.json` below `data_root` (or `data_root` itself)."""
    data_root = Path(data_root)
    for base in (data_root / "final_dataset", data_root):
        f = base / split / f"roborefit_{split}.json"
        if f.is_file():
            return f
    raise FormatError(
        f"no RoboRefIt annotation for split {split!r}: looked for "
        f"{data_root / 'final_dataset' / split / f'roborefit_{split}.json'}"
    )


def read_roborefit_official(json_path: Path, data_root: Path, prompt: PromptFn = roborefit_prompt) -> list[Sample]:
    """RoboRefIt's own annotation: [{num, text, bbox, rgb_path, depth_path, mask_path, scene}].

    Paths are Windows-style and relative to `data_root` (the folder holding
    `final_dataset`). `mask_path` may name one PNG or a folder of instance PNGs.
    """
    out = []
    for i, rec in enumerate(load_json_records(json_path)):
        where = f"{json_path}[{i}]"
        text = strip_quotes(field_of(rec, "text", where=where))
        mask_raw = rec.get("mask_path")
        box = parse_box(rec.get("bbox"), where)
        out.append(Sample(
            sample_id=f"{i:06d}",
            image=resolve_path(data_root, field_of(rec, "rgb_path", where=where)),
            text=text,
            **prompted(prompt, text),
            group=str(rec["scene"]) if rec.get("scene") is not None else None,
            load_gt=mask_path_gt(resolve_path(data_root, mask_raw), box) if mask_raw else None,
            meta={"num": rec.get("num")},
        ))
    return out


def read_roborefit_qa(json_path: Path, data_root: Path, prompt: PromptFn = roborefit_prompt) -> list[Sample]:
    """The official evaluation's preprocessed list: [{image, question|expression, masks: RLE, id?}].

    Raises:
        FormatError: a record lacks a field, or two records share one id (resume and
            sharding key on ids).
    """
    out = []
    for rec, where, text, sid in identified_records(json_path, "question", "expression", "text"):
        ann = rec.get("masks")
        out.append(Sample(
            sample_id=sid,
            image=resolve_path(data_root, field_of(rec, "image", where=where)),
            text=text,
            **prompted(prompt, text),
            group=str(rec["scene"]) if rec.get("scene") is not None else None,
            load_gt=ann_gt(ann, size_of(rec), parse_box(rec.get("bbox"), where)) if ann is not None else None,
        ))
    return out


def _plain_gt(ann: Any, data_root: Path, image: Path, size: tuple[int, int] | None,
              box: tuple | None) -> Callable[[], GroundTruth]:
    """GT of a plain record's `mask`/`masks`: a PNG path (or folder), a COCO RLE dict or
    polygon list, or a list of any of these (one or more instances each), all merged into
    one GroundTruth. An empty list is a no-target GT (its size from height/width, else
    from the image)."""
    if isinstance(ann, str):
        return mask_path_gt(resolve_path(data_root, ann), box)
    if not isinstance(ann, (list, tuple)) or (ann and all(is_polygon(p) for p in ann)):
        return ann_gt(ann, size, box)

    def load() -> GroundTruth:
        masks, ignore = [], None
        for item in ann:
            if isinstance(item, str):
                gt = mask_path_gt(resolve_path(data_root, item))()
            else:
                h, w = size if size else (masks[0].shape if masks else (None, None))
                inst = decode_instances([item] if is_polygon(item) else item, h, w)
                gt = GroundTruth.from_masks(inst, inst[0].shape if inst else (h, w))
            for m in gt.instances:
                if masks and m.shape != masks[0].shape:
                    raise DataError(f"GT masks of one sample differ in size: {m.shape} vs {masks[0].shape}")
                masks.append(m)
            if gt.ignore is not None:
                ignore = gt.ignore if ignore is None else (ignore | gt.ignore)
        shape = masks[0].shape if masks else (size or image_size(image))
        return GroundTruth.from_masks(masks, tuple(shape), box=box, ignore=ignore)

    return load


def read_plain(json_path: Path, data_root: Path, prompt: PromptFn = roborefit_prompt) -> list[Sample]:
    """A JSON list / JSONL of {image, text, mask? | masks?, id?, scene?, bbox?, height?, width?}.

    `mask` or `masks` (not both) is a PNG path (or folder of PNGs, one per instance), a
    COCO RLE dict, or a list of PNG paths / RLE dicts / polygons, merged into one GT (one
    instance each; an empty list: no target); absent/null means predict-only.
    """
    out = []
    for rec, where, text, sid in identified_records(json_path, "text", "question", "expression"):
        if rec.get("mask") is not None and rec.get("masks") is not None:
            raise FormatError(f"{where}: both 'mask' and 'masks' given; use one")
        mask = rec.get("mask") if rec.get("mask") is not None else rec.get("masks")
        box = parse_box(rec.get("bbox"), where)
        image = resolve_path(data_root, field_of(rec, "image", where=where))
        out.append(Sample(
            sample_id=sid,
            image=image,
            text=text,
            **prompted(prompt, text),
            group=str(rec["scene"]) if rec.get("scene") is not None else None,
            load_gt=None if mask is None else _plain_gt(mask, data_root, image, size_of(rec), box),
        ))
    return out


def read_frames(folder: Path, prompt: PromptFn = roborefit_prompt) -> list[Sample]:
    """A folder of `image_<id>.png` + `text_<id>.txt` (+ `mask_<id>.png`), as in
    shared/data/roborefit_example/."""
    folder = Path(folder)
    images = sorted(folder.glob("image_*.png"))
    if not images:
        raise FormatError(f"{folder}: no image_<id>.png files")
    out = []
    for img in images:
        key = img.stem[len("image_"):]
        txt = folder / f"text_{key}.txt"
        if not txt.is_file():
            raise FormatError(f"{folder}: {img.name} has no {txt.name}")
        text = strip_quotes(txt.read_text(encoding="utf-8"))
        mask = folder / f"mask_{key}.png"
        out.append(Sample(
            sample_id=key, image=img, text=text, **prompted(prompt, text),
            load_gt=mask_path_gt(mask) if mask.exists() else None,
        ))
    return out


def detect_roborefit_format(path: Path) -> str:
    """'frames', 'official', 'qa' or 'plain', from the path and the first record's fields."""
    path = Path(path)
    if path.is_dir():
        return "frames"
    recs = load_json_records(path)
    if not recs:
        raise FormatError(f"{path}: no records")
    keys = set(recs[0])
    if "rgb_path" in keys:
        return "official"
    if "masks" in keys and ("question" in keys or "expression" in keys):
        return "qa"
    if "image" in keys and ({"text", "question", "expression"} & keys):
        return "plain"
    raise FormatError(f"{path}: unknown RoboRefIt question format (first record has {sorted(keys)})")


def read_roborefit(path: Path, data_root: Path | None = None, fmt: str = "auto",
                   prompt: PromptFn = roborefit_prompt) -> list[Sample]:
    """Any RoboRefIt question format (auto-detected unless `fmt` says)."""
    path = Path(path)
    fmt = detect_roborefit_format(path) if fmt == "auto" else fmt
    if fmt == "frames":
        return read_frames(path, prompt)
    if data_root is None:
        # official paths start at the folder holding final_dataset/
        data_root = path.parents[2] if fmt == "official" and len(path.parents) > 2 else path.parent
    readers = {"official": read_roborefit_official, "qa": read_roborefit_qa, "plain": read_plain}
    if fmt not in readers:
        raise FormatError(f"unknown format {fmt!r}; choose from auto, frames, {', '.join(readers)}")
    return readers[fmt](path, Path(data_root), prompt)


SPEC = BenchmarkSpec(
    name="roborefit",
    title="RoboRefIt",
    score_threshold=0.5,
    iou=INSTRUCTSAM_IOU,  # the official formula: I / (U + 1e-12) -> 0 for two empty masks
    instance_ious=False,
    mean_iou_name="miou",
    group_by="group",  # the dataset's scene field
    paper={"testA": {"miou": 82.5}, "testB": {"miou": 74.4}},
    headline=(("miou", "mask mIoU (%)"), ("ciou", "mask cIoU (%)"), ("p@0.5", "P@50 (%)"),
              ("p@0.7", "P@70 (%)"), ("p@0.9", "P@90 (%)"), ("box_acc@0.5", "box Acc@0.5 (%)"),
              ("box_miou", "box mIoU (%)"), ("empty_pred_rate", "empty predictions (%)")),
)


@guarded
def main(argv: list[str] | None = None) -> int:
    """Entry point of `instructsam-eval-roborefit`."""
    p = base_parser(SPEC, "RoboRefIt benchmark (mask mIoU on testA/testB next to the paper's table).")
    p.add_argument("--data-root", "--image-folder", type=Path, default=None,
                   help="folder holding final_dataset/ (official layout), or the root of the "
                   "relative image/mask paths of --question-file (unset: the file's folder)")
    p.add_argument("--splits", nargs="+", default=["testA", "testB"], help="official-layout splits")
    p.add_argument("--question-file", type=Path, default=None,
                   help="a question file (official JSON, official-eval QA JSON, plain JSON/JSONL) or a "
                   "frames folder, instead of the official layout")
    p.add_argument("--split-name", default=None, help="split name of --question-file (default: its stem)")
    p.add_argument("--format", default="auto", choices=["auto", "official", "qa", "plain", "frames"],
                   help="format of --question-file")
    args = p.parse_args(argv)
    prompt = prompt_from_args(args, roborefit_prompt)
    if args.question_file is not None:
        splits = [(args.split_name or split_name(args.question_file),
                   read_roborefit(args.question_file, args.data_root, args.format, prompt))]
    elif args.data_root is not None:
        splits = [(s, read_roborefit(roborefit_official_file(args.data_root, s), args.data_root, "official", prompt))
                  for s in args.splits]
    else:
        p.error("give --data-root (official layout) or --question-file")
    run_benchmark(SPEC, splits, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
