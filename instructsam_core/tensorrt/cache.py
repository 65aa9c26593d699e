"""The engine cache: a built engine is reused only by the same GPU, TensorRT, precision,
graph and weights.

A TensorRT engine is specific to the GPU model (compute capability, and in practice the
exact device), the TensorRT version, the build precision and the optimization profile,
and of course to the ONNX graph and weights it came from. `EngineKey` holds all of them;
its digest names the file, and the key is stored beside the engine as JSON so a lookup
checks every field rather than trusting a hash prefix. Nothing here imports tensorrt.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from ..fileio import atomic_file, write_text_atomic
from .profiles import InputProfile, check_precision

@dataclass(frozen=True)
class EngineKey:
    """Everything an engine depends on (see the module docstring)."""

    part: str
    model_hash: str
    onnx_sha256: str  # of the graph and its external weights, together
    precision: str
    tensorrt_version: str
    gpu_name: str
    compute_capability: str  # "8.7" on a Jetson Orin, "9.0" on an H100
    profile: tuple[InputProfile, ...]

    def __post_init__(self) -> None:
        check_precision(self.precision)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["profile"] = [{**p, "min": list(p["min"]), "opt": list(p["opt"]), "max": list(p["max"])}
                           for p in data["profile"]]
        return data

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    def file_stem(self) -> str:
        sm = self.compute_capability.replace(".", "")
        return f"{self.part}-{self.precision}-sm{sm}-trt{self.tensorrt_version}-{self.digest()[:16]}"


def default_cache_dir() -> Path:
    """`$INSTRUCTSAM_CACHE/tensorrt`, else `$XDG_CACHE_HOME/instructsam/tensorrt`, else
    `~/.cache/instructsam/tensorrt`."""
    if os.environ.get("INSTRUCTSAM_CACHE"):
        return Path(os.environ["INSTRUCTSAM_CACHE"]) / "tensorrt"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "instructsam" / "tensorrt"


class EngineCache:
    """Engines on disk, `<stem>.engine` beside `<stem>.json` (its key). Writes are atomic:
    a build interrupted half-way leaves no engine behind to be loaded later."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root) if root is not None else default_cache_dir()

    def engine_path(self, key: EngineKey) -> Path:
        return self.root / f"{key.file_stem()}.engine"

    def key_path(self, key: EngineKey) -> Path:
        return self.root / f"{key.file_stem()}.json"

    def lookup(self, key: EngineKey) -> Path | None:
        """The cached engine for `key`, or None (absent, or its stored key differs)."""
        engine, stored = self.engine_path(key), self.key_path(key)
        if not (engine.is_file() and stored.is_file()):
            return None
        try:
            if json.loads(stored.read_text(encoding="utf-8")) != key.to_dict():
                return None
        except json.JSONDecodeError:
            return None
        return engine

    def store(self, key: EngineKey, serialized: bytes) -> Path:
        """Write an engine and then its key (the key last: a lookup needs both)."""
        path = self.engine_path(key)
        with atomic_file(path) as tmp:
            tmp.write_bytes(serialized)
        write_text_atomic(self.key_path(key), json.dumps(key.to_dict(), indent=2) + "\n")
        return path

    def timing_cache_path(self, gpu_name: str, compute_capability: str, tensorrt_version: str) -> Path:
        """Where the timing cache of one GPU model and TensorRT version lives: it holds
        kernel timings, so it is shared by every engine built there and speeds up rebuilds."""
        gpu = "".join(c if c.isalnum() else "-" for c in gpu_name).strip("-").lower()
        return self.root / f"timing-{gpu}-sm{compute_capability.replace('.', '')}-trt{tensorrt_version}.cache"


def gpu_identity(device_index: int = 0) -> tuple[str, str]:
    """(name, compute capability) of a CUDA device, via torch."""
    import torch

    if not torch.cuda.is_available():
        raise ValueError("TensorRT engines need a CUDA GPU, and torch sees none on this machine")
    props = torch.cuda.get_device_properties(device_index)
    return props.name, f"{props.major}.{props.minor}"
