"""`manifest.json`: what an export folder holds, and what built it.

One entry per graph: its files and their SHA-256, input and output names, dtypes and
shapes (an int is fixed, a string names a dynamic axis), each axis's range (TensorRT's
min/opt/max), and the sizes it was traced with. Around them: the hash of the weights it
was exported from, the opset, and the exporter's and libraries' versions. Engine caches
and the parity check key on it; nothing in it needs onnx to read.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..fileio import write_text_atomic
from .graphs import PARTS, AxisRange

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class TensorSpec:
    """A graph input or output: `dtype` as numpy names it (float32, bool, int64)."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    def concrete(self, sizes: dict[str, int]) -> tuple[int, ...]:
        """The shape with each dynamic axis set from `sizes`."""
        missing = [d for d in self.shape if isinstance(d, str) and d not in sizes]
        if missing:
            raise ValueError(f"{self.name}: no size given for axis {missing[0]!r}")
        return tuple(sizes[d] if isinstance(d, str) else d for d in self.shape)


@dataclass
class GraphEntry:
    """One exported graph (see the module docstring)."""

    part: str
    file: str
    sha256: dict[str, str]  # file name -> digest, the graph and its external weights
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    axes: dict[str, AxisRange]
    export_sizes: dict[str, int]


@dataclass
class Manifest:
    """An export folder's manifest (see the module docstring)."""

    model_hash: str
    source: str  # the checkpoint directory or preset it was exported from
    model: dict[str, Any]  # architecture facts the graphs depend on
    opset: int
    exporter: str
    versions: dict[str, str]
    dtype: str = "float32"  # what the graphs compute in (their weights and float tensors)
    graphs: dict[str, GraphEntry] = field(default_factory=dict)
    format: int = FORMAT_VERSION

    def graph(self, part: str) -> GraphEntry:
        if part not in self.graphs:
            raise ValueError(f"the export holds no {part!r} graph (it has: {', '.join(self.graphs) or 'none'}); "
                             f"export it with --parts {part}")
        return self.graphs[part]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for entry in data["graphs"].values():
            for spec in entry["inputs"] + entry["outputs"]:
                spec["shape"] = list(spec["shape"])
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Manifest":
        try:
            if data["format"] != FORMAT_VERSION:
                raise ValueError(f"manifest format {data['format']} is not {FORMAT_VERSION}; export again")
            graphs = {part: _entry_from_dict(part, entry) for part, entry in data["graphs"].items()}
            return cls(model_hash=data["model_hash"], source=data["source"], model=dict(data["model"]),
                       opset=int(data["opset"]), exporter=data["exporter"], versions=dict(data["versions"]),
                       dtype=data["dtype"], graphs=graphs)
        except KeyError as err:
            raise ValueError(f"manifest is missing the field {err.args[0]!r}") from err

    def write(self, directory: str | os.PathLike) -> Path:
        path = Path(directory) / MANIFEST_NAME
        write_text_atomic(path, json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def read(cls, directory: str | os.PathLike) -> "Manifest":
        path = Path(directory) / MANIFEST_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: export the graphs first (instructsam export --out DIR)")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from err
        return cls.from_dict(data)

    def verify_files(self, directory: str | os.PathLike, parts: list[str] | None = None) -> None:
        """Raise ValueError if a graph's file is missing or differs from what was exported."""
        for part in parts or list(self.graphs):
            for name, digest in self.graph(part).sha256.items():
                path = Path(directory) / name
                if not path.is_file():
                    raise ValueError(f"{path} is missing ({part} graph); export again")
                if file_sha256(path) != digest:
                    raise ValueError(f"{path} changed since it was exported (SHA-256 differs from the manifest); "
                                     f"export again")


def _entry_from_dict(part: str, entry: dict[str, Any]) -> GraphEntry:
    if part not in PARTS:
        raise ValueError(f"manifest names an unknown graph {part!r}; known: {', '.join(PARTS)}")
    specs = lambda items: [TensorSpec(s["name"], s["dtype"], tuple(s["shape"])) for s in items]  # noqa: E731
    return GraphEntry(part=part, file=entry["file"], sha256=dict(entry["sha256"]), inputs=specs(entry["inputs"]),
                      outputs=specs(entry["outputs"]),
                      axes={name: AxisRange(**r) for name, r in entry["axes"].items()},
                      export_sizes={k: int(v) for k, v in entry["export_sizes"].items()})


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def model_hash(model) -> str:
    """SHA-256 of what the graphs compute from: the SAM3 detector's and the query
    projector's weights (as float32, so a bf16 checkpoint hashes the same loaded in either
    dtype) and the config fields that shape the graphs. Equal hashes: same graphs' weights."""
    config = model.config
    facts = {"sam3": config.sam3, "num_queries": config.num_queries, "out_dim": config.out_dim,
             "sam_image_size": config.sam_image_size, "use_presence": config.use_presence}
    digest = hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode())
    modules = {"grounding_model": model.grounding_model, "mask_hidden_fcs": model.mask_hidden_fcs}
    for prefix, module in modules.items():
        for name, tensor in sorted(module.state_dict().items()):
            data = tensor.detach().to("cpu", torch.float32).contiguous()
            digest.update(f"{prefix}.{name}:{tuple(data.shape)}".encode())
            digest.update(data.numpy())  # the buffer itself, no copy
    return digest.hexdigest()
