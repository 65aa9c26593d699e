"""Inference backends: where the model's three stages run.

A backend takes preprocessed tensors and returns model outputs for the three stages the
engine times apart: `encode_frames` (image encoders and the shared prompt prefix, once per
frame), `generate` (the LLM with its query blocks, once per instruction) and
`segment_phrases` (the SAM3 head); the first and last take several frames at once. The
engine does all pre- and post-processing, so an accelerated backend (compiled PyTorch,
TensorRT) replaces only these calls. Only backends that exist are registered.
"""

from __future__ import annotations

from .base import Backend, FrameFeatures, FrameInput
from .eager import EagerBackend

BACKENDS: dict[str, type[Backend]] = {"eager": EagerBackend}


def available_backends() -> list[str]:
    """Names accepted by `create_backend` (and the node's `backend` parameter)."""
    return sorted(BACKENDS)


def create_backend(name: str, model, device, dtype) -> Backend:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; available: {available_backends()}")
    return BACKENDS[name](model, device, dtype)


__all__ = ["Backend", "FrameFeatures", "FrameInput", "EagerBackend", "available_backends", "create_backend", "BACKENDS"]
