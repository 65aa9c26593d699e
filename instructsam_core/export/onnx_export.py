"""Export the vision and head graphs to ONNX with `torch.onnx.export` (the dynamo exporter).

Why that exporter: it is torch's default and maintained path (the TorchScript exporter is
deprecated since torch 2.9), it exports these modules with symbolic batch, block and
prompt-length axes from `torch.export.Dim`s, and its output passes `onnx.checker` and
matches PyTorch on onnxruntime (see `parity`). The one adjustment it needs is
`graphs.export_attention`.

Each graph is saved with its weights as external data (`<part>.onnx` + `<part>.onnx.data`):
a real-size vision encoder is close to protobuf's 2 GB limit, and TensorRT's parser and
`trtexec` read the weights beside the file. The folder is written atomically: a crash
leaves the previous export in place, whole.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ..fileio import atomic_directory
from ..model.instructsam import InstructSam
from .graphs import (HEAD, PARTS, ExportLimits, GraphDefinition, define_graphs, example_inputs, export_attention,
                     exported_weights, fpn_level_shapes)
from .manifest import GraphEntry, Manifest, TensorSpec, file_sha256, model_hash

DEFAULT_OPSET = 18  # the dynamo exporter's lowest; TensorRT 8.6 and newer parse it
EXPORTER = "torch.onnx.export(dynamo=True)"
# float32: TensorRT 10 picks fp16/bf16 kernels itself (builder flags). float16: the graph
# is fp16 throughout, for strongly typed builds (the only kind TensorRT 11 makes).
EXPORT_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def export_onnx(model: InstructSam, out_dir: str | os.PathLike, parts: Sequence[str] = PARTS,
                opset: int = DEFAULT_OPSET, limits: ExportLimits = ExportLimits(), source: str = "",
                progress: Callable[[str], None] | None = None) -> Manifest:
    """Export `parts` of `model` to `out_dir`, replacing its contents, and write
    `manifest.json` there.

    Arguments:
        model: the InstructSAM model, its SAM3 and query projector in float32 or float16
            (see EXPORT_DTYPES; the LLM may be elsewhere, in another dtype); the graphs
            compute in their dtype.
        out_dir: the export folder (created; an existing one is replaced only on success).
        parts: which graphs, of `vision` and `head`.
        opset: ONNX opset, 18 or newer (the exporter writes nothing older).
        limits: the largest batch, block count and prompt length the graphs are set up for.
        source: where the model came from (a checkpoint path or preset), for the manifest.
        progress: called with a line per step (None: silent).
    """
    import onnx

    say = progress or (lambda _line: None)
    parts = _checked_parts(parts)
    if opset < DEFAULT_OPSET:
        raise ValueError(f"opset {opset} is too old: torch's ONNX exporter writes opset {DEFAULT_OPSET} or newer")
    dtype = exported_weights(model).dtype
    if dtype not in EXPORT_DTYPES.values():
        raise ValueError(f"export needs the model in float32 or float16, got {dtype}")
    graphs = define_graphs(model, limits)
    say("hashing the weights of the exported parts")
    manifest = Manifest(model_hash=model_hash(model), source=source, model=_model_facts(model), opset=opset,
                        exporter=EXPORTER, versions=_versions(), dtype=str(dtype).removeprefix("torch."))
    with atomic_directory(out_dir) as tmp:
        os.chmod(tmp, 0o755)  # a private temporary folder; the export is for the robot's services too
        for i, part in enumerate(parts, 1):
            graph = graphs[part]
            start = time.perf_counter()
            say(f"[{i}/{len(parts)}] {part}: tracing with torch.export and translating to ONNX opset {opset}")
            path = _export_graph(model, graph, Path(tmp), opset)
            say(f"[{i}/{len(parts)}] {part}: checking with onnx.checker")
            onnx.checker.check_model(str(path), full_check=True)
            manifest.graphs[part] = _graph_entry(graph, path, opset)
            size = sum((Path(tmp) / name).stat().st_size for name in manifest.graphs[part].sha256)
            say(f"[{i}/{len(parts)}] {part}: {path.name} written ({size / 2**20:.1f} MiB) "
                f"in {time.perf_counter() - start:.1f} s")
        manifest.write(tmp)
    return manifest


def _checked_parts(parts: Sequence[str]) -> list[str]:
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        raise ValueError(f"unknown graph part(s) {unknown or list(parts)}; choose from {', '.join(PARTS)}")
    return [p for p in PARTS if p in parts]  # in a fixed order, each once


@torch.no_grad()
def _export_graph(model: InstructSam, graph: GraphDefinition, directory: Path, opset: int) -> Path:
    from torch.export import Dim

    device = exported_weights(model).device
    dims = {name: Dim(name, min=axis.min, max=axis.max) for name, axis in graph.axes.items()}
    inputs = example_inputs(graph, graph.export_sizes, torch.Generator().manual_seed(0))
    args = tuple(inputs[spec.name].to(device, spec.dtype) for spec in graph.inputs)
    per_input = [{i: dims[d] for i, d in enumerate(spec.shape) if isinstance(d, str)} for spec in graph.inputs]
    dynamic_shapes = _by_argument(graph.module, per_input)
    with export_attention(model) if graph.part == HEAD else contextlib.nullcontext(), _exporter_noise_hidden():
        program = torch.onnx.export(graph.module, args, dynamo=True, dynamic_shapes=dynamic_shapes,
                                    input_names=[s.name for s in graph.inputs], output_names=list(graph.output_names),
                                    opset_version=opset, verbose=False)
    path = directory / f"{graph.part}.onnx"
    program.save(path, external_data=True)
    return path


@contextlib.contextmanager
def _exporter_noise_hidden():
    """Hide the exporter's messages that say nothing about these graphs: torchvision's
    operators it skips (we use none), a pytree deprecation inside torch, and its note that
    two example inputs share an axis (they do, by design: `blocks` in several inputs)."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
            warnings.filterwarnings("ignore", message="# The axis name", category=UserWarning)
            yield
    finally:
        registration.setLevel(level)


