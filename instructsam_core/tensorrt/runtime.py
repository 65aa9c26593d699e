"""Run TensorRT engines on torch CUDA tensors, with no host copies.

`TensorRtEngine.run` binds the device pointers of the caller's input tensors and of
output tensors it allocates with torch (`set_tensor_address`), and enqueues the engine
on a torch CUDA stream (`execute_async_v3`): nothing is copied to or from the host and
nothing synchronises, so the outputs are ready in that stream's order, like any torch
kernel's. A backend keeps the vision engine's outputs as a frame's opaque handle and
hands them to the head engine as they are. `TensorRtRunner` is the parity check's runner.
Importing this module needs tensorrt.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import tensorrt as trt
import torch

from .profiles import PARITY_PRECISION

_LOGGER = trt.Logger(trt.Logger.WARNING)

_TORCH_DTYPES = {
    trt.DataType.FLOAT: torch.float32,
    trt.DataType.HALF: torch.float16,
    trt.DataType.INT32: torch.int32,
    trt.DataType.INT64: torch.int64,
    trt.DataType.BOOL: torch.bool,
    trt.DataType.INT8: torch.int8,
    trt.DataType.UINT8: torch.uint8,
}
if hasattr(trt.DataType, "BF16"):
    _TORCH_DTYPES[trt.DataType.BF16] = torch.bfloat16


def _torch_dtype(name: str, dtype) -> torch.dtype:
    if dtype not in _TORCH_DTYPES:
        raise ValueError(f"engine tensor {name} has type {dtype}, which this runtime does not bind")
    return _TORCH_DTYPES[dtype]


class TensorRtEngine:
    """One deserialized engine and its execution context on a CUDA device.

    Not thread-safe: one `run` at a time per engine (an execution context holds the
    shapes and addresses of the call in flight).

    Arguments:
        serialized: the engine, as `builder.build_engine` or `trtexec --saveEngine` wrote it.
        device: the CUDA device it runs on (the one it was built for).
    """

    def __init__(self, serialized: bytes, device: torch.device | str | int = "cuda"):
        self.device = torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
        if self.device.type != "cuda":
            raise ValueError(f"TensorRT engines run on a CUDA device, not {self.device}")
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        with torch.cuda.device(self.device):
            self.runtime = trt.Runtime(_LOGGER)
            self.engine = self.runtime.deserialize_cuda_engine(serialized)
            if self.engine is None:
                raise RuntimeError("TensorRT could not load the engine: it was built by another TensorRT version "
                                   "or for another GPU (rebuild it; the engine cache does so by itself)")
            self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.input_names = [n for n in names if is_input[n]]
        self.output_names = [n for n in names if not is_input[n]]
        self.dtypes = {n: _torch_dtype(n, self.engine.get_tensor_dtype(n)) for n in names}

    @classmethod
    def from_file(cls, path: str | os.PathLike, device: torch.device | str | int = "cuda") -> "TensorRtEngine":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"engine file {path} does not exist")
        return cls(path.read_bytes(), device)

    def profile_shapes(self, name: str) -> tuple[tuple[int, ...], ...]:
        """(min, opt, max) shapes of an input in the engine's optimization profile."""
        return tuple(tuple(s) for s in self.engine.get_tensor_profile_shape(name, 0))

    def run(self, inputs: Mapping[str, torch.Tensor], stream: torch.cuda.Stream | None = None
            ) -> dict[str, torch.Tensor]:
        """Enqueue the engine on `stream` (default: the device's current stream).

        Inputs must be CUDA tensors on the engine's device in the engine's dtypes (a
        non-contiguous one is made contiguous on the device). Returns new output tensors;
        they are valid once `stream` has run this far.
        """
        missing = [n for n in self.input_names if n not in inputs]
        if missing:
            raise ValueError(f"missing engine input(s) {missing}; the engine takes {self.input_names}")
        stream = stream or torch.cuda.current_stream(self.device)
        bound = []
        for name in self.input_names:
            tensor = inputs[name]
            if tensor.device != self.device:
                raise ValueError(f"input {name} is on {tensor.device}; the engine runs on {self.device}")
            if tensor.dtype != self.dtypes[name]:
                raise ValueError(f"input {name} is {tensor.dtype}; the engine takes {self.dtypes[name]}")
            tensor = tensor.contiguous()
            if not self.context.set_input_shape(name, tuple(tensor.shape)):
                low, _, high = self.profile_shapes(name)
                raise ValueError(f"input {name} has shape {tuple(tensor.shape)}, outside the engine's profile "
                                 f"{low}..{high}")
            self.context.set_tensor_address(name, tensor.data_ptr())
            bound.append(tensor)
        outputs = {}
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            outputs[name] = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        with torch.cuda.device(self.device):
            if not self.context.execute_async_v3(stream.cuda_stream):
                raise RuntimeError("TensorRT failed to enqueue the engine (see its log above)")
        # The caching allocator must not reuse these buffers before `stream` is done with them.
        for tensor in bound + list(outputs.values()):
            tensor.record_stream(stream)
        return outputs


class TensorRtRunner:
    """The parity check's runner over engines, one per graph part (a `parity.GraphRunner`).

    Arguments:
        engines: part -> engine.
        precision: what the engines were built in (fp32, fp16 or bf16), for the tolerances.
    """

    def __init__(self, engines: dict[str, TensorRtEngine], precision: str):
        if precision not in PARITY_PRECISION:
            raise ValueError(f"unknown engine precision {precision!r}; choose from {', '.join(PARITY_PRECISION)}")
        self.engines = engines
        self.precision = PARITY_PRECISION[precision]
        self.name = f"TensorRT {trt.__version__} ({precision}, {torch.cuda.get_device_name()})"

    def run(self, part: str, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if part not in self.engines:
            raise ValueError(f"no {part} engine given (have: {', '.join(self.engines) or 'none'})")
        engine = self.engines[part]
        feeds = {n: inputs[n].to(engine.device, engine.dtypes[n]) for n in engine.input_names if n in inputs}
        outputs = engine.run(feeds)
        torch.cuda.current_stream(engine.device).synchronize()  # parity reads the values on the host
        return outputs
