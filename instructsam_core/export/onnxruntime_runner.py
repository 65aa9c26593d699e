"""Run exported graphs on onnxruntime: the CPU everywhere, the CUDA execution provider where
the installed onnxruntime has it (`onnxruntime-gpu`). A `parity.GraphRunner`."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .manifest import Manifest


# onnxruntime's names of the float input types the exporter writes
_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class OnnxRuntimeRunner:
    """One onnxruntime session per graph of an export folder, opened on first use.

    Arguments:
        directory: the export folder (graphs + manifest.json).
        device: "cpu" or "cuda" (the CUDA execution provider, TF32 off so that fp32 stays fp32).
    """

    def __init__(self, directory: str | os.PathLike, device: str = "cpu"):
        import onnxruntime as ort

        self.directory = Path(directory)
        self.manifest = Manifest.read(self.directory)
        self.precision = self.manifest.dtype  # onnxruntime computes in the graph's own types
        if device == "cpu":
            self.providers: list = ["CPUExecutionProvider"]
        elif device.startswith("cuda"):
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise ValueError("this onnxruntime has no CUDA execution provider (install onnxruntime-gpu), "
                                 "or run the check on the CPU")
            index = int(device.split(":", 1)[1]) if ":" in device else 0
            self.providers = [("CUDAExecutionProvider", {"device_id": index, "use_tf32": 0}), "CPUExecutionProvider"]
        else:
            raise ValueError(f"unknown device {device!r} for onnxruntime; use cpu or cuda[:N]")
        self.name = f"onnxruntime {ort.__version__} ({'CUDA' if device != 'cpu' else 'CPU'})"
        self._sessions: dict = {}

    def session(self, part: str):
        if part not in self._sessions:
            import onnxruntime as ort

            path = self.directory / self.manifest.graph(part).file
            self._sessions[part] = ort.InferenceSession(str(path), providers=self.providers)
        return self._sessions[part]

    def run(self, part: str, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        session = self.session(part)
        names = [i.name for i in session.get_inputs()]
        missing = [n for n in names if n not in inputs]
        if missing:
            raise ValueError(f"{part} graph: missing input(s) {missing}")
        feeds = {i.name: np.ascontiguousarray(inputs[i.name].detach().cpu().numpy(), dtype=_NUMPY_TYPES.get(i.type))
                 for i in session.get_inputs()}
        outputs = session.run(None, feeds)
        return {o.name: torch.from_numpy(v) for o, v in zip(session.get_outputs(), outputs)}
