"""ReasonSeg (LISA): gIoU and cIoU, overall and short/long queries.

    instructsam-eval-reasonseg --checkpoint CKPT --question-file data/eval/reason_seg_val.json \
        data/eval/reason_seg_test.json --data-root data --output-dir OUT

Question file (official evaluation): [{image, question, is_sentence, mask, ignore_mask?}].
Prompt: long (is_sentence) "<q> Please output the segmentation mask.", short "Please
segment the '<q>' in the image."; threshold 0.3; ignored pixels (ignore_mask, or 255 in
a PNG GT) leave both masks; IoU 1.0 when both are empty.
"""

from __future__ import annotations

from pathlib import Path

from instructsam_core.metrics import LISA_IOU
from training.eval.cli import base_parser, guarded, prompt_from_args, run_benchmark, split_name
from training.eval.readers import read_reasonseg
from training.eval.summary import BenchmarkSpec

SPEC = BenchmarkSpec(
    name="reasonseg",
    title="ReasonSeg",
    score_threshold=0.3,
    iou=LISA_IOU,
    instance_ious=False,
    mean_iou_name="giou",
    group_by="group",  # short / long
    paper={"val": {"giou": 62.5, "ciou": 65.0}},
    table_groups=True,
    headline=(("giou", "gIoU (%)"), ("ciou", "cIoU (%)")),
)


@guarded
def main(argv: list[str] | None = None) -> int:
    """Entry point of `instructsam-eval-reasonseg`."""
    p = base_parser(SPEC, "ReasonSeg benchmark (gIoU, cIoU; short/long).")
    p.add_argument("--question-file", type=Path, nargs="+", required=True, help="official question file(s)")
    p.add_argument("--data-root", "--image-folder", type=Path, required=True, help="root of the image paths")
    args = p.parse_args(argv)
    prompt = prompt_from_args(args, None)
    splits = [(split_name(f), read_reasonseg(f, args.data_root, prompt)) for f in args.question_file]
    run_benchmark(SPEC, splits, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
