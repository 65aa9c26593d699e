"""RefCOCO, RefCOCO+, RefCOCOg and RefCLEF in the refer toolkit's files, and gRefCOCO in
its own (the same layout, several or no objects per expression).

    refcoco/refs(unc).p     refcoco/instances.json      refer (github.com/lichengunc/refer);
                                                        also refs(google).p, refs(umd).p
    grefcoco/grefs(unc).json grefcoco/instances.json    gRefCOCO (github.com/henghuiding/gRefCOCO)

`refs`: a list of {ref_id, image_id, ann_id, category_id, split, sentences: [{sent_id,
sent, raw, tokens}], ...}; in gRefCOCO `ann_id` is a list of annotation ids, `[-1]` when
the expression names no object. `instances.json` is COCO's: images {id, file_name,
height, width} and annotations {id, image_id, segmentation (polygons, or RLE in
RefCLEF), iscrowd, ...}. The refer toolkit's refs are pickles: they are read by
`plain_pickle.load_plain_pickle` (plain data only, never `pickle.load`), or converted to
JSON once with `python -m training.datasets.plain_pickle`; a `.json` path is read as JSON.

Images, unless `data_root` names their folder: the toolkits' layouts next to the dataset
folder, `images/mscoco/images/train2014` (refer; `images/saiapr_tc-12` for RefCLEF) or
`images/train2014` (gRefCOCO). One question per sentence, "Can you segment '<sentence>'
in the image?"; crowd annotations are left out of the GT, as gRefCOCO's loader does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from training.datasets.plain_pickle import load_plain_pickle
from training.eval.masks import DataError
from training.eval.prompts import grefcoco_prompt, strip_quotes
from training.eval.readers import FormatError, ann_gt, field_of, prompted
from training.eval.samples import GroundTruth, Sample


def load_refs(path: Path) -> list[dict]:
    """The refs of a `refs(*).p` (plain-data pickle) or `refs(*).json` file."""
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"refs file not found: {path}")
    if path.suffix == ".json":
        try:
            refs = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise FormatError(f"{path}: not valid JSON: {err}") from err
    else:
        import pickle

        try:
            refs = load_plain_pickle(path)
        except pickle.UnpicklingError as err:
            raise FormatError(str(err)) from err
    if not isinstance(refs, list) or not all(isinstance(r, dict) for r in refs):
        raise FormatError(f"{path}: expected a list of refs (objects)")
    return refs


def default_image_dir(refs_path: Path, multi: bool) -> Path:
    """Where the toolkit finds the images of a dataset folder's refs file."""
    dataset = refs_path.parent
    if multi:
        return dataset.parent / "images" / "train2014"
    if dataset.name == "refclef":
        return dataset.parent / "images" / "saiapr_tc-12"
    return dataset.parent / "images" / "mscoco" / "images" / "train2014"


def _ref_gt(anns: list[dict], size: tuple[int, int], where: str):
    segmentations = [a["segmentation"] for a in anns if not a.get("iscrowd")]
    if anns and not segmentations:
        def crowd_only() -> GroundTruth:
            raise DataError(f"{where}: the expression's objects are all crowd annotations")
        return crowd_only
    load_each = [ann_gt(s, size) for s in segmentations]

    def load() -> GroundTruth:
        # each annotation is one instance (its polygons or RLEs merged, as the toolkits do)
        return GroundTruth.from_masks([each().union for each in load_each], size)

    return load


def read_refer(refs_path: Path, split: str, data_root: Path | None = None, multi: bool = False) -> list[Sample]:
    """One sample per sentence of the refs of `split` (e.g. train, val, testA); `multi`:
    gRefCOCO's refs (a list of annotation ids per expression, [-1] for none)."""
    refs_path = Path(refs_path)
    refs = load_refs(refs_path)
    instances_path = refs_path.parent / "instances.json"
    if not instances_path.is_file():
        raise FormatError(f"{refs_path}: no instances.json next to it")
    try:
        instances = json.loads(instances_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise FormatError(f"{instances_path}: not valid JSON: {err}") from err
    images = {img["id"]: img for img in field_of(instances, "images", where=str(instances_path))}
    anns = {a["id"]: a for a in field_of(instances, "annotations", where=str(instances_path))}
    image_dir = Path(data_root) if data_root else default_image_dir(refs_path, multi)
    splits = {str(r.get("split")) for r in refs}
    if split not in splits:
        raise FormatError(f"{refs_path}: no refs of split {split!r}; it has {', '.join(sorted(splits))}")
    out = []
    for i, ref in enumerate(refs):
        if ref.get("split") != split:
            continue
        where = f"{refs_path}[{i}]"
        image = images.get(field_of(ref, "image_id", where=where))
        if image is None:
            raise FormatError(f"{where}: image_id {ref['image_id']} is not in {instances_path}")
        ann_ids: Any = field_of(ref, "ann_id", where=where)
        ann_ids = ann_ids if isinstance(ann_ids, list) else [ann_ids]
        ann_ids = [a for a in ann_ids if a != -1]  # gRefCOCO's "no object"
        missing = [a for a in ann_ids if a not in anns]
        if missing:
            raise FormatError(f"{where}: annotation ids {missing[:3]} are not in {instances_path}")
        load = _ref_gt([anns[a] for a in ann_ids], (int(image["height"]), int(image["width"])), where)
        for k, sentence in enumerate(field_of(ref, "sentences", where=where)):
            text = strip_quotes(sentence.get("sent", sentence.get("raw", "")))
            out.append(Sample(
                sample_id=f"{ref.get('ref_id', i)}-{sentence.get('sent_id', k)}", image=image_dir / image["file_name"],
                text=text, **prompted(grefcoco_prompt, text), load_gt=load, meta={"image_id": ref["image_id"]}))
    return out
