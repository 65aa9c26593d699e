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

from instructsam_core.metrics import GRES_IOU
from training.eval.cli import base_parser, guarded, prompt_from_args, run_benchmark, split_name
from training.eval.prompts import inst2seg_prompt
from training.eval.readers import read_inst2seg
from training.eval.summary import BenchmarkSpec

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
