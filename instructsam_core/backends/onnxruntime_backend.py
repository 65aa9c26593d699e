"""`backend="onnxruntime"`: SAM3's exported graphs on onnxruntime (CPU), the LLM in PyTorch.

The same backend as `tensorrt` (`graph_backend`: exports on first use, the same handles,
batching and head inputs) with onnxruntime's CPU sessions in place of TensorRT engines.
It is what this project's CI can run of that backend, and a backend in its own right
for machines without an NVIDIA GPU: the graphs run on onnxruntime's CPU kernels rather
than PyTorch's. On the CPU, tensors and onnxruntime's numpy arrays share their memory,
so nothing is copied on the way in or out (beyond a cast where a dtype differs).
Registered where onnxruntime is installed (the `export` extra).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .graph_backend import GraphBackend, GraphOptions


@dataclass
class OnnxRuntimeOptions(GraphOptions):
    """Settings of the onnxruntime backend: those of every graph backend (`GraphOptions`)."""


class OnnxRuntimeBackend(GraphBackend):
    """SAM3's vision and head graphs on onnxruntime's CPU execution provider."""

    name = "onnxruntime"
    device_type = "cpu"

    def _wrong_device_message(self) -> str:
        return (f"the onnxruntime backend runs on the CPU, not {self.device}: on a GPU use backend='tensorrt' "
                f"(or 'compiled'), or pass device='cpu'")

    def _open_graphs(self, folder: Path) -> None:
        from ..export.onnxruntime_runner import OnnxRuntimeRunner

        self.manifest.verify_files(folder)  # onnxruntime reads these very files
        self.runner = OnnxRuntimeRunner(folder, "cpu")
        for part in self.manifest.graphs:
            self.runner.session(part)  # opened now: a broken graph fails at load, not on the first frame

    def _run(self, part: str, inputs: dict[str, torch.Tensor], stream=None) -> dict[str, torch.Tensor]:
        return self.runner.run(part, inputs)

    def release(self) -> None:
        super().release()
        self.runner = None
