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

from instructsam_core.metrics import GRES_IOU
from training.eval.cli import base_parser, guarded, prompt_from_args, run_benchmark, split_name
from training.eval.prompts import grefcoco_prompt
from training.eval.readers import read_grefcoco
from training.eval.summary import BenchmarkSpec

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
