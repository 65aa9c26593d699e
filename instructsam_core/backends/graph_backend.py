"""SAM3 as exported graphs, the LLM in PyTorch: what the tensorrt and onnxruntime backends share.

The ONNX export (`instructsam_core.export`) covers SAM3's vision encoder and the
InstructSAM head (query projector, fusion encoder, DETR decoder on the K queries, mask
decoder, scoring). A graph backend runs those two graphs on a graph runtime (TensorRT
engines in `tensorrt_backend`, onnxruntime sessions in `onnxruntime_backend`) and
everything else on a PyTorch backend of its own, `compiled` by default or `eager`: the
Qwen3-VL vision tower, the LLM's prompt prefix, the answer with its query blocks (an
autoregressive decoder with a KV cache and the hybrid query mask is not an ONNX-export
job; docs/acceleration.md), and the small phrase-prompt projection.

How the door's calls become graph inputs:

- `encode_frames`: the frames' SAM3 pixels go to the vision graph in batches of at most
  the graph's `batch` maximum (on a GPU on a stream of their own, beside the LLM's
  prefix); the LLM backend encodes the rest (`encode_language`). A frame's handle holds
  the LLM backend's handle and views of the vision graph's FPN outputs: device buffers,
  never copied to the host.
- `generate`: the LLM backend's, on its handle.
- `segment_phrases`: the LLM backend packs the answers' phrases (`phrase_batch`, padded to
  `max_phrase_tokens` as the PyTorch backends do), PyTorch projects the phrase prompt, and
  the head graph runs over runs of consecutive phrases of at most the graph's `blocks`
  and `frames` maxima: each distinct frame's FPN levels once, `frame_index` naming each
  phrase's frame. The outputs are `HeadOutput`s of the runtime's own output buffers
  (joined on the device when the phrases took several runs).

The exported graphs come from `graph_export.graphs_for` (exported on first use); the
model's SAM3 is then dropped from PyTorch, so its weights are held once, by the runtime.
"""

from __future__ import annotations

import logging
from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..export.graphs import HEAD, VISION, ExportLimits
from ..export.manifest import Manifest
from ..model.instructsam import InstructSam
from ..outputs import Generation, HeadOutput, LogitsProcessor
from .base import Backend, FrameHandle, FrameInput, StageTimer
from .compiled import CompiledBackend, CompiledOptions
from .eager import EagerBackend
from .graph_export import graphs_for
from .torch_backend import TorchBackend

log = logging.getLogger(__name__)

LANGUAGE_BACKENDS = ("compiled", "eager")


@dataclass
class GraphOptions:
    """Settings every graph backend takes (`backend_options`).

    Attributes:
        onnx_dir: the export folder (`instructsam export --out`); exported into on first
            use when it holds none. None: one per model in the cache (`graph_export`).
        max_batch, max_blocks: the largest frame batch and phrase count per call of
            graphs exported here (an existing export keeps its own); larger calls are
            split. Smaller ranges build engines faster and take less memory.
        llm: the PyTorch backend of the LLM: "compiled" (torch.compile, static KV cache,
            CUDA graphs on a GPU) or "eager".
        compiled: its `CompiledOptions` fields, e.g. `{"cache_dir": ...}`.
    """

    onnx_dir: str | None = None
    max_batch: int = 8
    max_blocks: int = 16
    llm: str = "compiled"
    compiled: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.llm not in LANGUAGE_BACKENDS:
            raise ValueError(f"llm must be one of {', '.join(LANGUAGE_BACKENDS)}, got {self.llm!r}")
        if self.compiled and self.llm != "compiled":
            raise ValueError(f"compiled options {sorted(self.compiled)} need llm='compiled', not {self.llm!r}")
        self.limits()
        self.compiled_options()

    def limits(self) -> ExportLimits:
        return ExportLimits(max_batch=self.max_batch, max_blocks=self.max_blocks)

    def compiled_options(self) -> CompiledOptions:
        known = sorted(CompiledOptions.__dataclass_fields__)
        unknown = sorted(set(self.compiled) - set(known))
        if unknown:
            raise ValueError(f"unknown compiled option(s) {unknown}; known: {known}")
        return CompiledOptions(**self.compiled)


