"""`instructsam` command line.

    instructsam segment --checkpoint DIR --image IMG --instruction "the red mug" --out overlay.png

Prints the instances as JSON on stdout and writes the overlay. Without `--checkpoint` the
shipped default model runs (trained on the synthetic tabletop world only); `--checkpoint
tiny` is the tiny UNTRAINED test model; `--image sample` a procedural scene of that world.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

import numpy as np
from PIL import Image

from .build import DEFAULT_MODEL
from .export.commands import add_commands as add_acceleration_commands


def _load_image(spec: str) -> np.ndarray:
    if spec.startswith("sample"):
        from .sample_images import random_scene

        seed = int(spec.split(":", 1)[1]) if ":" in spec else 0
        return random_scene(seed).image
    from .processing import load_rgb

    try:
        return load_rgb(spec)
    except FileNotFoundError as err:
        raise SystemExit(f"error: image {spec} does not exist") from err
    except ValueError as err:
        raise SystemExit(f"error: cannot read image: {err}") from err


def cmd_segment(args: argparse.Namespace) -> int:
    from .engine import DEFAULT_MODEL_NOTE, Segmenter
    from .fileio import atomic_file
    from .visualize import draw_overlay

    image = _load_image(args.image)
    try:
        # An option left out keeps the checkpoint's own setting (its engine_config.json).
        nms = {} if args.mask_nms_iou is None else {"mask_nms_iou": args.mask_nms_iou}
        seg = Segmenter.from_pretrained(args.checkpoint, device=args.device, dtype=args.dtype,
                                        max_new_tokens=args.max_new_tokens, **nms)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: cannot load checkpoint {args.checkpoint!r}: {err}") from err
    # The engine logs the untrained-model warning; the overlay and the JSON say it too.
    banner = "UNTRAINED tiny model: masks are random" if seg.is_untrained else ""
    if args.checkpoint == DEFAULT_MODEL:
        print(f"note: {DEFAULT_MODEL_NOTE}", file=sys.stderr)
        banner = "default model: knows only the synthetic tabletop world"
    try:
        result = seg.segment_image(image, args.instruction, score_threshold=args.score_threshold,
                                   max_instances=args.max_instances)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from err
    report = result.to_json()
    report.update(instruction=args.instruction, checkpoint=args.checkpoint, untrained=seg.is_untrained)
    if args.out:
        with atomic_file(args.out) as tmp:
            Image.fromarray(draw_overlay(image, result, args.instruction, banner=banner)).save(tmp, format="PNG")
        report["overlay"] = str(args.out)
    print(json.dumps(report, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="instructsam", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    seg = sub.add_parser("segment", help="segment one image with one instruction")
    seg.add_argument("--checkpoint", default=DEFAULT_MODEL,
                     help="checkpoint directory; 'default' (the shipped model, synthetic tabletop world only) "
                          "or 'tiny' (untrained test model)")
    seg.add_argument("--image", default="sample",
                     help="image file, or 'sample[:seed]' for a procedural scene of the synthetic world")
    seg.add_argument("--instruction", required=True, help="what to segment, e.g. 'the red mug'")
    seg.add_argument("--out", default="", help="write the overlay PNG here")
    seg.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    seg.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16 or float16")
    seg.add_argument("--score-threshold", type=float, default=0.5, help="keep instances scoring above this")
    seg.add_argument("--max-instances", type=int, default=None, help="at most this many instances")
    seg.add_argument("--max-new-tokens", type=int, default=1024,
                     help="generation budget (the release's 1024); lower cuts long answers (see README, Malformed answers)")
    seg.add_argument("--mask-nms-iou", type=float, default=None,
                     help="drop a mask overlapping a better one above this IoU; 1 = off (default: the "
                          "checkpoint's engine_config.json, else off as the release)")
    seg.set_defaults(func=cmd_segment)
    add_acceleration_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
