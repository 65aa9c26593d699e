"""Parity: do the exported graphs compute what the PyTorch path computes?

A *runner* executes an exported graph (`OnnxRuntimeRunner` here; `TensorRtRunner` for
engines); a *case* holds one set of inputs at chosen axis sizes and the PyTorch path's
outputs for them: `InstructSam.encode_image_sam` for the vision graph and
`InstructSam.segment_blocks` for the head, the code the eager backend runs. The head's
FPN inputs are the model's own vision features of random frames, so the head is checked on
the features it will see.

Each output is compared elementwise: `|a - e| <= rel * |e| + scale * max|e|`, i.e.
torch.testing's rule with the absolute tolerance taken relative to the output's largest
magnitude. An absolute tolerance would mean nothing across outputs whose scales differ by
orders of magnitude (a random tiny model's features are ~1e-3, a trained model's mask
logits ~10). Mask logits are also compared by the share of pixels whose sign (mask or
not) agrees.

Tolerances, by the lower of the two precisions compared:
- float32: scale 5e-4, rel 1e-3. Both sides compute the same fp32 math with different
  kernels and summation orders (fused LayerNorm, GEMM blocking, Softmax). Measured on
  onnxruntime CPU: below 1e-6 of scale on the tiny model; at real size (SAM3 at 1008 px,
  random weights) 2.4e-6 for the vision features and 4.5e-5 for the mask logits, the
  largest, so 5e-4 leaves ten times that for other kernels (cuDNN, TensorRT tactics).
  A wrong operator or weight gives errors of the order of the values themselves.
- float16: scale 2e-2, rel 2e-2, 99 % of mask pixels agreeing; bfloat16: scale 5e-2,
  rel 5e-2, 98 %. Half-precision rounding (2^-11, 2^-8 per operation) grown over a deep
  network: goals to confirm on a GPU, not measured here.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Protocol

import torch

from ..model.instructsam import InstructSam, SamFeatures
from .graphs import HEAD, VISION, GraphDefinition, define_graphs, example_inputs
from .manifest import GraphEntry, Manifest

PRECISIONS = ("float32", "float16", "bfloat16")  # loosest last


@dataclass(frozen=True)
class Tolerance:
    scale: float  # allowed error as a share of the output's largest magnitude
    rel: float  # allowed error as a share of each element's magnitude
    mask_agreement: float  # least share of mask pixels whose sign must agree


TOLERANCES = {
    "float32": Tolerance(scale=5e-4, rel=1e-3, mask_agreement=0.999),
    "float16": Tolerance(scale=2e-2, rel=2e-2, mask_agreement=0.99),
    "bfloat16": Tolerance(scale=5e-2, rel=5e-2, mask_agreement=0.98),
}


class GraphRunner(Protocol):
    """Runs exported graphs: `run(part, inputs)` takes and returns tensors by graph name."""

    name: str  # what it is, for the report (library, version, device)
    precision: str  # one of PRECISIONS: what it computes in

    def run(self, part: str, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...


@dataclass
class ParityCase:
    """Inputs of one graph at some axis sizes, and what the PyTorch path returns for them."""

    part: str
    sizes: dict[str, int]
    inputs: dict[str, torch.Tensor]  # float32/bool/int64 on the CPU, as the graph takes them
    expected: dict[str, torch.Tensor]  # the PyTorch path's outputs, float32 on the CPU

    @property
    def label(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.sizes.items())


@dataclass
class OutputParity:
    """One output of one case, compared."""

    part: str
    case: str
    output: str
    shape: list[int]
    max_abs: float
    max_rel: float  # max_abs over the largest |expected| (elementwise ratios explode near 0)
    tol_scale: float
    tol_rel: float
    mask_agreement: float | None
    passed: bool
    note: str = ""


@dataclass
class ParityReport:
    runner: str
    reference: str
    precision: str  # the tolerances used
    rows: list[OutputParity]

    @property
    def passed(self) -> bool:
        return bool(self.rows) and all(r.passed for r in self.rows)

    def table(self) -> str:
        lines = [f"parity: {self.runner} vs {self.reference} (tolerances for {self.precision})",
                 f"{'graph':<7} {'sizes':<34} {'output':<20} {'max abs':>10} {'max rel':>10} {'tol':>8} "
                 f"{'tol rel':>8} {'mask agr':>9}  result"]
        for r in self.rows:
            agreement = f"{r.mask_agreement:9.5f}" if r.mask_agreement is not None else f"{'':9}"
            lines.append(f"{r.part:<7} {r.case:<34} {r.output:<20} {r.max_abs:10.3e} {r.max_rel:10.3e} "
                         f"{r.tol_scale:8.0e} {r.tol_rel:8.0e} {agreement}  {'ok' if r.passed else 'FAIL'}"
                         + (f" ({r.note})" if r.note else ""))
        lines.append(f"parity {'passed' if self.passed else 'FAILED'}: "
                     f"{sum(r.passed for r in self.rows)}/{len(self.rows)} outputs within tolerance")
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps({"runner": self.runner, "reference": self.reference, "precision": self.precision,
                           "passed": self.passed, "rows": [asdict(r) for r in self.rows]}, indent=2)


def check_sizes(entry: GraphEntry) -> list[dict[str, int]]:
    """The axis sizes parity checks by default: every axis at its profile's opt (the size
    engines are tuned for), and every axis one above the size it was exported with, so
    that neither is the traced size."""
    opt = {name: axis.opt for name, axis in entry.axes.items()}
    other = {name: min(entry.export_sizes[name] + 1, axis.max) for name, axis in entry.axes.items()}
    return [opt, other] if other != opt else [opt]


def lowest_precision(*precisions: str) -> str:
    for p in precisions:
        if p not in PRECISIONS:
            raise ValueError(f"unknown precision {p!r}; choose from {', '.join(PRECISIONS)}")
    return max(precisions, key=PRECISIONS.index)


@torch.no_grad()
def parity_cases(model: InstructSam, manifest: Manifest, parts: Sequence[str] | None = None,
                 sizes: dict[str, list[dict[str, int]]] | None = None, seed: int = 0) -> list[ParityCase]:
    """Cases for `parts` of the manifest (default: all it holds), computed by `model` on its
    device in its dtype (cast to float32 on the CPU for comparison).

    Arguments:
        sizes: per part, the axis sizes to check (default: `check_sizes`).
        seed: the random inputs' seed.
    """
    graphs = define_graphs(model)
    generator = torch.Generator().manual_seed(seed)
    cases = []
    for part in parts or list(manifest.graphs):
        entry = manifest.graph(part)
        for case_sizes in (sizes or {}).get(part) or check_sizes(entry):
            _check_within(entry, case_sizes)
            graph = graphs[part]
            with _exact_float32():
                if part == VISION:
                    cases.append(_vision_case(model, graph, case_sizes, generator))
                else:
                    cases.append(_head_case(model, graph, case_sizes, generator))
    return cases


def check_parity(runner: GraphRunner, cases: Sequence[ParityCase], reference: str = "PyTorch",
                 reference_precision: str = "float32") -> ParityReport:
    """Run every case on `runner` and compare with its expected outputs."""
    precision = lowest_precision(runner.precision, reference_precision)
    tol = TOLERANCES[precision]
    rows = []
    for case in cases:
        outputs = runner.run(case.part, dict(case.inputs))
        for name, expected in case.expected.items():
            if name not in outputs:
                rows.append(OutputParity(case.part, case.label, name, list(expected.shape), float("nan"),
                                         float("nan"), tol.scale, tol.rel, None, False, "missing from the runner"))
                continue
            rows.append(compare(case.part, case.label, name, outputs[name], expected, tol))
    return ParityReport(runner=runner.name, reference=reference, precision=precision, rows=rows)


def compare(part: str, case: str, name: str, actual: torch.Tensor, expected: torch.Tensor,
            tol: Tolerance) -> OutputParity:
    """One output against its expected value (see the module docstring for the rule)."""
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    if a.shape != e.shape:
        return OutputParity(part, case, name, list(e.shape), float("nan"), float("nan"), tol.scale, tol.rel, None,
                            False, f"shape {list(a.shape)} != expected {list(e.shape)}")
    diff = (a - e).abs()
    finite = bool(torch.isfinite(a).all())
    max_abs = float(diff.max()) if diff.numel() else 0.0
    scale = float(e.abs().max()) if e.numel() else 0.0
    passed = finite and bool((diff <= tol.scale * scale + tol.rel * e.abs()).all())
    agreement = None
    if name == "mask_logits":
        agreement = float(((a > 0) == (e > 0)).double().mean()) if e.numel() else 1.0
        passed = passed and agreement >= tol.mask_agreement
    return OutputParity(part, case, name, list(e.shape), max_abs, max_abs / max(scale, 1e-30), tol.scale, tol.rel,
                        agreement, passed, "" if finite else "non-finite values")


def _check_within(entry: GraphEntry, sizes: dict[str, int]) -> None:
    for name, axis in entry.axes.items():
        if name not in sizes:
            raise ValueError(f"{entry.part}: no size given for axis {name!r}")
        if not axis.min <= sizes[name] <= axis.max:
            raise ValueError(f"{entry.part}: {name}={sizes[name]} is outside the exported range "
                             f"{axis.min}..{axis.max}")


def _vision_case(model: InstructSam, graph: GraphDefinition, sizes: dict[str, int],
                 generator: torch.Generator) -> ParityCase:
    inputs = example_inputs(graph, sizes, generator)
    features = model.encode_image_sam(_on_model(model, inputs["pixel_values"]))
    expected = {name: _as_expected(f) for name, f in zip(graph.output_names, features.fpn_hidden_states)}
    return ParityCase(VISION, sizes, inputs, expected)


def _head_case(model: InstructSam, graph: GraphDefinition, sizes: dict[str, int],
               generator: torch.Generator) -> ParityCase:
    inputs = example_inputs(graph, sizes, generator)
    pixels = torch.rand((sizes["frames"], 3, model.config.sam_image_size, model.config.sam_image_size),
                        generator=generator) * 2 - 1
    frames: SamFeatures = model.encode_image_sam(_on_model(model, pixels))
    level_names = [s.name for s in graph.inputs if s.name.startswith("fpn_hidden_states_")]
    for name, level in zip(level_names, frames.fpn_hidden_states):
        inputs[name] = _as_expected(level)  # what the vision graph hands the head
    device = next(model.parameters()).device
    head = model.segment_blocks(_on_model(model, inputs["query_states"]), _on_model(model, inputs["prompt"]),
                                inputs["prompt_mask"].to(device), frames.take(inputs["frame_index"].to(device)))
    values = (head.mask_logits, head.logits, head.boxes, head.presence_logits)
    expected = {name: _as_expected(v) for name, v in zip(graph.output_names, values)}
    return ParityCase(HEAD, sizes, inputs, expected)


def _on_model(model: InstructSam, tensor: torch.Tensor) -> torch.Tensor:
    param = next(model.parameters())
    return tensor.to(param.device, param.dtype)


def _as_expected(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu", torch.float32)


@contextlib.contextmanager
def _exact_float32() -> Iterator[None]:
    """No TF32 on CUDA while the reference runs: it would round fp32 matmuls and
    convolutions to 10 mantissa bits and fail fp32 parity for the reference's own error."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
