"""SAM3 as exported graphs against PyTorch: the graph backends beside eager, one workload.

    python benchmarks/graph_backends.py --preset 2b --device cpu --backends eager,onnxruntime --runs 3
    python benchmarks/graph_backends.py --preset 2b --device cuda --backends eager,compiled,tensorrt --llm compiled

The workload is engine_latency.py's: a 640x480 frame, "the red mug on the left", the
answer scripted to one phrase, the preset's K, random weights of its real architecture.
The graph backends (`onnxruntime`, `tensorrt`) run SAM3's vision encoder and head as
exported graphs and the LLM on a PyTorch backend, eager here unless --llm compiled, so
that the LLM's stages compare like for like and `sam_vision` / `sam_head` show what the
graphs change. Backends run one after another, each with a model of its own (freed
before the next): its load and first call are timed (the export, engine builds or
compiling happen there, unless the cache has them), then --runs runs with a StageTimer
attached (it synchronises around every stage, so SAM3's encoder no longer overlaps the
LLM on a GPU) give per-stage and end-to-end p50/p90. Each backend's last Result is
compared with eager's (score difference, mask agreement). The JSON is rewritten after
each backend; a table is printed at the end. Graphs and engines go to the acceleration
cache ($INSTRUCTSAM_CACHE, or --cache).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # engine_latency, beside this script

from engine_latency import _answer, _frame, _one_run, _stats  # noqa: E402

from instructsam_core.backends import STAGES, StageTimer, available_backends  # noqa: E402
from instructsam_core.engine import Segmenter  # noqa: E402
from instructsam_core.fileio import write_text_atomic  # noqa: E402

GRAPH_BACKENDS = ("onnxruntime", "tensorrt")


def _options(args, backend: str) -> dict | None:
    if backend not in GRAPH_BACKENDS:
        return None
    options = {"llm": args.llm, "max_batch": args.max_batch, "max_blocks": args.max_blocks}
    if backend == "tensorrt":
        options["precision"] = args.precision
    return options


def _build(args, backend: str) -> Segmenter:
    common = dict(device=args.device, dtype=args.dtype, backend=backend, phrase_mode="generate",
                  backend_options=_options(args, backend))
    if args.checkpoint:
        return Segmenter.from_pretrained(args.checkpoint, **common)
    return Segmenter.from_config(args.preset, **common)


def measure(args, backend: str) -> tuple[dict, object]:
    """Load, first call, then per-stage and end-to-end statistics; and the last Result."""
    start = time.perf_counter()
    seg = _build(args, backend)
    loaded = time.perf_counter()
    frame, answer = _frame(), _answer(seg)
    _one_run(seg, frame, answer)
    first = time.perf_counter() - loaded
    for _ in range(args.warmup):
        _one_run(seg, frame, answer)
    timer = StageTimer(seg.backend.synchronize)
    seg.backend.stage_timer = timer
    end_to_end = []
    for _ in range(args.runs):
        seconds, result = _one_run(seg, frame, answer)
        end_to_end.append(seconds)
    seg.backend.stage_timer = None
    report = {"load_seconds": loaded - start, "first_call_seconds": first, "end_to_end": _stats(end_to_end),
              "stages": {name: _stats(timer.seconds[name]) for name in STAGES if name in timer.seconds}}
    seg.release()
    del seg
    gc.collect()
    return report, result


def compare(result, reference) -> dict:
    """A backend's Result against eager's: same slots, largest score difference, mask agreement."""
    same = result.slots.tolist() == reference.slots.tolist()
    out = {"same_slots": same, "instances": [len(reference), len(result)]}
    if same and len(result):
        out["max_score_diff"] = float(np.abs(result.scores - reference.scores).max())
        out["mask_agreement"] = float((result.masks == reference.masks).mean())
    return out


def print_table(report: dict) -> None:
    backends = report["backends"]
    names = list(backends)
    print(f"\n| stage | {' | '.join(f'{n} p50 ms' for n in names)} |\n|---|" + "---:|" * len(names))
    for stage in (*STAGES, "end_to_end"):
        cells = [backends[n]["end_to_end"] if stage == "end_to_end" else backends[n]["stages"].get(stage)
                 for n in names]
        if any(cells):
            print(f"| {stage} | " + " | ".join(f"{c['p50_ms']:.1f}" if c else "-" for c in cells) + " |")
    for n in names:
        b = backends[n]
        print(f"\n{n}: load {b['load_seconds']:.1f} s, first call {b['first_call_seconds']:.1f} s"
              + (f"; against eager: {json.dumps(b['against_eager'])}" if "against_eager" in b else ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", choices=["tiny", "small", "2b"])
    parser.add_argument("--checkpoint", default="",
                        help="a checkpoint directory instead of the preset's random weights")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (tensorrt: CUDA; onnxruntime: cpu)")
    parser.add_argument("--dtype", default="auto", help="the LLM's dtype: auto (bf16 on CUDA, fp32 on CPU), ...")
    parser.add_argument("--backends", default="eager,onnxruntime",
                        help=f"comma-separated, eager first (installed here: {','.join(available_backends())})")
    parser.add_argument("--llm", default="eager", choices=["eager", "compiled"], help="the graph backends' LLM")
    parser.add_argument("--precision", default="fp16", choices=["fp32", "fp16", "bf16"], help="TensorRT engines'")
    parser.add_argument("--max-batch", type=int, default=8, help="graphs exported here: largest frame batch")
    parser.add_argument("--max-blocks", type=int, default=16, help="graphs exported here: largest phrase count")
    parser.add_argument("--cache", default="", help="the acceleration cache ($INSTRUCTSAM_CACHE) for this run")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--out", default="out/graph_backends.json")
    args = parser.parse_args(argv)
    names = [b for b in args.backends.split(",") if b]
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    if not names or names[0] != "eager":
        parser.error("--backends must start with eager (the reference)")
    missing = [b for b in names if b not in available_backends()]
    if missing:
        parser.error(f"backend(s) {missing} are not available here; available: {available_backends()}")
    if args.cache:
        os.environ["INSTRUCTSAM_CACHE"] = args.cache

    report = {"preset": args.preset, "checkpoint": args.checkpoint or None, "device": args.device,
              "dtype": args.dtype, "llm": args.llm, "precision": args.precision, "torch": torch.__version__,
              "machine": (torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu"
                          else platform.processor() or platform.machine()),
              "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"), "warmup": args.warmup,
              "runs": args.runs, "backends": {}}
    print(f"## graph backends: {args.checkpoint or 'preset ' + args.preset}, {report['machine']}, "
          f"backends {', '.join(names)}")
    reference = None
    for name in names:
        print(f"{name}: building and measuring ...", file=sys.stderr, flush=True)
        data, result = measure(args, name)
        if reference is None:
            reference = result
        else:
            data["against_eager"] = compare(result, reference)
        report["backends"][name] = data
        write_text_atomic(args.out, json.dumps(report, indent=2))
    print_table(report)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
