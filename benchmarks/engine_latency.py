"""Per-stage latency and peak memory of the inference engine, with random weights.

    python benchmarks/engine_latency.py --preset 2b --device cuda --dtype bfloat16
    python benchmarks/engine_latency.py --preset tiny            # CPU smoke run

Builds the preset's real architecture with random weights (no checkpoint needed), then for
each image size times, after warm-up and with the device synchronised around each timer:
the frame encode (both image encoders), one instruction with the phrase forced (a single
LLM pass over the prompt and the query block), and one instruction whose answer is
scripted to `--answer-tokens` generated tokens followed by a phrase (the cached decode
loop). Prints a Markdown table and writes JSON (`--out`). Absolute times only mean
something on the machine named in the output.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import numpy as np
import torch

from instructsam_core.engine import Segmenter
from instructsam_core.fileio import write_text_atomic
from instructsam_core.processing import encode_text
from instructsam_core.testing import ScriptedAnswer


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def _measure(seg: Segmenter, image: np.ndarray, script: list[int], warmup: int, runs: int) -> dict:
    stages: dict[str, list[float]] = {}
    for i in range(warmup + runs):
        seg.set_image(image)  # no key: encode every time
        forced = seg.segment("the red mug", score_threshold=0.0, phrase="red mug")
        generated = seg.segment("the red mug", score_threshold=0.0, logits_processors=[ScriptedAnswer(script)])
        if i < warmup:
            continue
        for name, value in forced.timings.items():
            stages.setdefault(f"forced/{name}", []).append(value)
        for name, value in generated.timings.items():
            if name != "image_encode":
                stages.setdefault(f"generated/{name}", []).append(value)
    return {name: {"mean_ms": 1e3 * statistics.fmean(v), "p50_ms": 1e3 * _percentile(v, 50),
                   "p90_ms": 1e3 * _percentile(v, 90)} for name, v in stages.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", choices=["tiny", "2b"])
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16")
    parser.add_argument("--sizes", default="640x480,448x448", help="comma-separated WxH image sizes")
    parser.add_argument("--answer-tokens", type=int, default=5, help="tokens generated before the phrase")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", default="out/engine_latency.json")
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    seg = Segmenter.from_config(args.preset, device=args.device, dtype=args.dtype, phrase_mode="generate")
    build_seconds = time.perf_counter() - t0
    model, tokenizer, device = seg.model, seg.tokenizer, seg.backend.device
    ids = model.token_ids
    script = (encode_text(tokenizer, " word" * args.answer_tokens) + [ids.ref_start]
              + encode_text(tokenizer, "red mug") + [ids.ref_end, ids.im_end])
    params = sum(p.numel() for p in model.parameters())
    report = {"preset": args.preset, "device": str(device), "dtype": str(seg.dtype).replace("torch.", ""),
              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
              "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
              "parameters": params, "build_seconds": build_seconds, "warmup": args.warmup, "runs": args.runs,
              "answer_tokens": args.answer_tokens, "sizes": {}}
    rng = np.random.default_rng(0)
    for size in args.sizes.split(","):
        w, h = (int(v) for v in size.lower().split("x"))
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        stats = _measure(seg, image, script, args.warmup, args.runs)
        if device.type == "cuda":
            stats["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        report["sizes"][size] = stats

    machine = report["gpu"] or report["cpu"]
    print(f"\n## engine latency: preset {args.preset}, {report['dtype']}, {machine}, eager backend, "
          f"{params / 1e9:.2f} B parameters, random weights\n")
    print("| image | stage | mean ms | p50 ms | p90 ms |\n|---|---|---:|---:|---:|")
    for size, stats in report["sizes"].items():
        for name, s in stats.items():
            if isinstance(s, dict):
                print(f"| {size} | {name} | {s['mean_ms']:.1f} | {s['p50_ms']:.1f} | {s['p90_ms']:.1f} |")
        if "peak_memory_gib" in stats:
            print(f"| {size} | peak memory | {stats['peak_memory_gib']:.2f} GiB | | |")
    write_text_atomic(args.out, json.dumps(report, indent=2))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
