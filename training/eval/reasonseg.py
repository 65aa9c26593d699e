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

from training.eval.cli import base_parser, guarded, prompt_from_args, run_benchmark, split_name
from training.eval.prompts import PromptFn, reasonseg_prompt, strip_quotes
from training.eval.readers import ann_gt, field_of, load_json_records, mask_path_gt, prompted, resolve_path, size_of
from training.eval.samples import Sample
from training.eval.summary import BenchmarkSpec
from training.metrics import LISA_IOU

def read_reasonseg(json_path: Path, data_root: Path, prompt: PromptFn | None = None) -> list[Sample]:
    """ReasonSeg: [{image, question, is_sentence, mask, ignore_mask?}]; group 'long'/'short'.

    `mask` is an RLE/polygon annotation, or a PNG path whose 255 pixels are ignored
    (LISA). `question` may also be a list (one sample each). `prompt` overrides the official
    construction (`reasonseg_prompt`) for both groups.
    """
    out = []
    for i, rec in enumerate(load_json_records(json_path)):
        where = f"{json_path}[{i}]"
        q = field_of(rec, "question", "text", where=where)
        questions = q if isinstance(q, list) else [q]
        is_sentence = bool(rec.get("is_sentence", False))
        mask = field_of(rec, "mask", where=where)
        if isinstance(mask, str):  # a PNG: 255 is ignored in LISA's 0/1/255 layout, the object in a 0/255 one
            load = mask_path_gt(resolve_path(data_root, mask), ignore_value=255)
        else:
            load = ann_gt(mask, size_of(rec), ignore_ann=rec.get("ignore_mask"))
        for j, qq in enumerate(questions):
            text = strip_quotes(qq)
            out.append(Sample(
                sample_id=f"{i:06d}" if len(questions) == 1 else f"{i:06d}-{j}",
                image=resolve_path(data_root, field_of(rec, "image", where=where)),
                text=text,
                **prompted(prompt or (lambda t, s=is_sentence: reasonseg_prompt(t, s)), text),
                group="long" if is_sentence else "short",
                load_gt=load,
            ))
    return out


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
