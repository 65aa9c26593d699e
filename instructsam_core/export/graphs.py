"""The two graphs exported for acceleration, as modules over the model's own submodules.

- `vision`: SAM3's vision encoder, `pixel_values (batch, 3, S, S)` at the model's
  `sam_image_size` -> the FPN levels the head reads (all but the coarsest, which SAM3's
  head drops, so the graph never computes it).
- `head`: `InstructSam.segment_blocks` (query projector, fusion encoder, DETR decoder on
  external queries, box head, dot-product scoring, mask decoder) for `blocks` query blocks
  over `frames` frames. The frames' FPN levels come in once each, with `frame_index` naming
  each block's frame: at 1008 px the finest level is 85 MB per frame in fp32, so repeating
  it per block, as `SamFeatures.take` does in PyTorch, would multiply the engine's inputs.

Nothing is re-implemented: the modules call the stock submodules and `run_head`, so the
weights, and the ONNX graph's initialisers, are the checkpoint's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from ..model.instructsam import InstructSam
from ..model.sam3_head import run_head

VISION, HEAD = "vision", "head"
PARTS = (VISION, HEAD)


@dataclass(frozen=True)
class AxisRange:
    """The sizes a dynamic axis takes: TensorRT's optimization profile (min, opt, max)."""

    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.opt <= self.max:
            raise ValueError(f"axis range needs 1 <= min <= opt <= max, got {self.min}, {self.opt}, {self.max}")


@dataclass(frozen=True)
class ExportLimits:
    """The largest sizes the exported graphs (and engines built from them) are set up for.

    Arguments:
        max_batch: frames per vision call, and per head call.
        max_blocks: query blocks (phrases) per head call.
        max_prompt_tokens: prompt length; None = the model's `max_phrase_tokens`, what the
            PyTorch backend pads every phrase to (also the profile's opt).
    """

    max_batch: int = 8
    max_blocks: int = 16
    max_prompt_tokens: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_blocks", "max_prompt_tokens"):
            value = getattr(self, name)
            # An axis exported at size 1 would be fixed to 1 by torch.export.
            if value is not None and value < 2:
                raise ValueError(f"{name} must be at least 2 (dynamic axes are traced at size 2 or more), got {value}")


@dataclass(frozen=True)
class GraphInput:
    """One graph input: name, dtype, and shape (an int is fixed, a str names a dynamic axis)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int | str, ...]


@dataclass
class GraphDefinition:
    """What to export for one part: the module, its inputs, output names and dynamic axes."""

    part: str
    module: nn.Module
    inputs: tuple[GraphInput, ...]
    output_names: tuple[str, ...]
    axes: dict[str, AxisRange]
    # Axis sizes of the example inputs that torch.export traces with.
    export_sizes: dict[str, int] = field(default_factory=dict)


def exported_weights(model: InstructSam) -> torch.nn.Parameter:
    """A weight of the exported parts (SAM3 and the query projector): the graphs compute in
    its dtype and are traced on its device, which need not be the LLM's (a backend that
    runs SAM3 as graphs exports them from the CPU and keeps only the LLM on the GPU)."""
    params = [*model.grounding_model.parameters(), *model.mask_hidden_fcs.parameters()]
    kinds = {(p.dtype, p.device) for p in params}
    if len(kinds) != 1:
        raise ValueError(f"the exported parts' weights must share one dtype and device, found "
                         f"{sorted(map(str, kinds))}")
    return params[0]


def fpn_level_names(model: InstructSam) -> tuple[str, ...]:
    """Names of the FPN levels the head reads (SAM3 drops the coarsest of its levels)."""
    levels = len(model.grounding_model.config.vision_config.scale_factors) - 1
    return tuple(f"fpn_hidden_states_{i}" for i in range(levels))


def fpn_level_shapes(model: InstructSam) -> list[tuple[int, int, int]]:
    """`(D, h, w)` of each level the head reads, from the config (no forward pass)."""
    vision = model.grounding_model.config.vision_config
    grid = model.config.sam_image_size // vision.backbone_config.patch_size
    return [(vision.fpn_hidden_size, int(grid * s), int(grid * s)) for s in vision.scale_factors[:-1]]


class VisionGraph(nn.Module):
    """SAM3's vision encoder returning the FPN levels the head reads, finest first."""

    def __init__(self, model: InstructSam):
        super().__init__()
        self.vision_encoder = model.grounding_model.vision_encoder
        self.levels = len(fpn_level_names(model))

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.vision_encoder(pixel_values)
        return tuple(out.fpn_hidden_states[: self.levels])  # each (B, D, h_i, w_i)


