"""The backend interface (see the package docstring)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..model.generation import Generation, LogitsProcessor, PromptPrefix
from ..model.instructsam import InstructSam, SamFeatures, VisionTokens
from ..model.sam3_head import HeadOutput


@dataclass
class FrameInput:
    """One preprocessed frame: Qwen3-VL patches and grid, SAM3 pixels, prompt prefix ids."""

    vlm_pixels: torch.Tensor
    grid_thw: tuple[int, int, int]
    sam_pixels: torch.Tensor
    prefix_ids: list[int]


@dataclass
class FrameFeatures:
    """Everything computed once per frame and reused by every instruction on it."""

    vision: VisionTokens  # Qwen3-VL vision tokens
    sam: SamFeatures  # SAM3 FPN features (batch of one)
    prefix: PromptPrefix  # LLM KV cache of the prompt up to and including the image


class Backend(ABC):
    """Runs the model's stages on a device in a dtype.

    Arguments:
        model: the InstructSAM model (moved to `device`/`dtype` by the backend).
        device: torch device.
        dtype: floating dtype of the weights and activations.
    """

    def __init__(self, model: InstructSam, device: torch.device, dtype: torch.dtype):
        self.model = model
        self.device = device
        self.dtype = dtype

    @abstractmethod
    def encode_frames(self, frames: Sequence[FrameInput]) -> list[FrameFeatures]:
        """Both image encoders on preprocessed frames (batched where the backend can), and
        the LLM over each frame's prompt prefix (ending with the image), which every
        instruction on that frame shares."""

    @abstractmethod
    def generate(self, frame: FrameFeatures, prompt_ids: list[int], max_new_tokens: int,
                 logits_processors: Sequence[LogitsProcessor] = (), force_phrase_end: bool = False) -> Generation:
        """The LLM answer with a query block per phrase; `prompt_ids` starts with the frame's prefix."""

    @abstractmethod
    def segment_phrases(self, answers: Sequence[tuple[FrameFeatures, Generation]]) -> list[HeadOutput]:
        """The SAM3 head for every phrase of each (frame, generation) pair, batched across
        pairs where the backend can: one `(P_i, K, ...)` output per pair."""

    def release(self) -> None:
        """Free device memory (the model stays usable after moving back)."""
        self.model.to("cpu")
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
