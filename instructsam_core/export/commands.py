"""The `instructsam export`, `instructsam parity` and `instructsam engine` commands.

    instructsam export --checkpoint DIR|tiny --out out/onnx [--parts vision,head] [--opset 18] [--check]
    instructsam export --checkpoint DIR --cache      # where the tensorrt/onnxruntime backends look
    instructsam parity --onnx out/onnx [--runner onnxruntime|tensorrt] [--precision fp16]
    instructsam engine --onnx out/onnx --precision fp16 [--trtexec]

Progress goes to stderr; the parity table (and `--trtexec` commands) to stdout. See
docs/acceleration.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..fileio import write_text_atomic

# The graphs' names, as export.graphs.PARTS has them (not imported: it loads transformers,
# and the CLI should start fast); test_export checks that the two agree.
PARTS = ("vision", "head")


class _Progress:
    """Lines on stderr with the seconds since the command started."""

    def __init__(self):
        self.start = time.perf_counter()

    def __call__(self, line: str) -> None:
        print(f"[{time.perf_counter() - self.start:7.1f} s] {line}", file=sys.stderr, flush=True)


def _parts(text: str) -> list[str]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        raise argparse.ArgumentTypeError(f"unknown part(s) {unknown or text!r}; choose from {','.join(PARTS)}")
    return parts


def _engine_file(text: str) -> tuple[str, Path]:
    part, sep, path = text.partition("=")
    if not sep or part not in PARTS or not path:
        raise argparse.ArgumentTypeError(f"--engine takes PART=FILE with PART one of {','.join(PARTS)}, got {text!r}")
    return part, Path(path)


def _load_model(source: str, dtype: str, progress: _Progress):
    from ..build import build_model
    from ..config import PRESETS

    progress(f"loading {source}")
    try:
        # Random presets are drawn on the CPU (seeded; CUDA's generator would draw others).
        built = build_model(source, device="cpu", dtype=dtype)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: cannot load checkpoint {source!r}: {err}") from err
    label = source if source in PRESETS else str(Path(source).resolve())
    return built.model, label


def cmd_export(args: argparse.Namespace) -> int:
    from .graphs import ExportLimits
    from .onnx_export import export_onnx
    from .onnxruntime_runner import OnnxRuntimeRunner
    from .parity import check_parity, parity_cases

    progress = _Progress()
    try:
        limits = ExportLimits(max_batch=args.max_batch, max_blocks=args.max_blocks,
                              max_prompt_tokens=args.max_prompt_tokens)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from err
    if args.cache and (args.max_prompt_tokens is not None or args.opset != 18 or args.parts != list(PARTS)):
        raise SystemExit("error: --cache exports what the backends export (both parts, opset 18, the model's "
                         "prompt length); leave out --parts, --opset and --max-prompt-tokens, or use --out")
    model, label = _load_model(args.checkpoint, args.dtype, progress)
    out = args.out
    if args.cache:
        from ..backends.graph_export import cache_folder
        from .manifest import model_hash

        out = cache_folder(model_hash(model), args.dtype, limits)
    try:
        manifest = export_onnx(model, out, parts=args.parts, opset=args.opset, limits=limits, source=label,
                               progress=progress)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from err
    progress(f"wrote {', '.join(g.file for g in manifest.graphs.values())} and manifest.json to {out}")
    if not args.check:
        return 0
    if args.dtype != "float32":  # the reference is the checkpoint itself, not its rounded weights
        model, _ = _load_model(args.checkpoint, "float32", progress)
    progress("checking the graphs on onnxruntime (CPU) against PyTorch")
    report = check_parity(OnnxRuntimeRunner(out), parity_cases(model, manifest))
    print(report.table())
    return 0 if report.passed else 1


def cmd_parity(args: argparse.Namespace) -> int:
    import torch

    from ..build import resolve_device, resolve_dtype
    from .manifest import Manifest, model_hash
    from .parity import check_parity, parity_cases

    progress = _Progress()
    try:
        manifest = Manifest.read(args.onnx)
        manifest.verify_files(args.onnx, args.parts)
        device = resolve_device(args.device or ("cuda" if args.runner == "tensorrt" else "cpu"))
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: {err}") from err
    source = args.checkpoint or manifest.source
    model, _ = _load_model(source, "float32", progress)
    if model_hash(model) != manifest.model_hash:
        raise SystemExit(f"error: {source} is not the model {args.onnx} was exported from (their weights' hashes "
                         f"differ); pass the checkpoint it was exported from ({manifest.source})")
    try:
        runner = _runner(args, manifest, progress)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from err
    reference_dtype = resolve_dtype(args.reference_dtype, device)
    model.to(device=device, dtype=reference_dtype)
    precision = str(reference_dtype).removeprefix("torch.")
    progress(f"PyTorch reference on {device} in {precision}; running {runner.name}")
    try:
        cases = parity_cases(model, manifest, parts=args.parts, seed=args.seed)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from err
    report = check_parity(runner, cases, reference=f"PyTorch {torch.__version__} ({device}, {precision})",
                          reference_precision=precision)
    print(report.table())
    if args.json:
        write_text_atomic(args.json, report.to_json() + "\n")
        progress(f"report written to {args.json}")
    return 0 if report.passed else 1


def _runner(args: argparse.Namespace, manifest, progress: _Progress):
    if args.runner == "onnxruntime":
        from .onnxruntime_runner import OnnxRuntimeRunner

        return OnnxRuntimeRunner(args.onnx, device=args.device or "cpu")
    _require_tensorrt()
    from ..tensorrt.cache import EngineCache
    from ..tensorrt.runtime import TensorRtEngine, TensorRtRunner

    given = dict(args.engine or [])
    engines = {}
    for part in args.parts or list(manifest.graphs):
        if part in given:
            progress(f"loading the {part} engine {given[part]}")
            engines[part] = TensorRtEngine.from_file(given[part], args.device or "cuda")
        else:
            from ..tensorrt.builder import engine_for

            path, _ = engine_for(args.onnx, part, args.precision, EngineCache(args.engine_cache))
            engines[part] = TensorRtEngine.from_file(path, args.device or "cuda")
    return TensorRtRunner(engines, args.precision)


def cmd_engine(args: argparse.Namespace) -> int:
    from .manifest import Manifest

    try:
        manifest = Manifest.read(args.onnx)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: {err}") from err
    parts = args.parts or list(manifest.graphs)
    if args.trtexec:
        import shlex

        from ..tensorrt.profiles import trtexec_command

        directory = Path(args.onnx)
        for part in parts:
            entry = manifest.graph(part)
            command = trtexec_command(directory / entry.file, entry, args.precision,
                                      directory / f"{part}-{args.precision}.engine", directory / "timing.cache")
            print(shlex.join(command))
        return 0
    _require_tensorrt()
    from ..tensorrt.builder import engine_for
    from ..tensorrt.cache import EngineCache

    cache = EngineCache(args.engine_cache)
    workspace = args.workspace_mib * 2**20 if args.workspace_mib else None
    for part in parts:
        try:
            path, built = engine_for(args.onnx, part, args.precision, cache, workspace_bytes=workspace)
        except ValueError as err:
            raise SystemExit(f"error: {err}") from err
        print(f"{part}: {path} ({'built' if built else 'from the cache'})")
    return 0


def _require_tensorrt() -> None:
    from ..tensorrt import tensorrt_status

    usable, reason = tensorrt_status()
    if not usable:
        raise SystemExit(f"error: {reason}; see docs/acceleration.md (JetPack ships it on a Jetson; on a desktop, "
                         f"NVIDIA's own package index has it), or use `instructsam engine --trtexec`")


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register `export`, `parity` and `engine` on the CLI's subcommand parser."""
    exp = sub.add_parser("export", help="export SAM3's vision encoder and the InstructSAM head to ONNX")
    exp.add_argument("--checkpoint", required=True, help="checkpoint directory, or a preset name (tiny, small, 2b)")
    where = exp.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", help="export folder (replaced whole on success)")
    where.add_argument("--cache", action="store_true",
                       help="into the acceleration cache, where backend='tensorrt' and 'onnxruntime' look for this "
                            "model's graphs ($INSTRUCTSAM_CACHE/onnx, else ~/.cache/instructsam/onnx)")
    exp.add_argument("--parts", type=_parts, default=list(PARTS), help="comma-separated: vision,head (default both)")
    exp.add_argument("--opset", type=int, default=18, help="ONNX opset (18 or newer; 18 parses on TensorRT 8.6+)")
    exp.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                     help="what the graphs compute in: float32 (TensorRT 10 picks fp16/bf16 at build time) or "
                          "float16 (for strongly typed builds, the only kind TensorRT 11 makes)")
    exp.add_argument("--max-batch", type=int, default=8, help="largest frame batch (default 8)")
    exp.add_argument("--max-blocks", type=int, default=16,
                     help="largest number of query blocks (phrases) per head call (default 16)")
    exp.add_argument("--max-prompt-tokens", type=int, default=None,
                     help="longest prompt (default: the model's max_phrase_tokens)")
    exp.add_argument("--check", action="store_true", help="then compare the graphs on onnxruntime with PyTorch")
    exp.set_defaults(func=cmd_export)

    par = sub.add_parser("parity", help="compare exported graphs or TensorRT engines with the PyTorch path")
    par.add_argument("--onnx", required=True, help="export folder (from instructsam export)")
    par.add_argument("--checkpoint", default=None, help="the model to compare with (default: the one exported)")
    par.add_argument("--runner", choices=("onnxruntime", "tensorrt"), default="onnxruntime")
    par.add_argument("--device", default=None,
                     help="where the runner and the PyTorch reference run (default: cpu for onnxruntime, cuda for "
                          "tensorrt; onnxruntime on cuda needs onnxruntime-gpu)")
    par.add_argument("--reference-dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                     help="PyTorch reference precision")
    par.add_argument("--precision", default="fp16", choices=("fp32", "fp16", "bf16"),
                     help="TensorRT engine precision (built or given)")
    par.add_argument("--engine", type=_engine_file, action="append",
                     help="PART=FILE: an engine built elsewhere (e.g. by trtexec) instead of the cache's")
    par.add_argument("--engine-cache", default=None, help="engine cache folder (default ~/.cache/instructsam/tensorrt)")
    par.add_argument("--parts", type=_parts, default=None, help="comma-separated parts to check (default: all)")
    par.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    par.add_argument("--json", default="", help="also write the report as JSON here")
    par.set_defaults(func=cmd_parity)

    eng = sub.add_parser("engine", help="build (or print trtexec commands for) TensorRT engines of an export")
    eng.add_argument("--onnx", required=True, help="export folder (from instructsam export)")
    eng.add_argument("--precision", default="fp16", choices=("fp32", "fp16", "bf16"))
    eng.add_argument("--parts", type=_parts, default=None, help="comma-separated parts (default: all exported)")
    eng.add_argument("--engine-cache", default=None, help="engine cache folder (default ~/.cache/instructsam/tensorrt)")
    eng.add_argument("--workspace-mib", type=int, default=0, help="cap on TensorRT's scratch memory (0: its default)")
    eng.add_argument("--trtexec", action="store_true",
                     help="print the trtexec commands that build the same engines (no tensorrt needed here)")
    eng.set_defaults(func=cmd_engine)

