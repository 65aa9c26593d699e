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

from instructsam_core.metrics import INSTRUCTSAM_IOU
from training.eval.cli import base_parser, guarded, prompt_from_args, run_benchmark, split_name
from training.eval.prompts import roborefit_prompt
from training.eval.readers import read_roborefit, roborefit_official_file
from training.eval.summary import BenchmarkSpec

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
