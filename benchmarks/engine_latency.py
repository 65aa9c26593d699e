"""Latency of the inference engine on one fixed workload, eager and compiled side by side.

    python benchmarks/engine_latency.py --preset 2b --device cuda --dtype bfloat16 --out out/engine_latency_2b.json
    python benchmarks/engine_latency.py --preset tiny --device cpu --runs 3   # CPU smoke run

The workload is fixed so that figures compare: a 640x480 frame at the release's
preprocessing, the instruction "the red mug on the left", the answer scripted to one
phrase of 5 tokens (`<ref_start>the red mug<ref_end>`, then the end token), the preset's K
(10 for 2b), batch 1, every slot post-processed (threshold 0); random weights of the
preset's real architecture (the architecture, not the weights, sets the cost); p50/p90
over --runs runs after --warmup. Each run encodes the frame anew.

Sections, in priority order; the JSON is rewritten after each, so a run cut short (or
past --time-budget, after which no section starts) keeps what it finished:

  main        per stage and end to end, eager and compiled in one process; speedup; the
              floor of each stage (FLOPs and bytes over the GPU's peak); peak memory; the
              compiled backend's load and first call (with a fresh cache directory: its
              compile time, by stage); the stream mode (fixed instruction, answer reused:
              EngineConfig.phrase_reuse_frames) per frame.
  parity      compiled against eager on the workload (scores, masks, tokens).
  start       restarted processes, from the model load to the first Result: eager, and
              compiled warm (reading back what `main` compiled).
  batch       segment_batch over --batch frames against one frame at a time, frames/s (the
              phrase forced: segment_batch takes no scripted answers).
  ksweep      end to end at each K of --k-sweep (paper Table 6: 10, 50, 200).
  cold_start  restarted processes with an empty cache directory, then with what the first
              one left there: the compiled backend's load, compile and first Result, cold
              and warm (last: it compiles everything again).

Backends run where --compiled-sections lists a section (eager everywhere). Per-stage
times come from a StageTimer, which synchronises around each stage (SAM3's encoder then
no longer overlaps the LLM); end-to-end times are measured without it. Absolute times mean
something only on the machine named in the output.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # stage_costs, beside this script

from stage_costs import StageCosts, floor_ms, gpu_peaks  # noqa: E402

from instructsam_core.backends import STAGES, StageTimer  # noqa: E402
from instructsam_core.build import base_architecture  # noqa: E402
from instructsam_core.config import preset  # noqa: E402
from instructsam_core.engine import Segmenter  # noqa: E402
from instructsam_core.fileio import write_text_atomic  # noqa: E402
from instructsam_core.processing import encode_text  # noqa: E402
from instructsam_core.sample_images import tabletop_scene  # noqa: E402
from instructsam_core.testing import ScriptedAnswer  # noqa: E402

INSTRUCTION = "the red mug on the left"
PHRASE = "the red mug"
FRAME_SIZE = (640, 480)  # (W, H)
SECTIONS = ("main", "parity", "start", "batch", "ksweep", "cold_start")
BACKENDS = ("eager", "compiled")


# ---- the workload ---------------------------------------------------------------------

def _frame(seed: int = 0) -> np.ndarray:
    w, h = FRAME_SIZE
    return tabletop_scene(w, h, seed=seed).image


def _answer(seg: Segmenter) -> list[int]:
    """The scripted answer: `<ref_start> the red mug <ref_end>`, then the end token."""
    ids = seg.backend.token_ids
    return [ids.ref_start] + encode_text(seg.tokenizer, PHRASE) + [ids.ref_end, ids.im_end]


def _one_run(seg: Segmenter, frame: np.ndarray, answer: list[int] | None):
    """Wall seconds of one (frame, instruction): the frame encoded, the answer scripted (or
    reused, with None), every slot post-processed; and the Result."""
    processors = [ScriptedAnswer(answer)] if answer else []
    start = time.perf_counter()
    seg.set_image(frame)
    result = seg.segment(INSTRUCTION, score_threshold=0.0, logits_processors=processors)
    return time.perf_counter() - start, result


def _stats(seconds: list[float]) -> dict[str, float]:
    ms = 1e3 * np.asarray(seconds)
    return {"p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)),
            "mean_ms": float(ms.mean()), "n": int(ms.size)}


def _build(args, backend: str, cache_dir: str, config=None) -> Segmenter:
    options = {"cache_dir": cache_dir} if backend == "compiled" else None
    common = dict(device=args.device, dtype=args.dtype, backend=backend, phrase_mode="generate",
                  backend_options=options)
    if config is None and args.checkpoint:
        return Segmenter.from_pretrained(args.checkpoint, **common)
    return Segmenter.from_config(config or args.preset, **common)


def _base_config(args):
    return base_architecture("checkpoint", checkpoint_dir=args.checkpoint) if args.checkpoint else preset(args.preset)


def _memory_start(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def _memory_report(seg: Segmenter, device: torch.device, before: int) -> dict | None:
    if device.type != "cuda":
        return None  # not measured on CPU
    peak = torch.cuda.max_memory_allocated(device)
    weights = sum(p.numel() * p.element_size() for p in seg.model.parameters())
    return {"weights_gib": weights / 2**30, "peak_gib": peak / 2**30, "working_gib": (peak - before) / 2**30}


# ---- sections -------------------------------------------------------------------------

def _probe(args, backend: str, cache_dir: str) -> dict:
    """One restarted process: the model load to the first Result of the workload."""
    command = [sys.executable, __file__, "--start-probe", backend, "--preset", args.preset, "--device", args.device,
               "--dtype", args.dtype, "--cache-dir", cache_dir] + (["--checkpoint", args.checkpoint]
                                                                  if args.checkpoint else [])
    start = time.perf_counter()
    run = subprocess.run(command, capture_output=True, text=True, timeout=args.probe_timeout)
    if run.returncode != 0:
        raise RuntimeError(f"start probe ({backend}) failed:\n{run.stderr[-3000:]}")
    report = json.loads(run.stdout.strip().splitlines()[-1])
    report["process_seconds"] = time.perf_counter() - start  # interpreter and imports included
    return report


def section_start(args, cache_dir: str, compiled: bool) -> dict:
    out = {"eager": _probe(args, "eager", cache_dir)}
    if compiled:
        out["compiled_warm"] = _probe(args, "compiled", cache_dir)
    return out


def section_cold_start(args, cache_dir: str) -> dict:
    """The compiled backend restarted with an empty cache directory, then again with it."""
    cold = str(Path(cache_dir) / f"cold-{int(time.time())}")
    return {"compiled_cold": _probe(args, "compiled", cold), "compiled_warm": _probe(args, "compiled", cold)}


def start_probe(args) -> int:
    """In a fresh process: load, then one Result of the workload; one JSON line."""
    from torch._dynamo.utils import counters

    start = time.perf_counter()
    seg = _build(args, args.start_probe, args.cache_dir)
    loaded = time.perf_counter()
    _one_run(seg, _frame(), _answer(seg))
    done = time.perf_counter()
    report = {"load_seconds": loaded - start, "first_result_seconds": done - loaded,
              "load_to_first_result_seconds": done - start,
              "fxgraph_cache_hits": counters["inductor"]["fxgraph_cache_hit"],
              "fxgraph_cache_misses": counters["inductor"]["fxgraph_cache_miss"]}
    if args.start_probe == "compiled":
        report["compile_seconds"] = seg.backend.compile_seconds
    print(json.dumps(report))
    return 0


def _measure(seg: Segmenter, answer: list[int], args) -> dict:
    """End to end and per stage over the workload, the stream mode, memory."""
    frame = _frame()
    device = seg.backend.device
    first, _ = _one_run(seg, frame, answer)
    compile_seconds = getattr(seg.backend, "compile_seconds", None)
    cache_was_warm = getattr(seg.backend, "cache_was_warm", None)
    for _ in range(args.warmup):
        _one_run(seg, frame, answer)
    before = _memory_start(device)
    end_to_end = [_one_run(seg, frame, answer)[0] for _ in range(args.runs)]
    memory = _memory_report(seg, device, before)

    timer = StageTimer(seg.backend.synchronize)
    seg.backend.stage_timer = timer
    postprocess = []
    try:
        for _ in range(args.runs):
            postprocess.append(_one_run(seg, frame, answer)[1].timings["postprocess"])
    finally:
        seg.backend.stage_timer = None
    stages = {name: _stats(timer.seconds[name]) for name in STAGES if name in timer.seconds}
    stages["postprocess"] = _stats(postprocess)

    seg.update_config(phrase_reuse_frames=args.runs + args.warmup + 1)
    try:
        _one_run(seg, frame, answer)  # generated once, then replayed
        for _ in range(args.warmup):
            _one_run(seg, frame, None)
        stream = [_one_run(seg, frame, None)[0] for _ in range(args.runs)]
    finally:
        seg.update_config(phrase_reuse_frames=0)
    return {"end_to_end": _stats(end_to_end), "stages": stages, "stream_per_frame": _stats(stream),
            "first_call_seconds": first, "compile_seconds": compile_seconds, "cache_was_warm": cache_was_warm,
            "memory": memory}


def _floors(seg: Segmenter, answer: list[int], peaks) -> dict:
    """Per stage (per call) GFLOP, MB read and floor; the end-to-end floor sums the calls of one run."""
    costs = StageCosts()
    seg.backend.stage_timer = StageTimer(seg.backend.synchronize, wrap=costs.wrap)
    try:
        _one_run(seg, _frame(), answer)
    finally:
        seg.backend.stage_timer = None
    floors = {stage: {**cost, "calls": costs.calls[stage], "floor_ms": floor_ms(cost, peaks)}
              for stage, cost in costs.per_call().items()}
    if peaks is not None:
        floors["end_to_end"] = {"floor_ms": sum(f["floor_ms"] * f["calls"] for f in floors.values())}
    return floors


def section_main(args, engines: dict[str, Segmenter], peaks) -> dict:
    answer = _answer(engines["eager"])
    out = {"phrase_tokens": len(answer) - 1, "answer_tokens": len(answer), "backends": {}}
    for name, seg in engines.items():
        out["backends"][name] = _measure(seg, answer, args)
    out["floors"] = _floors(engines["eager"], answer, peaks)
    if "compiled" in engines:
        eager, compiled = out["backends"]["eager"], out["backends"]["compiled"]
        out["speedup"] = {"end_to_end": eager["end_to_end"]["p50_ms"] / compiled["end_to_end"]["p50_ms"],
                          "stream_per_frame": eager["stream_per_frame"]["p50_ms"]
                          / compiled["stream_per_frame"]["p50_ms"],
                          **{stage: eager["stages"][stage]["p50_ms"] / compiled["stages"][stage]["p50_ms"]
                             for stage in eager["stages"] if stage in compiled["stages"]}}
    return out


def section_parity(engines: dict[str, Segmenter]) -> dict:
    answer = _answer(engines["eager"])
    eager = _one_run(engines["eager"], _frame(), answer)[1]
    compiled = _one_run(engines["compiled"], _frame(), answer)[1]
    same_slots = eager.slots.tolist() == compiled.slots.tolist()
    out = {"same_tokens": eager.generated_text == compiled.generated_text, "same_slots": same_slots,
           "instances": [len(eager), len(compiled)]}
    if same_slots and len(eager):
        out["max_score_diff"] = float(np.abs(eager.scores - compiled.scores).max())
        differing = (eager.masks != compiled.masks).reshape(len(eager), -1).mean(axis=1)
        out["max_mask_pixels_differing_fraction"] = float(differing.max())
    return out


def section_batch(args, engines: dict[str, Segmenter]) -> dict:
    frames = [_frame(seed) for seed in range(args.batch)]
    out = {"batch": args.batch}
    for name, seg in engines.items():
        seg.phrase_mode = "instruction"  # the instruction is the phrase (no scripted answers here)
        try:
            per_size = {}
            for size in (1, args.batch):
                for _ in range(args.warmup):
                    seg.segment_batch(frames, [INSTRUCTION] * args.batch, score_threshold=0.0, batch_size=size)
                seconds = []
                for _ in range(args.sweep_runs):
                    start = time.perf_counter()
                    seg.segment_batch(frames, [INSTRUCTION] * args.batch, score_threshold=0.0, batch_size=size)
                    seconds.append(time.perf_counter() - start)
                stats = _stats(seconds)
                stats["frames_per_second"] = args.batch / (stats["p50_ms"] / 1e3)
                per_size[f"batch_size_{size}"] = stats
        finally:
            seg.phrase_mode = "generate"
        out[name] = per_size
    return out


def section_ksweep(args, backends: list[str], cache_dir: str) -> dict:
    out = {}
    for k in args.k_sweep:
        config = _base_config(args)
        config.num_queries = k
        out[f"K={k}"] = {}
        for backend in backends:
            seg = _build(args, backend, cache_dir, config)
            answer = _answer(seg)
            first, _ = _one_run(seg, _frame(), answer)
            for _ in range(args.warmup):
                _one_run(seg, _frame(), answer)
            stats = _stats([_one_run(seg, _frame(), answer)[0] for _ in range(args.sweep_runs)])
            stats["first_call_seconds"] = first
            out[f"K={k}"][backend] = stats
            seg.release()
            del seg
    return out


# ---- report ---------------------------------------------------------------------------

def _fmt(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_section(name: str, data: dict) -> None:
    if "skipped" in data:
        print(f"\n### {name}: skipped ({data['skipped']})")
        return
    if name == "main":
        backends = data["backends"]
        names = list(backends)
        print(f"\n### per stage and end to end (ms; phrase of {data['phrase_tokens']} tokens)\n")
        header = " | ".join(f"{n} p50 | {n} p90" for n in names)
        print(f"| stage | {header} | speedup | floor ms |\n|---|" + "---:|" * (2 * len(names) + 2))
        rows = [(s, {n: backends[n]["stages"].get(s) for n in names}) for s in (*STAGES, "postprocess")]
        rows += [(k, {n: backends[n][k] for n in names}) for k in ("end_to_end", "stream_per_frame")]
        for stage, stats in rows:
            if all(v is None for v in stats.values()):
                continue
            cells = " | ".join(f"{_fmt(v and v['p50_ms'], 2)} | {_fmt(v and v['p90_ms'], 2)}" for v in stats.values())
            floor = data["floors"].get(stage, {}).get("floor_ms")
            print(f"| {stage} | {cells} | {_fmt(data.get('speedup', {}).get(stage), 2)} | {_fmt(floor, 3)} |")
        for n in names:
            m = backends[n]["memory"]
            memory = f"peak {m['peak_gib']:.2f} GiB, working {m['working_gib']:.2f} GiB" if m else "not measured"
            print(f"\n{n}: load {_fmt(backends[n].get('load_seconds'))} s, first call "
                  f"{backends[n]['first_call_seconds']:.1f} s; memory {memory}")
            if backends[n]["compile_seconds"]:
                print(f"{n}: compile/cache read per stage (s): "
                      + ", ".join(f"{k} {v:.1f}" for k, v in backends[n]["compile_seconds"].items()))
    else:
        print(f"\n### {name}\n\n```\n{json.dumps(data, indent=1)}\n```")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", choices=["tiny", "small", "2b"])
    parser.add_argument("--checkpoint", default="", help="a checkpoint directory instead of the preset's random weights")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--sections", default=",".join(SECTIONS), help="which sections, in this order")
    parser.add_argument("--compiled-sections", default="main,parity,start,batch,cold_start",
                        help="sections that also run the compiled backend (each K of the sweep compiles anew)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--k-sweep", default="10,50,200", type=lambda s: [int(v) for v in s.split(",")])
    parser.add_argument("--sweep-runs", type=int, default=10, help="runs per point of the batch and K sections")
    parser.add_argument("--cache-dir", default="", help="root of the compile caches (default: a fresh temporary one, "
                                                         "so that main's first compiled call compiles)")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak (bf16 dense) TFLOP/s, for the floors")
    parser.add_argument("--peak-gbps", type=float, help="the device's memory bandwidth in GB/s, for the floors")
    parser.add_argument("--time-budget", type=float, default=0.0, help="seconds; no section starts past it (0: none)")
    parser.add_argument("--probe-timeout", type=float, default=900.0)
    parser.add_argument("--out", default="out/engine_latency.json")
    parser.add_argument("--start-probe", choices=BACKENDS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.start_probe:
        return start_probe(args)

    t0 = time.perf_counter()
    sections = [s for s in args.sections.split(",") if s]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; known: {list(SECTIONS)}")
    compiled_in = set(args.compiled_sections.split(","))
    cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="instructsam-compile-")
    config = _base_config(args)
    report = {"preset": args.preset, "checkpoint": args.checkpoint or None, "device": args.device,
              "dtype": args.dtype, "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
              "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else None,
              "date": time.strftime("%Y-%m-%d"), "frame": "x".join(map(str, FRAME_SIZE)), "instruction": INSTRUCTION,
              "k": config.num_queries, "warmup": args.warmup, "runs": args.runs, "cache_dir": cache_dir,
              "sections": {}}
    peaks = (args.peak_tflops, args.peak_gbps) if args.peak_tflops and args.peak_gbps else gpu_peaks(report["gpu"])
    report["peaks_tflops_gbps"] = peaks
    machine = report["gpu"] or report["cpu"]
    print(f"## engine latency: preset {args.preset}, {machine}, K={config.num_queries}, "
          f"{report['frame']}, \"{INSTRUCTION}\", random weights")

    engines: dict[str, Segmenter] = {}
    load_seconds: dict[str, float] = {}
    for name in sections:
        if args.time_budget and time.perf_counter() - t0 > args.time_budget:
            data = {"skipped": f"time budget of {args.time_budget:.0f} s spent"}
        else:
            wanted = [b for b in BACKENDS if b == "eager" or name in compiled_in]
            if name in ("main", "parity", "batch"):
                for backend in wanted:
                    if backend not in engines:
                        start = time.perf_counter()
                        engines[backend] = _build(args, backend, cache_dir)
                        load_seconds[backend] = time.perf_counter() - start
            use = {b: engines[b] for b in wanted if b in engines}
            if name == "start":
                data = section_start(args, cache_dir, "compiled" in wanted)
            elif name == "cold_start":
                data = (section_cold_start(args, cache_dir) if "compiled" in wanted
                        else {"skipped": "compiled backend not in this section"})
            elif name == "main":
                data = section_main(args, use, peaks)
                for backend, seconds in load_seconds.items():
                    data["backends"][backend]["load_seconds"] = seconds
            elif name == "parity":
                data = section_parity(use) if "compiled" in use else {"skipped": "compiled backend not in this section"}
            elif name == "batch":
                data = section_batch(args, use)
            else:
                data = section_ksweep(args, wanted, cache_dir)
        data["seconds"] = time.perf_counter() - t0
        report["sections"][name] = data
        write_text_atomic(args.out, json.dumps(report, indent=2))
        print_section(name, data)
    print(f"\nwrote {args.out} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
