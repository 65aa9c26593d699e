"""Readers of the benchmark question files, one function per format.

Every reader returns a list of `Sample`s; GT masks are decoded lazily, inside the
runner, so that one bad mask fails one sample instead of the whole run. Formats (see
docs/evaluation.md for the fields):

- RoboRefIt official: `final_dataset/{split}/roborefit_{split}.json`.
- RoboRefIt QA: the official evaluation's preprocessed list {image, question, masks}.
- plain: a JSON list or JSONL of {image, text, mask? | masks?, id?, scene?, bbox?}.
- frames: a folder of `image_<id>.png` + `text_<id>.txt` (+ optional `mask_<id>.png`).
- Inst2Seg, ReasonSeg, gRefCOCO: the question files the official scripts read.
"""

from __future__ import annotations

import json
from pathlib import Path, PureWindowsPath
from typing import Any, Callable

from training.eval.masks import DataError, _is_polygon, decode_instances, read_png_mask
from training.eval.prompts import (
    PromptFn, build_instruction, grefcoco_prompt, inst2seg_prompt, reasonseg_prompt, roborefit_prompt, strip_quotes,
)
from training.eval.samples import GroundTruth, Sample


class FormatError(ValueError):
    """A question file as a whole is not in the expected format."""


# --------------------------------------------------------------------------- helpers


def load_json_records(path: Path) -> list[dict]:
    """Records of a JSON list or a JSONL file (blank lines skipped).

    Raises:
        FormatError: missing file, invalid JSON, or not a list of objects.
    """
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"question file not found: {path}")
    text = path.read_text(encoding="utf-8-sig")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                data.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise FormatError(f"{path}:{n}: neither a JSON document nor JSON lines: {e}") from e
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise FormatError(f"{path}: expected a list of JSON objects")
    return data


def resolve_path(root: Path, raw: str) -> Path:
    """A dataset path (Windows backslashes allowed) resolved against `root`.

    Tries `root/raw`, then, for RoboRefIt's `final_dataset\\...` paths, the same path
    below root's parent when root already is `final_dataset`. Returns the first that
    exists, else `root/raw` (the runner then reports it missing).
    """
    raw = str(raw)
    parts = PureWindowsPath(raw).parts if "\\" in raw else Path(raw).parts
    rel = Path(*parts) if parts else Path(raw)
    if rel.is_absolute():
        return rel
    candidates = [root / rel]
    if parts and parts[0] == root.name:
        candidates.append(root.parent / rel)
    for c in candidates:
        if c.exists():
            return c
    return candidates[0]


def _prompted(prompt: PromptFn, text: str) -> dict:
    """`instruction` and `error` of a Sample: an expression the prompt builder rejects
    (empty) fails that sample in the runner instead of aborting the whole file."""
    instruction, error = build_instruction(prompt, text)
    return {"instruction": instruction, "error": error}


def _check_id(sid: str, ids: set[str], where: str) -> None:
    if sid in ids:
        raise FormatError(f"{where}: duplicate id {sid!r}")
    ids.add(sid)


def _field(rec: dict, *names: str, where: str) -> Any:
    for n in names:
        if n in rec:
            return rec[n]
    raise FormatError(f"{where}: missing field {' or '.join(repr(n) for n in names)}")


def _png_gt(paths: list[Path], box: tuple | None = None, ignore_value: int | None = None) -> GroundTruth:
    masks, ignore = [], None
    for p in paths:
        m, ign = read_png_mask(p, ignore_value=ignore_value)
        if masks and m.shape != masks[0].shape:
            raise DataError(f"GT masks of one sample differ in size: {p} is {m.shape}, expected {masks[0].shape}")
        masks.append(m)
        if ign is not None:
            ignore = ign if ignore is None else (ignore | ign)
    return GroundTruth.from_masks(masks, masks[0].shape, box=box, ignore=ignore)


