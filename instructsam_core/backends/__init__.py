"""Inference backends: where the model's three stages run.

A backend takes preprocessed tensors and returns model outputs for the three stages the
engine times apart: `encode_frames` (image encoders and the shared prompt prefix, once per
frame), `generate` (the LLM with its query blocks, once per instruction) and
`segment_phrases` (the SAM3 head); the first and last take several frames at once. The
engine does all pre- and post-processing, so an accelerated backend replaces only these
calls. `base.py` is the door every backend fits through. Registered: "eager" (plain
PyTorch) and "compiled" (torch.compile, static KV cache, CUDA graphs on a GPU) always;
"tensorrt" (SAM3 as TensorRT engines, the LLM compiled) only where tensorrt imports, and
"onnxruntime" (SAM3's graphs on onnxruntime's CPU, the LLM in PyTorch) only where
onnxruntime is installed. Asking for one of those two elsewhere says what to install.
"""

from __future__ import annotations

import importlib.util

from .base import STAGES, Backend, FrameHandle, FrameInput, StageTimer
from .compiled import CompiledBackend, CompiledOptions
from .eager import EagerBackend
from .onnxruntime_backend import OnnxRuntimeBackend, OnnxRuntimeOptions
from .tensorrt_backend import TensorRtBackend, TensorRtOptions


def _onnxruntime_status() -> tuple[bool, str]:
    if importlib.util.find_spec("onnxruntime") is None:
        return False, "onnxruntime is not installed (pip install 'instructsam[export]')"
    return True, ""


def _tensorrt_status() -> tuple[bool, str]:
    from ..tensorrt import tensorrt_status

    usable, reason = tensorrt_status()
    if usable:
        return True, ""
    return False, (f"{reason}. On a Jetson it comes with JetPack (a venv made with --system-site-packages sees "
                   f"it); on a desktop GPU install TensorRT 10 from NVIDIA: `pip install tensorrt` (its wheels "
                   f"fetch the libraries from NVIDIA's index, https://pypi.nvidia.com) or NVIDIA's tar/deb "
                   f"packages. See docs/acceleration.md")


# Backends that need a library that may be missing: (class, options, availability check).
OPTIONAL_BACKENDS = {
    "tensorrt": (TensorRtBackend, TensorRtOptions, _tensorrt_status),
    "onnxruntime": (OnnxRuntimeBackend, OnnxRuntimeOptions, _onnxruntime_status),
}
BACKENDS: dict[str, type[Backend]] = {"eager": EagerBackend, "compiled": CompiledBackend}
# Each backend's options: a dataclass whose fields `backend_options` may set (None: none).
BACKEND_OPTIONS = {"eager": None, "compiled": CompiledOptions}
UNAVAILABLE: dict[str, str] = {}  # optional backend -> why it is not registered here
for _name, (_backend, _options, _status) in OPTIONAL_BACKENDS.items():
    _usable, _reason = _status()
    if _usable:
        BACKENDS[_name], BACKEND_OPTIONS[_name] = _backend, _options
    else:
        UNAVAILABLE[_name] = _reason


def available_backends() -> list[str]:
    """Names accepted by `create_backend` (and the node's `backend` parameter)."""
    return sorted(BACKENDS)


def check_backend_options(name: str, options: dict):
    """The backend's options object (None for a backend without options); ValueError for
    an unknown or unavailable backend or an unknown or bad option, naming it."""
    if name in UNAVAILABLE:
        raise ValueError(f"backend {name!r} is not available here: {UNAVAILABLE[name]}")
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
           "CompiledOptions", "OnnxRuntimeBackend", "OnnxRuntimeOptions", "TensorRtBackend", "TensorRtOptions",
           "available_backends", "check_backend_options", "create_backend", "BACKENDS", "UNAVAILABLE"]
