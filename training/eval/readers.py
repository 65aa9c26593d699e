"""What the benchmarks' question-file readers share: JSON records, dataset paths, fields,
lazy GT loaders.

Each benchmark's own reader lives with it (`roborefit.py`, `inst2seg.py`, `reasonseg.py`,
`grefcoco.py`). Every reader returns a list of `Sample`s; GT masks are decoded lazily,
inside the runner, so that one bad mask fails one sample instead of the whole run.
"""

from __future__ import annotations

import json
from pathlib import Path, PureWindowsPath
from typing import Any, Callable, Iterator

from training.eval.masks import DataError, decode_instances, read_png_mask
from training.eval.prompts import PromptFn, build_instruction, strip_quotes
from training.eval.samples import GroundTruth


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


def prompted(prompt: PromptFn, text: str) -> dict:
    """`instruction` and `error` of a Sample: an expression the prompt builder rejects
    (empty) fails that sample in the runner instead of aborting the whole file."""
    instruction, error = build_instruction(prompt, text)
    return {"instruction": instruction, "error": error}


def identified_records(json_path: Path, *text_fields: str) -> Iterator[tuple[dict, str, str, str]]:
    """`(record, where, text, id)` for each record of a JSON list: `text` from the first of
    `text_fields` present, quotes stripped; `id` the record's own, else its index. Two
    records sharing an id raise `FormatError` (resume and sharding key on ids)."""
    ids: set[str] = set()
    for i, rec in enumerate(load_json_records(json_path)):
        where = f"{json_path}[{i}]"
        text = strip_quotes(field_of(rec, *text_fields, where=where))
        sid = str(rec.get("id", f"{i:06d}"))
        if sid in ids:
            raise FormatError(f"{where}: duplicate id {sid!r}")
        ids.add(sid)
        yield rec, where, text, sid


def field_of(rec: dict, *names: str, where: str) -> Any:
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


def mask_path_gt(path: Path, box: tuple | None = None, ignore_value: int | None = None) -> Callable[[], GroundTruth]:
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


def ann_gt(ann: Any, size: tuple[int, int] | None, box: tuple | None = None,
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


def parse_box(value: Any, where: str) -> tuple[float, float, float, float] | None:
    if value is None:
        return None
    try:
        box = tuple(float(v) for v in value)
    except (TypeError, ValueError) as e:
        raise FormatError(f"{where}: bbox must be 4 numbers, got {value!r}") from e
    if len(box) != 4:
        raise FormatError(f"{where}: bbox must be 4 numbers x1, y1, x2, y2, got {value!r}")
    return box  # type: ignore[return-value]


def size_of(rec: dict) -> tuple[int, int] | None:
    if "height" in rec and "width" in rec:
        return int(rec["height"]), int(rec["width"])
    return None


def image_size(image: Path) -> tuple[int, int]:
    """`(H, W)` of an image file as it will be read (upright), without decoding it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(image) as im:
            # upright, as the image will be read (EXIF orientations 5-8 turn it sideways)
            turned = im.getexif().get(0x0112, 1) in (5, 6, 7, 8)
            return (im.width, im.height) if turned else (im.height, im.width)
    except (FileNotFoundError, UnidentifiedImageError, OSError) as e:
        raise DataError(f"the GT needs the image size: {e}") from e
