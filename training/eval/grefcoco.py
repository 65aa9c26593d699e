"""gRefCOCO (GRES): instance mAP (InstructSAM's protocol), cIoU, gIoU, N-acc, T-acc.

    instructsam-eval-grefcoco --checkpoint CKPT --question-file data/eval/grefcoco_val.json \
        --data-root data --output-dir OUT

Question file (official AP script): [{image, height, width, cat: [expression], masks:
[annotation]}], one query per expression; images under DATA/coco/train2017 or
DATA/coco/val2017 by the name after the image's last '_'. Prompt: "Can you segment
'<expression>' in the image?"; threshold 0.3; an empty GT is a no-target query (the
positive class of N-acc), an empty prediction says "no target".
"""

from __future__ import annotations

from pathlib import Path

from training.eval.cli import base_parser, guarded, prompt_from_args, run_benchmark, split_name
from training.eval.prompts import PromptFn, grefcoco_prompt, strip_quotes
from training.eval.readers import FormatError, ann_gt, field_of, load_json_records, prompted, resolve_path, size_of
from training.eval.samples import Sample
from training.eval.summary import BenchmarkSpec
from training.metrics import GRES_IOU

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
        size = size_of(rec)
        if size is None:
            raise FormatError(f"{where}: missing 'height'/'width'")
        cats = field_of(rec, "cat", where=where)
        masks = field_of(rec, "masks", where=where)
        if len(cats) != len(masks):
            raise FormatError(f"{where}: {len(cats)} expressions but {len(masks)} mask entries")
        image = grefcoco_image_path(Path(data_root), field_of(rec, "image", where=where))
        for k, (cat, ann) in enumerate(zip(cats, masks)):
            text = strip_quotes(cat)
            out.append(Sample(
                sample_id=f"{i:06d}-{k}", image=image, text=text, **prompted(prompt, text),
                load_gt=ann_gt(ann, size),
            ))
    return out


SPEC = BenchmarkSpec(
    name="grefcoco",
    title="gRefCOCO",
    score_threshold=0.3,
    iou=GRES_IOU,
    instance_ious=True,
    mean_iou_name="giou",
    group_by="targets",
    paper={"val": {"mAP": 57.3, "ciou": 68.3}},
    table_groups=True,
    headline=(("mAP", "mask mAP@[.5:.95] (%)"), ("AP50", "AP50 (%)"), ("ciou", "cIoU (%)"),
              ("giou", "gIoU (%)"), ("n_acc", "N-acc (%)"), ("t_acc", "T-acc (%)")),
)


@guarded
def main(argv: list[str] | None = None) -> int:
    """Entry point of `instructsam-eval-grefcoco`."""
    p = base_parser(SPEC, "gRefCOCO benchmark (instance mAP, cIoU, gIoU, N-acc, T-acc).")
    p.add_argument("--question-file", type=Path, nargs="+", required=True, help="official question file(s)")
    p.add_argument("--data-root", "--image-folder", type=Path, required=True,
                   help="folder holding coco/train2017 and coco/val2017")
    args = p.parse_args(argv)
    prompt = prompt_from_args(args, grefcoco_prompt)
    splits = [(split_name(f), read_grefcoco(f, args.data_root, prompt)) for f in args.question_file]
    run_benchmark(SPEC, splits, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