class HeadGraph(nn.Module):
    """`InstructSam.segment_blocks` over frames given once each, with a frame per block."""

    def __init__(self, model: InstructSam):
        super().__init__()
        self.projector = model.mask_hidden_fcs[0]
        self.sam3 = model.grounding_model
        self.use_presence = model.config.use_presence
        self.fusion_output_norm = model.config.fusion_output_norm
        self.fusion_norm_scope = model.config.fusion_norm_scope
        self.fusion_image_skip = model.config.fusion_image_skip
        # SAM3's position encodings depend on the feature map's size alone: computed once
        # here, they are constants of the graph rather than inputs. The head reads only the
        # coarsest level it keeps.
        shape = (1, *fpn_level_shapes(model)[-1])
        param = next(self.sam3.parameters())
        pos = self.sam3.vision_encoder.neck.position_encoding(torch.Size(shape), param.device, param.dtype)
        self.register_buffer("vision_pos", pos.clone(), persistent=False)

    def forward(self, query_states: torch.Tensor, prompt: torch.Tensor, prompt_mask: torch.Tensor,
                frame_index: torch.Tensor, *levels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        blocks = query_states.shape[0]
        fpn = tuple(level.index_select(0, frame_index) for level in levels)  # each (P, D, h_i, w_i)
        pos = self.vision_pos.expand(blocks, -1, -1, -1)
        # run_head drops the coarsest level, as SAM3 does, and reads one position encoding:
        # None holds the slots of what the graph never computes.
        head = run_head(self.sam3, fpn + (None,), (None,) * (len(fpn) - 1) + (pos, None), prompt, prompt_mask,
                        self.projector(query_states), self.use_presence, fusion_output_norm=self.fusion_output_norm,
                        fusion_norm_scope=self.fusion_norm_scope, fusion_image_skip=self.fusion_image_skip)
        outputs = (head.mask_logits, head.logits, head.boxes)
        return outputs + (head.presence_logits,) if self.use_presence else outputs


def head_output_names(model: InstructSam) -> tuple[str, ...]:
    names = ("mask_logits", "logits", "boxes")
    return names + ("presence_logits",) if model.config.use_presence else names


def define_graphs(model: InstructSam, limits: ExportLimits = ExportLimits()) -> dict[str, GraphDefinition]:
    """The vision and head graphs of `model`, with their inputs and dynamic axes."""
    config = model.config
    size = config.sam_image_size
    hidden = model.mask_queries.shape[-1]
    floats = exported_weights(model).dtype  # the graphs compute in the exported parts' dtype
    prompt_tokens = limits.max_prompt_tokens or config.max_phrase_tokens
    if prompt_tokens < 2:
        raise ValueError(f"the prompt length must allow at least 2 tokens, got {prompt_tokens}")
    levels = list(zip(fpn_level_names(model), fpn_level_shapes(model)))
    vision_axes = {"batch": AxisRange(1, 1, limits.max_batch)}
    head_axes = {"frames": AxisRange(1, 1, limits.max_batch), "blocks": AxisRange(1, 1, limits.max_blocks),
                 "prompt_len": AxisRange(1, prompt_tokens, prompt_tokens)}
    vision_inputs = (GraphInput("pixel_values", floats, ("batch", 3, size, size)),)
    head_inputs = (
        GraphInput("query_states", floats, ("blocks", config.num_queries, hidden)),
        GraphInput("prompt", floats, ("blocks", "prompt_len", config.out_dim)),
        GraphInput("prompt_mask", torch.bool, ("blocks", "prompt_len")),
        GraphInput("frame_index", torch.int64, ("blocks",)),
        *(GraphInput(name, floats, ("frames", *shape)) for name, shape in levels),
    )
    graphs = {
        VISION: GraphDefinition(VISION, VisionGraph(model).eval(), vision_inputs, tuple(n for n, _ in levels),
                                vision_axes),
        HEAD: GraphDefinition(HEAD, HeadGraph(model).eval(), head_inputs, head_output_names(model), head_axes),
    }
    for graph in graphs.values():
        graph.export_sizes = _export_sizes(graph)
    return graphs


def _export_sizes(graph: GraphDefinition) -> dict[str, int]:
    """Example sizes to trace with: at least 2, within range, and all different from each
    other and from every fixed dimension, so that torch.export keeps each axis a symbol of
    its own (equal sizes could be taken for one axis, and size 1 is specialised)."""
    taken = {d for spec in graph.inputs for d in spec.shape if isinstance(d, int)}
    sizes = {}
    for name, axis in graph.axes.items():
        value = next((v for v in range(max(2, axis.min), axis.max + 1) if v not in taken), None)
        if value is None:
            raise ValueError(f"cannot pick an example size for axis {name!r} in {axis}: every size is taken by "
                             f"another dimension; raise its maximum")
        sizes[name] = value
        taken.add(value)
    return sizes


@torch.no_grad()
def example_inputs(graph: GraphDefinition, sizes: dict[str, int], generator: torch.Generator | None = None,
                   ) -> dict[str, torch.Tensor]:
    """Random inputs of `graph` at the given axis sizes (CPU; floats in float32, whatever
    the graph's dtype), valid for the model:
    pixels in SAM3's normalised range, each prompt row with at least one valid token, frame
    indices within `frames`."""
    inputs = {}
    for spec in graph.inputs:
        shape = tuple(sizes[d] if isinstance(d, str) else d for d in spec.shape)
        if spec.name == "pixel_values":
            inputs[spec.name] = torch.rand(shape, generator=generator) * 2 - 1
        elif spec.dtype == torch.bool:  # prompt_mask: a valid prefix of 1..L tokens per row
            lengths = torch.randint(1, shape[1] + 1, (shape[0],), generator=generator)
            lengths[0] = shape[1]
            inputs[spec.name] = torch.arange(shape[1])[None, :] < lengths[:, None]
        elif spec.dtype == torch.int64:  # frame_index
            inputs[spec.name] = torch.randint(0, sizes["frames"], shape, generator=generator)
        else:
            inputs[spec.name] = torch.randn(shape, generator=generator)
    return inputs


@contextlib.contextmanager
def export_attention(model: InstructSam) -> Iterator[None]:
    """SAM3's DETR decoder on transformers' eager attention while the head is traced.

    Under SDPA, torch.export's decompositions (torch 2.13) turn the reshape of the
    decoder's attention output into a view its strides do not allow, and the export fails.
    The eager path is the same math (matmul, softmax, matmul), and opset 18 has no
    attention operator, so the ONNX graph holds the same operators either way. The model
    is changed while the context lasts: do not serve requests with it meanwhile.
    """
    config = model.grounding_model.detr_decoder.config
    previous = config._attn_implementation
    config._attn_implementation = "eager"
    try:
        yield
    finally:
        config._attn_implementation = previous
