"""What each stage of the engine costs at least: FLOPs and bytes over the GPU's peak.

Counted on one run of the eager backend (the compiled backend does the same math):

- FLOPs: `torch.utils.flop_counter.FlopCounterMode` (matrix products, convolutions and
  attention; elementwise work is not counted, so compute floors are slightly low).
- Bytes: every tensor a stage reads that it did not produce itself, once, at its storage's
  size: the weights it touches, the KV cache, the frame's features. What a stage makes
  and consumes on its own is assumed to stay on chip, so this is a floor too (an
  embedding lookup is charged the whole table; with tied embeddings the LM head reads it
  anyway).

The floor of a stage is max(FLOPs / peak FLOP/s, bytes / peak bandwidth): no kernel can
beat it. Peaks come from `GPU_PEAKS` (bf16 dense tensor throughput and memory bandwidth)
or from the command line.
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

# name fragment -> (bf16 dense TFLOP/s, GB/s): measured where this project measured them.
GPU_PEAKS = {
    "H200": (788.0, 4300.0),  # measured on the lent H200 (8192^3 bf16 matmul; device copy)
    "H100": (790.0, 3000.0),  # measured on the lent H100 (REFERENCE.md)
    "A100": (312.0, 2039.0),  # data sheet, SXM 80 GB
}


def gpu_peaks(device_name: str | None) -> tuple[float, float] | None:
    """(TFLOP/s, GB/s) for a known GPU name, else None."""
    for fragment, peaks in GPU_PEAKS.items():
        if device_name and fragment in device_name:
            return peaks
    return None


class _ReadBytes(TorchDispatchMode):
    """Bytes of the storages a region reads that it did not produce."""

    def __init__(self):
        super().__init__()
        self.produced: set[int] = set()
        self.read: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                if storage.data_ptr() not in self.produced:
                    self.read[storage.data_ptr()] = storage.nbytes()
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.produced.add(t.untyped_storage().data_ptr())
        return out


class StageCosts:
    """Accumulates FLOPs and bytes read per stage; pass `wrap` to a `StageTimer`."""

    def __init__(self):
        self.flops: dict[str, int] = defaultdict(int)
        self.bytes: dict[str, int] = defaultdict(int)
        self.calls: dict[str, int] = defaultdict(int)

    @contextmanager
    def wrap(self, stage: str):
        flops, reads = FlopCounterMode(display=False), _ReadBytes()
        with flops, reads:
            yield
        self.flops[stage] += flops.get_total_flops()
        self.bytes[stage] += sum(reads.read.values())
        self.calls[stage] += 1

    def per_call(self) -> dict[str, dict[str, float]]:
        """Per stage, per call: GFLOP and MB read."""
        return {stage: {"gflop": self.flops[stage] / self.calls[stage] / 1e9,
                        "mbytes": self.bytes[stage] / self.calls[stage] / 1e6}
                for stage in self.calls}


def floor_ms(cost: dict[str, float], peaks: tuple[float, float] | None) -> float | None:
    """The roofline floor of one call, in ms, or None without peaks."""
    if peaks is None:
        return None
    tflops, gbps = peaks
    return 1e3 * max(cost["gflop"] * 1e9 / (tflops * 1e12), cost["mbytes"] * 1e6 / (gbps * 1e9))