class GraphFrame(FrameHandle):
    """A frame of a graph backend: the LLM backend's handle and SAM3's FPN levels."""

    def __init__(self, language: FrameHandle, sam_levels: tuple[torch.Tensor, ...]):
        super().__init__(language.num_image_tokens)
        self.language = language  # the LLM backend's handle (its prompt prefix, in its KV cache)
        self.sam_levels = sam_levels  # the vision graph's outputs for this frame, each (1, D, h_i, w_i), on the device


def _drop_sam3(model: InstructSam) -> None:
    """Free the PyTorch SAM3 and query projector: the graphs hold them now."""
    model.grounding_model = None
    model.mask_hidden_fcs = None


class GraphBackend(Backend):
    """SAM3's vision encoder and head on a graph runtime, the LLM on a PyTorch backend
    (see the module docstring). Subclasses open the graphs (`_open_graphs`) and run one
    (`_run`).

    Arguments:
        model: the InstructSAM model; give the backend a model of its own (its SAM3 is
            exported if need be, then dropped).
        device, dtype: where the LLM runs and in what; the graphs compute in their own
            precision and take and return tensors on `device`.
        options: the subclass's options (a `GraphOptions`).
    """

    name = "graph"  # the registered name, for messages
    device_type = "cpu"  # where this runtime runs

    def __init__(self, model: InstructSam, device: torch.device, dtype: torch.dtype, options: GraphOptions):
        self.options = options
        self.device = torch.device(device)
        if self.device.type != self.device_type:
            raise ValueError(self._wrong_device_message())
        self.config, self.token_ids = model.config, model.token_ids
        self.export_dir: Path = graphs_for(model, options.onnx_dir, self.graph_dtype(), options.limits(),
                                           self._progress)
        self.manifest = Manifest.read(self.export_dir)
        # Built over the whole model, as backend="compiled" would be, so that the two share
        # their compiled code on disk (its cache key hashes every weight); SAM3 goes after.
        self.language: TorchBackend = (
            CompiledBackend(model, self.device, dtype, options.compiled_options()) if options.llm == "compiled"
            else EagerBackend(model, self.device, dtype))
        _drop_sam3(model)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.dtype = self.language.dtype
        self._level_names = [spec.name for spec in self.manifest.graph(VISION).outputs]
        self._input_dtypes = {part: {spec.name: getattr(torch, spec.dtype) for spec in entry.inputs}
                              for part, entry in self.manifest.graphs.items()}
        vision_axes, head_axes = self.manifest.graph(VISION).axes, self.manifest.graph(HEAD).axes
        self.max_batch = vision_axes["batch"].max
        self.max_frames, self.max_blocks = head_axes["frames"].max, head_axes["blocks"].max
        self._open_graphs(self.export_dir)
        self._sam_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    # ---- what a runtime provides ------------------------------------------------------

    def graph_dtype(self) -> str:
        """What graphs exported for this backend compute in."""
        return "float32"

    def _wrong_device_message(self) -> str:
        return f"the {self.name} backend runs on {self.device_type}, not {self.device}"

    @abstractmethod
    def _open_graphs(self, folder: Path) -> None:
        """Load the vision and head graphs of the export `folder`."""

    @abstractmethod
    def _run(self, part: str, inputs: dict[str, torch.Tensor], stream: torch.cuda.Stream | None
             ) -> dict[str, torch.Tensor]:
        """Run one graph on tensors on the device in its input dtypes (on `stream` on a
        GPU, else the current one); returns its outputs by name, on the device."""

    def _progress(self, line: str) -> None:
        log.warning("%s backend: %s", self.name, line)

    # ---- the door -----------------------------------------------------------------------

    @property
    def stage_timer(self) -> StageTimer | None:
        return self.language.stage_timer

    @stage_timer.setter
    def stage_timer(self, timer: StageTimer | None) -> None:
        self.language.stage_timer = timer  # the LLM backend reports its stages to the same timer

    @torch.no_grad()
    def encode_frames(self, frames: Sequence[FrameInput]) -> list[GraphFrame]:
        pixels = torch.cat([f.sam_pixels for f in frames]).to(self.device, self._input_dtypes[VISION]["pixel_values"])
        main = torch.cuda.current_stream(self.device) if self._sam_stream is not None else None
        with self.stage("sam_vision"):
            if main is not None:
                self._sam_stream.wait_stream(main)  # the pixels were copied on the main stream
            levels = self._sam_vision(pixels, self._sam_stream)
            if main is not None:
                done = torch.cuda.Event()
                done.record(self._sam_stream)
        language = self.language.encode_language(frames)
        if main is not None:
            main.wait_event(done)  # later work on the main stream reads the features
        return [GraphFrame(handle, frame_levels) for handle, frame_levels in zip(language, levels)]

    def _sam_vision(self, pixels: torch.Tensor, stream: torch.cuda.Stream | None) -> list[tuple[torch.Tensor, ...]]:
        """The vision graph over `(B, 3, S, S)` pixels, at most `max_batch` at a time; per
        frame, views of its FPN levels (no copies)."""
        per_frame = []
        for start in range(0, pixels.shape[0], self.max_batch):
            outputs = self._run(VISION, {"pixel_values": pixels[start:start + self.max_batch]}, stream)
            levels = [outputs[name] for name in self._level_names]
            per_frame += [tuple(level[i:i + 1] for level in levels) for i in range(levels[0].shape[0])]
        return per_frame

    def generate(self, frame: GraphFrame, prompt_ids: list[int], max_new_tokens: int,
                 logits_processors: Sequence[LogitsProcessor] = (),
                 forced_answer: Sequence[int] | None = None) -> Generation:
        return self.language.generate(frame.language, prompt_ids, max_new_tokens, logits_processors, forced_answer)

    @torch.no_grad()
    def segment_phrases(self, answers: Sequence[tuple[GraphFrame, Generation]]) -> list[HeadOutput]:
        with self.stage("sam_head"):
            queries, phrase_ids, phrase_mask, hidden, answer_of_phrase = self.language.phrase_batch(
                [(frame.language, generation) for frame, generation in answers])
            prompt = self.language.model.phrase_prompt(phrase_ids, phrase_mask, hidden)
            frame_of_phrase = [answers[i][0] for i in answer_of_phrase]
            dtypes = self._input_dtypes[HEAD]
            outputs = []
            for start, end, frames in self._head_runs(frame_of_phrase):
                slot = {id(frame): j for j, frame in enumerate(frames)}
                index = torch.tensor([slot[id(frame)] for frame in frame_of_phrase[start:end]], device=self.device)
                inputs = {"query_states": queries[start:end].to(dtypes["query_states"]),
                          "prompt": prompt[start:end].to(dtypes["prompt"]),
                          "prompt_mask": phrase_mask[start:end], "frame_index": index}
                levels = zip(*(frame.sam_levels for frame in frames))
                inputs.update((name, level[0] if len(level) == 1 else torch.cat(level))
                              for name, level in zip(self._level_names, levels))
                outputs.append(self._run(HEAD, inputs, None))
            head = HeadOutput(*(_joined(outputs, name) for name in ("mask_logits", "logits", "boxes")),
                              presence_logits=_joined(outputs, "presence_logits"))
        return head.split([len(generation.phrases) for _, generation in answers])

    def _head_runs(self, frame_of_phrase: list[GraphFrame]) -> list[tuple[int, int, list[GraphFrame]]]:
        """Runs of consecutive phrases the head graph takes in one call: `(start, end,
        distinct frames in order)`, each within the graph's block and frame maxima."""
        runs, start, frames = [], 0, []
        for row, frame in enumerate(frame_of_phrase):
            new_frame = all(frame is not f for f in frames)
            if row - start == self.max_blocks or (new_frame and len(frames) == self.max_frames):
                runs.append((start, row, frames))
                start, frames, new_frame = row, [], True
            if new_frame:
                frames.append(frame)
        runs.append((start, len(frame_of_phrase), frames))
        return runs

    def synchronize(self) -> None:
        self.language.synchronize()

    def release(self) -> None:
        """Free the LLM backend's memory; subclasses free their graphs' too."""
        self.language.release()
        self._sam_stream = None


def _joined(outputs: list[dict[str, torch.Tensor]], name: str) -> torch.Tensor | None:
    """One output of every head run, in order (the run's own buffer when there was one)."""
    if name not in outputs[0]:
        return None
    parts = [o[name] for o in outputs]
    return parts[0] if len(parts) == 1 else torch.cat(parts)
