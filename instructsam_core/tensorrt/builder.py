"""Build TensorRT engines from the exported ONNX graphs (TensorRT's Python API, 10.x).

    path, built = engine_for("out/onnx", "vision", "fp16")   # built once, then from the cache

The network comes from TensorRT's ONNX parser (`parse_from_file`, so the external
weights beside the graph are found); one optimization profile covers the manifest's
dynamic axes; the precision is a builder flag on an fp32 graph (TensorRT 10's weak
typing), or the graph's own when it was exported in float16 (strongly typed, the only way
TensorRT 11 builds); a timing cache per GPU and TensorRT version makes rebuilds fast;
`IProgressMonitor` reports the build's phases. Importing this module needs tensorrt.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import tensorrt as trt

from ..export.graphs import AxisRange
from ..export.manifest import Manifest
from ..fileio import atomic_file
from .cache import EngineCache, EngineKey, gpu_identity
from .profiles import PARITY_PRECISION, InputProfile, check_precision, input_profiles

_LOGGER = trt.Logger(trt.Logger.WARNING)
ENGINE_PRECISION = {dtype: precision for precision, dtype in PARITY_PRECISION.items()}  # float16 -> fp16


def tensorrt_major() -> int:
    return int(trt.__version__.split(".")[0])


class BuildProgress(trt.IProgressMonitor if hasattr(trt, "IProgressMonitor") else object):
    """Prints TensorRT's build phases with their step counts, indented by nesting.

    TensorRT may call it from several threads; each call writes one whole line.
    """

    def __init__(self, write: Callable[[str], None] | None = None):
        if hasattr(trt, "IProgressMonitor"):
            trt.IProgressMonitor.__init__(self)
        self.write = write or (lambda line: print(line, file=sys.stderr, flush=True))
        self.depth: dict[str, int] = {}
        self.started: dict[str, float] = {}

    def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
        self.depth[phase_name] = self.depth.get(parent_phase, -1) + 1 if parent_phase else 0
        self.started[phase_name] = time.perf_counter()
        self.write(f"{'  ' * self.depth[phase_name]}{phase_name}: {num_steps} step(s)")

    def step_complete(self, phase_name: str, step: int) -> bool:
        return True  # never cancel

    def phase_finish(self, phase_name: str) -> None:
        elapsed = time.perf_counter() - self.started.pop(phase_name, time.perf_counter())
        self.write(f"{'  ' * self.depth.pop(phase_name, 0)}{phase_name}: done in {elapsed:.1f} s")


def build_engine(onnx_path: str | os.PathLike, profiles: tuple[InputProfile, ...], precision: str,
                 strongly_typed: bool = False, timing_cache: str | os.PathLike | None = None,
                 workspace_bytes: int | None = None, progress: bool = True) -> bytes:
    """A serialized engine for one ONNX graph.

    Arguments:
        onnx_path: the graph (its external weights beside it).
        profiles: every dynamic input's (min, opt, max) shapes.
        precision: fp32, fp16 or bf16: the builder flag for an fp32 graph; must match the
            graph's dtype when `strongly_typed`.
        strongly_typed: build the graph's own types (a float16 export); TensorRT 11 always does.
        timing_cache: file to read kernel timings from and write them back to (atomically).
        workspace_bytes: cap on TensorRT's scratch memory (None: its default, the GPU's memory).
        progress: print the build's phases to stderr.
    """
    check_precision(precision)
    if not strongly_typed and precision != "fp32" and tensorrt_major() >= 11:
        raise ValueError(f"TensorRT {trt.__version__} builds only the graph's own precision (its fp16/bf16 "
                         f"builder flags are gone): export with --dtype float16 for an fp16 engine, or use "
                         f"TensorRT 10 (JetPack 6 ships 10.3)")
    builder = trt.Builder(_LOGGER)
    flags = 0
    if strongly_typed and tensorrt_major() < 11:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, _LOGGER)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT's ONNX parser rejected {onnx_path}: {errors}")
    config = builder.create_builder_config()
    if precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # on by default; it rounds fp32 GEMMs to 10 mantissa bits
    if not strongly_typed and precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif not strongly_typed and precision == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)
    if workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    profile = builder.create_optimization_profile()
    for p in profiles:
        profile.set_shape(p.name, p.min, p.opt, p.max)
    config.add_optimization_profile(profile)
    cache = None
    if timing_cache is not None:
        path = Path(timing_cache)
        cache = config.create_timing_cache(path.read_bytes() if path.is_file() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    if progress and hasattr(trt, "IProgressMonitor"):
        monitor = BuildProgress()  # must outlive the build
        config.progress_monitor = monitor
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT could not build an engine from {onnx_path} (see its log above)")
    if cache is not None:
        with atomic_file(timing_cache) as tmp:
            tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
    return bytes(serialized)


def engine_key(manifest: Manifest, part: str, precision: str, device_index: int = 0,
               axes: dict[str, AxisRange] | None = None) -> EngineKey:
    """The cache key of `part`'s engine on this GPU with this TensorRT."""
    entry = manifest.graph(part)
    gpu_name, capability = gpu_identity(device_index)
    onnx_digest = "+".join(f"{name}:{digest}" for name, digest in sorted(entry.sha256.items()))
    return EngineKey(part=part, model_hash=manifest.model_hash, onnx_sha256=onnx_digest, precision=precision,
                     tensorrt_version=trt.__version__, gpu_name=gpu_name, compute_capability=capability,
                     profile=input_profiles(entry, axes))


def engine_for(directory: str | os.PathLike, part: str, precision: str, cache: EngineCache | None = None,
               device_index: int = 0, axes: dict[str, AxisRange] | None = None, workspace_bytes: int | None = None,
               progress: bool = True) -> tuple[Path, bool]:
    """`part`'s engine from the cache, built first if absent. Returns (engine file, built now).

    The graph files are checked against the manifest before anything is built, so an
    engine is never cached under the key of graphs it was not built from. A cached engine
    is returned without hashing the files again (gigabytes at real size): its key holds
    the manifest's digests, which the files had when it was built.
    """
    check_precision(precision)
    cache = cache or EngineCache()
    manifest = Manifest.read(directory)
    strongly_typed = manifest.dtype != "float32"
    if strongly_typed and precision != ENGINE_PRECISION[manifest.dtype]:
        raise ValueError(f"the graphs were exported in {manifest.dtype}: their engines are "
                         f"{ENGINE_PRECISION[manifest.dtype]}, not {precision}")
    key = engine_key(manifest, part, precision, device_index, axes)
    found = cache.lookup(key)
    if found is not None:
        return found, False
    manifest.verify_files(directory, [part])
    entry = manifest.graph(part)
    start = time.perf_counter()
    if progress:
        print(f"building the {part} engine ({precision}, TensorRT {trt.__version__}, {key.gpu_name}); "
              f"this takes minutes once, then it is cached in {cache.root}", file=sys.stderr, flush=True)
    timing = cache.timing_cache_path(key.gpu_name, key.compute_capability, key.tensorrt_version)
    timing.parent.mkdir(parents=True, exist_ok=True)
    serialized = build_engine(Path(directory) / entry.file, key.profile, precision, strongly_typed, timing,
                              workspace_bytes, progress)
    path = cache.store(key, serialized)
    if progress:
        print(f"{part} engine built in {time.perf_counter() - start:.1f} s: {path}", file=sys.stderr, flush=True)
    return path, True