def _mask_path_gt(path: Path, box: tuple | None = None, ignore_value: int | None = None) -> Callable[[], GroundTruth]:
    """GT from a mask PNG, or from a folder of PNGs (one instance each). A `<name>.png`
    that does not exist next to a folder `<name>/` means that folder (RoboRefIt's
    `mask/<num>/<k>.png` layout)."""

    def load() -> GroundTruth:
        target = path
        if not path.exists() and path.suffix and path.with_suffix("").is_dir():
            target = path.with_suffix("")
        if target.is_dir():
            files = sorted(p for p in target.iterdir() if p.suffix.lower() == ".png")
            if not files:
                raise DataError(f"GT mask folder has no PNG: {target}")
            return _png_gt(files, box, ignore_value)
        return _png_gt([target], box, ignore_value)

    return load


def _ann_gt(ann: Any, size: tuple[int, int] | None, box: tuple | None = None,
            ignore_ann: Any = None) -> Callable[[], GroundTruth]:
    """GT from a COCO-style annotation (RLE / polygons / lists of them)."""

    def load() -> GroundTruth:
        h, w = size if size else (None, None)
        inst = decode_instances(ann, h, w)
        shape = inst[0].shape if inst else size
        if shape is None:
            raise DataError("an empty GT annotation needs the image height and width")
        ignore = None
        if ignore_ann is not None:
            ign = decode_instances(ignore_ann, shape[0], shape[1])
            ignore = GroundTruth.from_masks(ign, shape).union if ign else None
        return GroundTruth.from_masks(inst, tuple(shape), box=box, ignore=ignore)

    return load


def _box(value: Any, where: str) -> tuple[float, float, float, float] | None:
    if value is None:
        return None
    try:
        box = tuple(float(v) for v in value)
    except (TypeError, ValueError) as e:
        raise FormatError(f"{where}: bbox must be 4 numbers, got {value!r}") from e
    if len(box) != 4:
        raise FormatError(f"{where}: bbox must be 4 numbers x1, y1, x2, y2, got {value!r}")
    return box  # type: ignore[return-value]


def _size(rec: dict) -> tuple[int, int] | None:
    if "height" in rec and "width" in rec:
        return int(rec["height"]), int(rec["width"])
    return None


