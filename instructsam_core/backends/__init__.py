"""Inference backends: where the model's three stages run.

A backend takes preprocessed tensors and returns model outputs for the three stages the
engine times apart: `encode_frames` (image encoders and the shared prompt prefix, once per
frame), `generate` (the LLM with its query blocks, once per instruction) and
`segment_phrases` (the SAM3 head); the first and last take several frames at once. The
engine does all pre- and post-processing, so an accelerated backend replaces only these
calls. `base.py` is the door every backend fits through; only backends that exist are
registered: "eager" (plain PyTorch) and "compiled" (torch.compile, static KV cache, CUDA
graphs on a GPU).
"""

from __future__ import annotations

from .base import STAGES, Backend, FrameHandle, FrameInput, StageTimer
from .compiled import CompiledBackend, CompiledOptions
from .eager import EagerBackend

BACKENDS: dict[str, type[Backend]] = {"eager": EagerBackend, "compiled": CompiledBackend}
# Each backend's options: a dataclass whose fields `backend_options` may set (None: none).
BACKEND_OPTIONS = {"eager": None, "compiled": CompiledOptions}


def available_backends() -> list[str]:
    """Names accepted by `create_backend` (and the node's `backend` parameter)."""
    return sorted(BACKENDS)


def check_backend_options(name: str, options: dict):
    """The backend's options object (None for a backend without options); ValueError for
    an unknown backend or option, naming it."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; available: {available_backends()}")
    kind = BACKEND_OPTIONS[name]
    if kind is None:
        if options:
            raise ValueError(f"backend {name!r} takes no options, got {sorted(options)}")
        return None
    known = sorted(kind.__dataclass_fields__)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} of backend {name!r}; known: {known}")
    return kind(**options)


def create_backend(name: str, model, device, dtype, options: dict | None = None) -> Backend:
    """A backend over `model` on `device` in `dtype`, with its `options`."""
    parsed = check_backend_options(name, options or {})
    if parsed is None:
        return BACKENDS[name](model, device, dtype)
    return BACKENDS[name](model, device, dtype, parsed)


__all__ = ["STAGES", "Backend", "FrameHandle", "FrameInput", "StageTimer", "EagerBackend", "CompiledBackend",
           "CompiledOptions", "available_backends", "check_backend_options", "create_backend", "BACKENDS"]
