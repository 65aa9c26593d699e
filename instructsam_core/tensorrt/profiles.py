"""How an engine is built: its precision, its optimization profile from the export
manifest, and the `trtexec` command that builds the same engine without Python (a
Jetson's JetPack ships `trtexec`).

A TensorRT engine built from a graph with dynamic axes needs, for every input, the
smallest, typical and largest shape it will see. The manifest gives each axis a range
(`AxisRange`: min, opt, max); an input's profile is its shape with every axis set to that
range's min, opt or max. Nothing here imports tensorrt.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..export.graphs import AxisRange
from ..export.manifest import GraphEntry

BUILD_PRECISIONS = ("fp32", "fp16", "bf16")
# The parity module's names for the precisions an engine computes in.
PARITY_PRECISION = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def check_precision(precision: str) -> str:
    if precision not in BUILD_PRECISIONS:
        raise ValueError(f"unknown engine precision {precision!r}; choose from {', '.join(BUILD_PRECISIONS)}")
    return precision


@dataclass(frozen=True)
class InputProfile:
    """An input's optimization-profile shapes."""

    name: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


def input_profiles(entry: GraphEntry, axes: dict[str, AxisRange] | None = None) -> tuple[InputProfile, ...]:
    """Every input's profile from the manifest's axis ranges, or from `axes` where given
    (a narrower range builds faster and uses less memory; it must lie inside the exported one)."""
    ranges = dict(entry.axes)
    for name, axis in (axes or {}).items():
        if name not in ranges:
            raise ValueError(f"{entry.part} graph has no axis {name!r}; its axes: {', '.join(ranges)}")
        exported = ranges[name]
        if axis.min < exported.min or axis.max > exported.max:
            raise ValueError(f"{entry.part}: {name} range {axis.min}..{axis.max} lies outside the exported "
                             f"{exported.min}..{exported.max}")
        ranges[name] = axis
    return tuple(InputProfile(spec.name,
                              spec.concrete({n: r.min for n, r in ranges.items()}),
                              spec.concrete({n: r.opt for n, r in ranges.items()}),
                              spec.concrete({n: r.max for n, r in ranges.items()}))
                 for spec in entry.inputs)


def _shapes_flag(profiles: tuple[InputProfile, ...], which: str) -> str:
    shapes = ",".join(f"{p.name}:{'x'.join(str(d) for d in getattr(p, which))}" for p in profiles)
    return f"--{which}Shapes={shapes}"


def trtexec_command(onnx_file: str | Path, entry: GraphEntry, precision: str, engine_file: str | Path,
                    timing_cache: str | Path | None = None, axes: dict[str, AxisRange] | None = None) -> list[str]:
    """The `trtexec` command line that builds `entry`'s engine with the same profile and
    precision as `builder.build_engine`."""
    check_precision(precision)
    profiles = input_profiles(entry, axes)
    command = ["trtexec", f"--onnx={onnx_file}", f"--saveEngine={engine_file}"]
    command += [_shapes_flag(profiles, w) for w in ("min", "opt", "max")]
    if precision != "fp32":
        command.append(f"--{precision}")
    if timing_cache is not None:
        command.append(f"--timingCacheFile={timing_cache}")
    return command
