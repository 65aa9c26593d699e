"""Inst2Seg bench: instance mAP (InstructSAM's protocol) and gIoU/cIoU, overall and per
stratum (no-target / single / multi target).

    instructsam-eval-inst2seg --checkpoint CKPT --question-file data/eval/inst2seg.json \
        --data-root data --output-dir OUT

Question file (official evaluation): [{image, height, width, annotation: [{text,
mask?}]}]; a query without `mask` has no target. Prompt: text + " Please output the
segmentation mask." (unless present); threshold 0.3; IoU 1.0 when GT and prediction are
both empty.
"""

from __future__ import annotations

from pathlib import Path

from training.eval.cli import base_parser, guarded, prompt_from_args, run_benchmark, split_name
from training.eval.prompts import PromptFn, inst2seg_prompt, strip_quotes
from training.eval.readers import FormatError, ann_gt, field_of, load_json_records, prompted, resolve_path, size_of
from training.eval.samples import Sample
from training.eval.summary import BenchmarkSpec
from training.metrics import GRES_IOU

def read_inst2seg(json_path: Path, data_root: Path, prompt: PromptFn = inst2seg_prompt) -> list[Sample]:
    """Inst2Seg: [{image, height, width, annotation: [{text, mask?}]}], one sample per annotation.

    An annotation without `mask` is a no-target query (GT of zero instances).
    """
    out = []
    for i, rec in enumerate(load_json_records(json_path)):
        where = f"{json_path}[{i}]"
        image = resolve_path(data_root, field_of(rec, "image", where=where))
        size = size_of(rec)
        if size is None:
            raise FormatError(f"{where}: missing 'height'/'width'")
        anns = field_of(rec, "annotation", where=where)
        for j, ann in enumerate(anns):
            text = strip_quotes(field_of(ann, "text", where=f"{where}.annotation[{j}]"))
            out.append(Sample(
                sample_id=f"{i:06d}-{j}", image=image, text=text, **prompted(prompt, text),
                load_gt=ann_gt(ann.get("mask"), size),
            ))
    return out


SPEC = BenchmarkSpec(
    name="inst2seg",
    title="Inst2Seg",
    score_threshold=0.3,
    iou=GRES_IOU,
    instance_ious=True,
    mean_iou_name="giou",
    group_by="targets",
    paper={"*": {"mAP": 31.5, "giou": 60.4}},
    table_groups=True,
    headline=(("mAP", "mask mAP@[.5:.95] (%)"), ("AP50", "AP50 (%)"), ("AP75", "AP75 (%)"),
              ("giou", "gIoU (%)"), ("ciou", "cIoU (%)"), ("n_acc", "N-acc (%)"), ("t_acc", "T-acc (%)")),
)


@guarded
def main(argv: list[str] | None = None) -> int:
    """Entry point of `instructsam-eval-inst2seg`."""
    p = base_parser(SPEC, "Inst2Seg benchmark (instance mAP, gIoU; single/multi/no-target).")
    p.add_argument("--question-file", type=Path, nargs="+", required=True, help="official question file(s)")
    p.add_argument("--data-root", "--image-folder", type=Path, required=True, help="root of the image paths")
    args = p.parse_args(argv)
    prompt = prompt_from_args(args, inst2seg_prompt)
    splits = [(split_name(f), read_inst2seg(f, args.data_root, prompt)) for f in args.question_file]
    run_benchmark(SPEC, splits, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
