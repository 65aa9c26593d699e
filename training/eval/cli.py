"""Command-line plumbing shared by the benchmark scripts."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

from training.eval.prompts import PromptFn, template_prompt
from training.eval.readers import FormatError
from training.eval.runner import Predictor, RunConfig, parse_shard, read_split_logs, run_split, select
from training.eval.samples import Sample
from training.eval.summary import (
    BenchmarkSpec, markdown_table, run_info, summarize_split, write_json_atomic, write_text_atomic,
)

_DTYPES = ("auto", "float32", "bfloat16", "float16")


def _shard_arg(text: str) -> tuple[int, int]:
    try:
        return parse_shard(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def base_parser(spec: BenchmarkSpec, description: str) -> argparse.ArgumentParser:
    """Arguments every benchmark script takes (model, output, selection, resume)."""
    p = argparse.ArgumentParser(prog=f"instructsam-eval-{spec.name}", description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", help="checkpoint directory, or a preset name such as 'tiny' "
                   "(required unless --summarize-only)")
    p.add_argument("--output-dir", type=Path, required=True,
                   help="results go to OUTPUT_DIR/<split>/ (samples*.jsonl, summary.json, masks/)")
    p.add_argument("--device", default="auto", help="'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ...")
    p.add_argument("--dtype", default="auto", choices=_DTYPES, help="model dtype ('auto': the engine's default)")
    p.add_argument("--threshold", type=float, default=spec.score_threshold,
                   help="keep slots with sigmoid(score) > THRESHOLD (the paper's value by default)")
    p.add_argument("--mask-nms-iou", type=float, default=None,
                   help="engine duplicate suppression (drop a mask overlapping a better one above this IoU); "
                   "off by default, as in the official evaluation, where duplicates count as false positives")
    p.add_argument("--max-new-tokens", type=int, default=1024,
                   help="generation budget per query (the official evaluation's 1024)")
    p.add_argument("--prompt-template", default=None,
                   help="replace the paper's prompt construction by a template with a {text} placeholder")
    p.add_argument("--limit", type=int, default=None, help="only the first LIMIT samples of each split")
    p.add_argument("--shard", type=_shard_arg, default=None,
                   help="k/n: run the k-th (0-based) of n contiguous parts (one per GPU or machine)")
    p.add_argument("--save-masks", action="store_true", help="write each prediction as a label PNG")
    p.add_argument("--warmup", type=int, default=1, help="samples per run left out of the latency figures")
    p.add_argument("--retry-failed", action="store_true", help="rerun samples logged as failed")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--summarize-only", action="store_true",
                   help="run nothing: rebuild summary.json from the per-sample logs (e.g. after sharded runs)")
    return p


def prompt_from_args(args: argparse.Namespace, default: PromptFn | None) -> PromptFn | None:
    """The user's --prompt-template if given, else the benchmark's construction."""
    return template_prompt(args.prompt_template) if args.prompt_template else default


def load_predictor(args: argparse.Namespace) -> Predictor:
    """`Segmenter.from_pretrained` with the benchmark's engine settings (no duplicate
    suppression, the official generation budget) unless the arguments say otherwise."""
    from instructsam_core.engine import Segmenter

    return Segmenter.from_pretrained(args.checkpoint, device=args.device, dtype=args.dtype,
                                     mask_nms_iou=args.mask_nms_iou, max_new_tokens=args.max_new_tokens)


def _config(args: argparse.Namespace) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


def _previous_info(split_dir: Path) -> dict:
    try:
        old = json.loads((split_dir / "summary.json").read_text(encoding="utf-8"))
        return {k: old[k] for k in ("engine_config", "device", "dtype", "checkpoint", "untrained") if k in old}
    except (OSError, ValueError):
        return {"engine_config": None, "device": "unknown", "dtype": "unknown", "checkpoint": "unknown",
                "untrained": False}


def run_benchmark(spec: BenchmarkSpec, splits: list[tuple[str, list[Sample]]], args: argparse.Namespace,
                  predictor: Predictor | None = None) -> list[dict]:
    """Run (or, with --summarize-only, only summarise) each split; write summaries and
    results.md; print the Markdown table. Returns the summaries."""
    if not args.summarize_only and predictor is None:
        if not args.checkpoint:
            raise SystemExit(f"instructsam-eval-{spec.name}: --checkpoint is required unless --summarize-only")
        predictor = load_predictor(args)
    summaries = []
    for split, samples in splits:
        split_dir = Path(args.output_dir) / split
        cfg = RunConfig(
            split_dir=split_dir, score_threshold=args.threshold, limit=args.limit, shard=args.shard,
            save_masks=args.save_masks, warmup=args.warmup, retry_failed=args.retry_failed,
            progress=not args.no_progress, iou=spec.iou,
            instance_ious=spec.instance_ious,
        )
        if predictor is not None:
            stats = run_split(predictor, samples, cfg, desc=f"{spec.name} {split}")
            print(f"[{spec.name} {split}] {stats.selected} selected, {stats.skipped} already done, "
                  f"{stats.ran} run, {stats.failed} failed", file=sys.stderr)
            info = run_info(predictor)
        else:
            info = _previous_info(split_dir)
        expected = [s.sample_id for s in select(samples, args.limit)]
        summary = summarize_split(spec, split, read_split_logs(split_dir), expected, info, _config(args))
        write_json_atomic(split_dir / "summary.json", summary)
        summaries.append(summary)
    table = markdown_table(summaries, {spec.name: spec})
    write_text_atomic(Path(args.output_dir) / "results.md", table + "\n")
    print(table)
    return summaries


def guarded(main: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
    """Turn dataset-format errors into a one-line message and exit status 2."""

    def wrapper(argv: list[str] | None = None) -> int:
        try:
            return main(argv)
        except (FormatError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

    wrapper.__doc__ = main.__doc__
    return wrapper


def split_name(path: Path) -> str:
    """A split's name from its question file (`reason_seg_val.json` -> `reason_seg_val`)."""
    path = Path(path)
    return path.name if path.is_dir() else path.stem


__all__ = ["base_parser", "guarded", "load_predictor", "prompt_from_args", "run_benchmark", "split_name"]
