"""The backend door: what the engine asks of a backend, and nothing more.

A backend runs the model's three stages that the engine times apart:

- `encode_frames`: both image encoders and the LLM over each frame's prompt prefix (the
  chat header and the image), once per frame. It returns one opaque `FrameHandle` per
  frame. The engine reads only `FrameHandle.num_image_tokens` (to build the prompt) and
  hands the handle back; what the handle holds (features, a KV cache of the prefix,
  device buffers, CUDA events) is the backend's own business and type.
- `generate`: the LLM's answer to one instruction on a frame, a query block per phrase.
  The KV cache is the backend's: transformers' `DynamicCache` (eager), a static
  preallocated cache (compiled), TensorRT's own buffers, ... Nothing about it crosses.
- `segment_phrases`: the SAM3 head for every phrase of several (frame, answer) pairs.

What crosses the door is plain data: preprocessed inputs (`FrameInput`), token ids, and
the outputs of `instructsam_core.outputs` (`Generation`, `HeadOutput`), whose arrays
are `torch.Tensor`s used as device buffers. A TensorRT backend fills them from the
output bindings it allocated (with `torch.empty` on the device, bound by `data_ptr`): no
PyTorch module, cache or autograd object is needed to pass through, and none is faked.
Moving weights off the device is each backend's own `release`. A backend may mix
runtimes: one that runs SAM3 on TensorRT engines (docs/acceleration.md) and keeps the LLM
in PyTorch delegates `generate` to a PyTorch backend, and its handle holds both parts.

For benchmarks a backend reports per-stage wall times to a `StageTimer` (`STAGES`
names them), when one is attached; otherwise it adds no synchronisation.

Keep this module free of the model's and transformers' types: tests/core/test_backend_door.py
checks it, and the engine's use of it, by their imports.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch

from ..config import InstructSamConfig
from ..outputs import Generation, HeadOutput, LogitsProcessor
from ..tokens import TokenIds

# Stage names a backend reports to a StageTimer, in pipeline order.
STAGES = (
    "qwen_vision",  # Qwen3-VL vision tower (per frame)
    "sam_vision",  # SAM3 vision encoder (per frame)
    "prefill_image",  # LLM over the frame's prompt prefix, image included (per frame)
    "prefill",  # LLM over the instruction (and, where fused, a forced answer and its query blocks)
    "decode",  # one generated token (one count per token)
    "query_pass",  # a phrase end with its query block, one LLM pass
    "sam_head",  # SAM3 fusion encoder, DETR decoder on the queries, mask decoder
)


@dataclass
class FrameInput:
    """One preprocessed frame: Qwen3-VL patches and grid, SAM3 pixels, prompt prefix ids.

    Attributes:
        vlm_pixels: `(N_patches, C*T*P*P)` float Qwen3-VL patches (host memory).
        grid_thw: `(t, h, w)` patch grid before merging.
        sam_pixels: `(1, 3, S, S)` normalised SAM3 input (host memory).
        prefix_ids: the prompt prefix every instruction on this frame starts with.
    """

    vlm_pixels: torch.Tensor
    grid_thw: tuple[int, int, int]
    sam_pixels: torch.Tensor
    prefix_ids: list[int]


class FrameHandle:
    """A frame a backend has encoded. Opaque to the engine, which reads only
    `num_image_tokens` and passes the handle back to the backend that made it; each
    backend subclasses it with whatever it keeps per frame."""

    def __init__(self, num_image_tokens: int):
        self.num_image_tokens = num_image_tokens  # image placeholder tokens in the prompt


class StageTimer:
    """Wall time per stage (`STAGES`), the device synchronised around each stage.

    Benchmarks only: the synchronisation serialises what a backend overlaps (e.g. SAM3's
    encoder on its own CUDA stream), so the stage times sum to more than the end-to-end
    time of an unprofiled run. `wrap` lets a caller run each stage inside its own context
    (a FLOP counter, say).
    """

    def __init__(self, synchronize: Callable[[], None],
                 wrap: Callable[[str], object] | None = None):
        self.synchronize = synchronize
        self.wrap = wrap
        self.seconds: dict[str, list[float]] = defaultdict(list)

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        self.synchronize()
        start = time.perf_counter()
        with self.wrap(stage) if self.wrap else nullcontext():
            yield
            self.synchronize()
        self.seconds[stage].append(time.perf_counter() - start)


_NO_TIMER = nullcontext()


class Backend(ABC):
    """Runs the model's stages; see the module docstring for the contract.

    Attributes the engine reads:
        config: the model's `InstructSamConfig` (preprocessing sizes, K, ...).
        token_ids: the special tokens' ids.
        device: where the outputs live (the engine post-processes there).
        dtype: the compute dtype.
        stage_timer: None, or a `StageTimer` the backend reports stage times to.
    """

    config: InstructSamConfig
    token_ids: TokenIds
    device: torch.device
    dtype: torch.dtype
    stage_timer: StageTimer | None = None

    def stage(self, name: str):
        """Context for one stage: timed when a `stage_timer` is attached, else free."""
        return self.stage_timer(name) if self.stage_timer is not None else _NO_TIMER

    @abstractmethod
    def encode_frames(self, frames: Sequence[FrameInput]) -> list[FrameHandle]:
        """Both image encoders on preprocessed frames (batched where the backend can), and
        the LLM over each frame's prompt prefix (ending with the image), which every
        instruction on that frame shares. One handle per frame, in order."""

    @abstractmethod
    def generate(self, frame: FrameHandle, prompt_ids: list[int], max_new_tokens: int,
                 logits_processors: Sequence[LogitsProcessor] = (),
                 forced_answer: Sequence[int] | None = None) -> Generation:
        """The LLM answer with a query block per phrase.

        Arguments:
            frame: a handle this backend returned; `prompt_ids` starts with its prefix.
            max_new_tokens: the generation budget (a query block counts as one step).
            logits_processors: applied to each step's `(1, V)` scores before the argmax.
            forced_answer: emit these tokens instead of generating (a phrase end still
                opens its query block); a backend may run them all in one pass.
        """

    @abstractmethod
    def segment_phrases(self, answers: Sequence[tuple[FrameHandle, Generation]]) -> list[HeadOutput]:
        """The SAM3 head for every phrase of each (frame, generation) pair, batched across
        pairs where the backend can: one `(P_i, K, ...)` output per pair."""

    @abstractmethod
    def synchronize(self) -> None:
        """Wait until the device has finished the work queued so far (timers call it)."""

    @abstractmethod
    def release(self) -> None:
        """Free the device memory this backend holds; it is not used afterwards."""