# --------------------------------------------------------------------------- RoboRefIt


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
        text = strip_quotes(_field(rec, "text", where=where))
        mask_raw = rec.get("mask_path")
        box = _box(rec.get("bbox"), where)
        out.append(Sample(
            sample_id=f"{i:06d}",
            image=resolve_path(data_root, _field(rec, "rgb_path", where=where)),
            text=text,
            **_prompted(prompt, text),
            group=str(rec["scene"]) if rec.get("scene") is not None else None,
            load_gt=_mask_path_gt(resolve_path(data_root, mask_raw), box) if mask_raw else None,
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
    ids: set[str] = set()
    for i, rec in enumerate(load_json_records(json_path)):
        where = f"{json_path}[{i}]"
        text = strip_quotes(_field(rec, "question", "expression", "text", where=where))
        sid = str(rec.get("id", f"{i:06d}"))
        _check_id(sid, ids, where)
        ann = rec.get("masks")
        out.append(Sample(
            sample_id=sid,
            image=resolve_path(data_root, _field(rec, "image", where=where)),
            text=text,
            **_prompted(prompt, text),
            group=str(rec["scene"]) if rec.get("scene") is not None else None,
            load_gt=_ann_gt(ann, _size(rec), _box(rec.get("bbox"), where)) if ann is not None else None,
        ))
    return out


def _plain_gt(ann: Any, data_root: Path, image: Path, size: tuple[int, int] | None,
              box: tuple | None) -> Callable[[], GroundTruth]:
    """GT of a plain record's `mask`/`masks`: a PNG path (or folder), a COCO RLE dict or
    polygon list, or a list of any of these (one or more instances each), all merged into
    one GroundTruth. An empty list is a no-target GT (its size from height/width, else
    from the image)."""
    if isinstance(ann, str):
        return _mask_path_gt(resolve_path(data_root, ann), box)
    if not isinstance(ann, (list, tuple)) or (ann and all(_is_polygon(p) for p in ann)):
        return _ann_gt(ann, size, box)

    def load() -> GroundTruth:
        masks, ignore = [], None
        for item in ann:
            if isinstance(item, str):
                gt = _mask_path_gt(resolve_path(data_root, item))()
            else:
                h, w = size if size else (masks[0].shape if masks else (None, None))
                inst = decode_instances([item] if _is_polygon(item) else item, h, w)
                gt = GroundTruth.from_masks(inst, inst[0].shape if inst else (h, w))
            for m in gt.instances:
                if masks and m.shape != masks[0].shape:
                    raise DataError(f"GT masks of one sample differ in size: {m.shape} vs {masks[0].shape}")
                masks.append(m)
            if gt.ignore is not None:
                ignore = gt.ignore if ignore is None else (ignore | gt.ignore)
        shape = masks[0].shape if masks else (size or _image_size(image))
        return GroundTruth.from_masks(masks, tuple(shape), box=box, ignore=ignore)

    return load


def _image_size(image: Path) -> tuple[int, int]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(image) as im:
            # upright, as the image will be read (EXIF orientations 5-8 turn it sideways)
            turned = im.getexif().get(0x0112, 1) in (5, 6, 7, 8)
            return (im.width, im.height) if turned else (im.height, im.width)
    except (FileNotFoundError, UnidentifiedImageError, OSError) as e:
        raise DataError(f"a no-target GT needs the image size: {e}") from e


def read_plain(json_path: Path, data_root: Path, prompt: PromptFn = roborefit_prompt) -> list[Sample]:
    """A JSON list / JSONL of {image, text, mask? | masks?, id?, scene?, bbox?, height?, width?}.

    `mask` or `masks` (not both) is a PNG path (or folder of PNGs, one per instance), a
    COCO RLE dict, or a list of PNG paths / RLE dicts / polygons, merged into one GT (one
    instance each; an empty list: no target); absent/null means predict-only.
    """
    out = []
    ids: set[str] = set()
    for i, rec in enumerate(load_json_records(json_path)):
        where = f"{json_path}[{i}]"
        text = strip_quotes(_field(rec, "text", "question", "expression", where=where))
        sid = str(rec.get("id", f"{i:06d}"))
        _check_id(sid, ids, where)
        if rec.get("mask") is not None and rec.get("masks") is not None:
            raise FormatError(f"{where}: both 'mask' and 'masks' given; use one")
        mask = rec.get("mask") if rec.get("mask") is not None else rec.get("masks")
        box = _box(rec.get("bbox"), where)
        image = resolve_path(data_root, _field(rec, "image", where=where))
        out.append(Sample(
            sample_id=sid,
            image=image,
            text=text,
            **_prompted(prompt, text),
            group=str(rec["scene"]) if rec.get("scene") is not None else None,
            load_gt=None if mask is None else _plain_gt(mask, data_root, image, _size(rec), box),
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
            sample_id=key, image=img, text=text, **_prompted(prompt, text),
            load_gt=_mask_path_gt(mask) if mask.exists() else None,
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


# --------------------------------------------------------------------------- other benchmarks


def read_inst2seg(json_path: Path, data_root: Path, prompt: PromptFn = inst2seg_prompt) -> list[Sample]:
    """Inst2Seg: [{image, height, width, annotation: [{text, mask?}]}], one sample per annotation.

    An annotation without `mask` is a no-target query (GT of zero instances).
    """
    out = []
    for i, rec in enumerate(load_json_records(json_path)):
        where = f"{json_path}[{i}]"
        image = resolve_path(data_root, _field(rec, "image", where=where))
        size = _size(rec)
        if size is None:
            raise FormatError(f"{where}: missing 'height'/'width'")
        anns = _field(rec, "annotation", where=where)
        for j, ann in enumerate(anns):
            text = strip_quotes(_field(ann, "text", where=f"{where}.annotation[{j}]"))
            out.append(Sample(
                sample_id=f"{i:06d}-{j}", image=image, text=text, **_prompted(prompt, text),
                load_gt=_ann_gt(ann.get("mask"), size),
            ))
    return out


def read_reasonseg(json_path: Path, data_root: Path, prompt: PromptFn | None = None) -> list[Sample]:
    """ReasonSeg: [{image, question, is_sentence, mask, ignore_mask?}]; group 'long'/'short'.

    `mask` is an RLE/polygon annotation, or a PNG path whose 255 pixels are ignored
    (LISA). `question` may also be a list (one sample each). `prompt` overrides the official
    construction (`reasonseg_prompt`) for both groups.
    """
    out = []
    for i, rec in enumerate(load_json_records(json_path)):
        where = f"{json_path}[{i}]"
        q = _field(rec, "question", "text", where=where)
        questions = q if isinstance(q, list) else [q]
        is_sentence = bool(rec.get("is_sentence", False))
        mask = _field(rec, "mask", where=where)
        if isinstance(mask, str):  # a PNG: 255 is ignored in LISA's 0/1/255 layout, the object in a 0/255 one
            load = _mask_path_gt(resolve_path(data_root, mask), ignore_value=255)
        else:
            load = _ann_gt(mask, _size(rec), ignore_ann=rec.get("ignore_mask"))
        for j, qq in enumerate(questions):
            text = strip_quotes(qq)
            out.append(Sample(
                sample_id=f"{i:06d}" if len(questions) == 1 else f"{i:06d}-{j}",
                image=resolve_path(data_root, _field(rec, "image", where=where)),
                text=text,
                **_prompted(prompt or (lambda t, s=is_sentence: reasonseg_prompt(t, s)), text),
                group="long" if is_sentence else "short",
                load_gt=load,
            ))
    return out


def grefcoco_image_path(data_root: Path, image: str) -> Path:
    """Where the official gRefCOCO script finds an image: `coco/train2017/<suffix>` if it
    exists, else `coco/val2017/<suffix>` (suffix = name after the last '_'); the path as
    given is tried last."""
    suffix = str(image).split("_")[-1]
    for c in (data_root / "coco" / "train2017" / suffix, data_root / "coco" / "val2017" / suffix):
        if c.is_file():
            return c
    given = resolve_path(data_root, image)
    return given if given.is_file() else data_root / "coco" / "val2017" / suffix


def read_grefcoco(json_path: Path, data_root: Path, prompt: PromptFn = grefcoco_prompt) -> list[Sample]:
    """gRefCOCO (official AP script): [{image, height, width, cat: [expr], masks: [ann]}].

    One sample per expression; `masks[k]` holds its GT instances (an empty list: no target).
    """
    out = []
    for i, rec in enumerate(load_json_records(json_path)):
        where = f"{json_path}[{i}]"
        size = _size(rec)
        if size is None:
            raise FormatError(f"{where}: missing 'height'/'width'")
        cats = _field(rec, "cat", where=where)
        masks = _field(rec, "masks", where=where)
        if len(cats) != len(masks):
            raise FormatError(f"{where}: {len(cats)} expressions but {len(masks)} mask entries")
        image = grefcoco_image_path(Path(data_root), _field(rec, "image", where=where))
        for k, (cat, ann) in enumerate(zip(cats, masks)):
            text = strip_quotes(cat)
            out.append(Sample(
                sample_id=f"{i:06d}-{k}", image=image, text=text, **_prompted(prompt, text),
                load_gt=_ann_gt(ann, size),
            ))
    return out