def _by_argument(module: torch.nn.Module, per_input: list[dict]) -> dict[str, object]:
    """Dynamic shapes keyed by `forward`'s parameter names, as torch.export wants them; a
    `*levels` parameter takes the remaining inputs as one tuple."""
    shapes, rest = {}, list(per_input)
    for param in inspect.signature(module.forward).parameters.values():
        if param.kind is inspect.Parameter.VAR_POSITIONAL:
            shapes[param.name], rest = tuple(rest), []
        elif rest:
            shapes[param.name] = rest.pop(0)
    return shapes


def _graph_entry(graph: GraphDefinition, path: Path, opset: int) -> GraphEntry:
    """The manifest entry, read back from the saved graph; raises if the exporter fixed an
    axis that was meant to be dynamic, or wrote another opset than asked for."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    proto = onnx.load(str(path), load_external_data=False)
    written = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    if written != opset:
        raise RuntimeError(f"{path.name}: asked for opset {opset}, the exporter wrote {written}")

    def specs(values) -> list[TensorSpec]:
        out = []
        for value in values:
            tensor = value.type.tensor_type
            shape = tuple(d.dim_param if d.dim_param else int(d.dim_value) for d in tensor.shape.dim)
            out.append(TensorSpec(value.name, onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name, shape))
        return out

    inputs, outputs = specs(proto.graph.input), specs(proto.graph.output)
    for spec, wanted in zip(inputs, graph.inputs):
        if spec.name != wanted.name or spec.shape != wanted.shape:
            raise RuntimeError(f"{path.name}: input {spec.name} has shape {spec.shape}, expected {wanted.shape} "
                               f"(the exporter fixed or merged a dynamic axis)")
    data_files = sorted({ExternalDataInfo(t).location for t in proto.graph.initializer if uses_external_data(t)})
    files = [path.name, *data_files]
    return GraphEntry(part=graph.part, file=path.name, sha256={f: file_sha256(path.parent / f) for f in files},
                      inputs=inputs, outputs=outputs, axes=dict(graph.axes), export_sizes=dict(graph.export_sizes))


def _model_facts(model: InstructSam) -> dict:
    config = model.config
    return {"num_queries": config.num_queries, "llm_hidden_size": int(model.mask_queries.shape[-1]),
            "prompt_dim": config.out_dim, "sam_image_size": config.sam_image_size,
            "max_phrase_tokens": config.max_phrase_tokens, "use_presence": config.use_presence,
            "fpn_levels": [list(s) for s in fpn_level_shapes(model)]}


def _versions() -> dict[str, str]:
    import onnx
    import onnxscript
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "onnx": onnx.__version__,
            "onnxscript": onnxscript.__version__}
