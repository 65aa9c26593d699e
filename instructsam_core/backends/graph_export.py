"""The exported graphs a graph backend runs: found for its model, or exported on first use.

A backend that runs SAM3 as exported graphs (`graph_backend`) needs the ONNX export of its
own model's vision encoder and head. Either the user names an export folder (made by
`instructsam export`, or an empty folder to export into), or the backend keeps one per
model in the cache, `<root>/<weights hash>-<dtype>-b<max batch>-k<max blocks>/` with the
root `$INSTRUCTSAM_CACHE/onnx`, else `~/.cache/instructsam/onnx` (beside the TensorRT
engine cache). A folder is used only when its manifest names this model's weights hash
(`export.manifest.model_hash`); a cache folder that does not is exported anew, a folder the
user named is refused, never overwritten.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from pathlib import Path

import torch

from ..export.graphs import HEAD, PARTS, ExportLimits
from ..export.manifest import MANIFEST_NAME, Manifest, model_hash
from ..model.instructsam import InstructSam
from ..tensorrt.cache import default_cache_dir

GRAPH_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def default_graph_root() -> Path:
    """`$INSTRUCTSAM_CACHE/onnx`, else `$XDG_CACHE_HOME/instructsam/onnx` (~/.cache):
    beside the engine cache (`tensorrt.cache.default_cache_dir`)."""
    return default_cache_dir().parent / "onnx"


def cache_folder(digest: str, dtype: str, limits: ExportLimits) -> Path:
    """Where the cache keeps the graphs of the model whose weights hash is `digest`."""
    return default_graph_root() / f"{digest[:16]}-{dtype}-b{limits.max_batch}-k{limits.max_blocks}"


def graphs_for(model: InstructSam, onnx_dir: str | os.PathLike | None, dtype: str, limits: ExportLimits,
               progress: Callable[[str], None], source: str = "") -> Path:
    """The export folder of `model`'s vision and head graphs, exporting them first if needed.

    Arguments:
        model: the model; exporting moves its SAM3 and query projector to the CPU in
            `dtype` (the backend drops them afterwards; the graphs hold them).
        onnx_dir: an export folder; None: one per model in the cache (module docstring).
        dtype: what the graphs compute in when exported here ("float32" or "float16").
        limits: the largest batch and block count of graphs exported here.
        progress: called with a line per step of an export.
        source: where the model came from, for the manifest.
    """
    if dtype not in GRAPH_DTYPES:
        raise ValueError(f"graph dtype must be one of {sorted(GRAPH_DTYPES)}, got {dtype!r}")
    digest = model_hash(model)
    if onnx_dir is not None:
        folder = Path(onnx_dir)
        if (folder / MANIFEST_NAME).is_file():
            problem = _unusable(Manifest.read(folder), digest, None, model.config.max_phrase_tokens)
            if problem:
                raise ValueError(f"the export in {folder} cannot serve this model: {problem}; export this model's "
                                 f"graphs there anew (instructsam export --checkpoint ... --out {folder}), or leave "
                                 f"onnx_dir unset to keep them in the cache")
            return folder
        if folder.is_dir() and any(folder.iterdir()):
            raise ValueError(f"{folder} holds files but no {MANIFEST_NAME}: not an export folder; name an empty "
                             f"or new folder to export into, or an `instructsam export` folder")
        reason = f"{folder} holds no export yet"
    else:
        folder = cache_folder(digest, dtype, limits)
        try:
            reason = (_unusable(Manifest.read(folder), digest, dtype, model.config.max_phrase_tokens)
                      if (folder / MANIFEST_NAME).is_file() else f"no export of this model in {folder} yet")
        except ValueError as err:  # an unreadable manifest: export anew
            reason = str(err)
        if not reason:
            return folder
    _export(model, folder, dtype, limits, progress, source, reason)
    return folder


def _unusable(manifest: Manifest, digest: str, dtype: str | None, prompt_tokens: int) -> str:
    """Why an export cannot serve the model whose weights hash is `digest` and whose phrases
    are padded to `prompt_tokens` ("" if it can)."""
    if manifest.model_hash != digest:
        return "it was exported from other weights (its weights hash differs)"
    missing = [part for part in PARTS if part not in manifest.graphs]
    if missing:
        return f"it lacks the {', '.join(missing)} graph"
    longest = manifest.graph(HEAD).axes["prompt_len"].max
    if longest < prompt_tokens:
        return f"its head takes prompts of up to {longest} tokens, not the model's {prompt_tokens} (--max-prompt-tokens)"
    if dtype is not None and manifest.dtype != dtype:
        return f"its graphs are {manifest.dtype}, not {dtype}"
    return ""


def _export(model: InstructSam, folder: Path, dtype: str, limits: ExportLimits, progress: Callable[[str], None],
            source: str, reason: str) -> None:
    missing = [name for name in ("onnx", "onnxscript") if importlib.util.find_spec(name) is None]
    if missing:
        raise ValueError(f"{reason}, and exporting the graphs needs {' and '.join(missing)} (pip install "
                         f"'instructsam[export]'), or export them elsewhere with `instructsam export` and pass "
                         f"their folder as onnx_dir")
    from ..export.onnx_export import export_onnx

    progress(f"{reason}: exporting SAM3's vision encoder and head to ONNX ({dtype}) into {folder}, once "
             f"(minutes at real size)")
    # Traced on the CPU, where the export is tested; these weights leave the GPU for good.
    for part in (model.grounding_model, model.mask_hidden_fcs):
        part.to("cpu", GRAPH_DTYPES[dtype])
    export_onnx(model, folder, limits=limits, source=source, progress=progress)
