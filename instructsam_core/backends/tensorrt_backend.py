"""`backend="tensorrt"`: SAM3's vision encoder and head as TensorRT engines, the LLM in
compiled PyTorch.

The engines are built from the exported ONNX graphs (exported on first use, see
`graph_export`) by `tensorrt.builder.engine_for`: parsed with TensorRT's ONNX parser,
one optimization profile over the export's axis ranges, the chosen precision, a timing
cache; each build reports its phases, and engines are cached on disk per GPU, TensorRT
version, precision, graph and weights, so a restart loads them. They run on torch CUDA
tensors (`tensorrt.runtime.TensorRtEngine`: device pointers bound, enqueued on a torch
stream), so the vision engine's outputs stay on the GPU as a frame's features and feed
the head engine as they are: no host copies. Why the LLM stays in PyTorch:
`graph_backend` and docs/acceleration.md.

Importing this module needs no tensorrt (the options are checked everywhere); building
the backend does. It is registered only where `tensorrt` imports. This project's CI has
never run it (no TensorRT there): docs/acceleration.md has the recipe for a Jetson and a
desktop GPU.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ..tensorrt.profiles import check_precision
from .graph_backend import GraphBackend, GraphOptions

log = logging.getLogger(__name__)


@dataclass
class TensorRtOptions(GraphOptions):
    """Settings of the tensorrt backend: `GraphOptions`, and

    Attributes:
        engine_dir: the engine cache (as `instructsam engine --engine-cache`); None:
            `$INSTRUCTSAM_CACHE/tensorrt`, else ~/.cache/instructsam/tensorrt.
        precision: what the engines compute in, "fp16", "bf16" or "fp32". On TensorRT 10
            a builder flag over float32 graphs; TensorRT 11 builds only the graph's own
            types, so there graphs exported here for fp16 are float16.
        workspace_mib: cap on TensorRT's scratch memory while building (0: its default,
            up to the GPU's memory; set it on a Jetson whose memory the LLM shares).
    """

    engine_dir: str | None = None
    precision: str = "fp16"
    workspace_mib: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_precision(self.precision)
        if self.workspace_mib < 0:
            raise ValueError(f"workspace_mib must be >= 0 (0: TensorRT's default), got {self.workspace_mib}")


class TensorRtBackend(GraphBackend):
    """SAM3's vision and head graphs as TensorRT engines on a CUDA GPU."""

    name = "tensorrt"
    device_type = "cuda"

    def _wrong_device_message(self) -> str:
        return f"the tensorrt backend runs on a CUDA GPU, not {self.device}: pass device='cuda' (or 'cuda:N')"

    def graph_dtype(self) -> str:
        from ..tensorrt.builder import tensorrt_major

        # TensorRT 11 has no fp16 builder flag: an fp16 engine comes from an fp16 graph.
        return "float16" if self.options.precision == "fp16" and tensorrt_major() >= 11 else "float32"

    def _open_graphs(self, folder: Path) -> None:
        from ..tensorrt.builder import engine_for
        from ..tensorrt.cache import EngineCache
        from ..tensorrt.runtime import TensorRtEngine

        options = self.options
        cache = EngineCache(options.engine_dir)
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        self.engines = {}
        for part in self.manifest.graphs:
            path, built = engine_for(folder, part, options.precision, cache, device_index=index,
                                     workspace_bytes=options.workspace_mib * 2**20 or None, progress=True)
            if not built:
                log.info("tensorrt backend: the %s engine (%s) from the cache: %s", part, options.precision, path)
            self.engines[part] = TensorRtEngine.from_file(path, torch.device("cuda", index))

    def _run(self, part: str, inputs: dict[str, torch.Tensor], stream: torch.cuda.Stream | None
             ) -> dict[str, torch.Tensor]:
        return self.engines[part].run(inputs, stream)

    def release(self) -> None:
        super().release()
        self.engines = {}
        torch.cuda.empty_cache()
