"""The command line shared by the reports that run a model over one written split
(`training.slot_diagnostics`, `training.colour_confusion`): MODEL SPLIT [--limit N]
[--json FILE] [--device D]; the report printed as a table and, if asked, written as JSON."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable


def run_split_report(argv: list[str] | None, prog: str, description: str,
                     report: Callable[..., Any], format_report: Callable[[Any], str]) -> int:
    """Parse `argv`, load the model (fp32), run `report(segmenter, split, limit=..., progress=True)`,
    print `format_report` of it and write it to `--json` (NaN as null) when given."""
    p = argparse.ArgumentParser(prog=prog, description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="checkpoint directory (or 'default')")
    p.add_argument("split", type=Path, help="a split written by training.tabletop (e.g. heldout.json)")
    p.add_argument("--limit", type=int, default=None, help="only the first N instructions (of every kind)")
    p.add_argument("--json", type=Path, default=None, help="also write the report here")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    if not args.split.is_file():
        p.error(f"{args.split} not found: give a split written by training.tabletop "
                "(python -m training.default_model writes them under <out>/full/data/)")
    from instructsam_core.engine import Segmenter
    from training.eval.summary import write_json_atomic

    segmenter = Segmenter.from_pretrained(args.model, device=args.device, dtype="float32")
    result = report(segmenter, args.split, limit=args.limit, progress=True)
    print(format_report(result))
    if args.json:
        write_json_atomic(args.json, result)
    return 0
