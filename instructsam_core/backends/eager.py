"""Plain PyTorch execution: the reference backend, on CPU or CUDA."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..model.generation import PromptPrefix, generate, prefill_prefix
from ..model.instructsam import SamFeatures, VisionTokens
from ..outputs import Generation, HeadOutput, LogitsProcessor
from .base import FrameHandle, FrameInput
from .torch_backend import TorchBackend


class EagerFrame(FrameHandle):
    """What the eager backend keeps per frame."""

    def __init__(self, vision: VisionTokens, sam: SamFeatures | None, prefix: PromptPrefix):
        super().__init__(num_image_tokens=int(vision.embeds.shape[0]))
        self.vision = vision  # Qwen3-VL vision tokens
        self.sam = sam  # SAM3 FPN features (batch of one); None from encode_language
        self.prefix = prefix  # DynamicCache of the prompt up to and including the image


class EagerBackend(TorchBackend):
    """Runs the stock modules as they are, under `torch.inference_mode`."""

    @torch.inference_mode()
    def encode_frames(self, frames: Sequence[FrameInput]) -> list[EagerFrame]:
        handles = self.encode_language(frames)
        with self.stage("sam_vision"):
            sam = self.model.encode_image_sam(torch.cat([f.sam_pixels for f in frames]).to(self.device, self.dtype))
        for i, handle in enumerate(handles):
            handle.sam = sam.take(torch.tensor([i], device=self.device))
        return handles

    @torch.inference_mode()
    def encode_language(self, frames: Sequence[FrameInput]) -> list[EagerFrame]:
        model = self.model
        with self.stage("qwen_vision"):
            visions = model.encode_images_vlm([f.vlm_pixels.to(self.device, self.dtype) for f in frames],
                                              [f.grid_thw for f in frames])
        out = []
        for frame, vision in zip(frames, visions):
            with self.stage("prefill_image"):
                prefix = prefill_prefix(model, torch.tensor([frame.prefix_ids], device=self.device), vision)
            out.append(EagerFrame(vision, None, prefix))
        return out

    @torch.inference_mode()
    def generate(self, frame: EagerFrame, prompt_ids: list[int], max_new_tokens: int,
                 logits_processors: Sequence[LogitsProcessor] = (),
                 forced_answer: Sequence[int] | None = None) -> Generation:
        ids = torch.tensor([prompt_ids], dtype=torch.long, device=self.device)
        return generate(self.model, ids, frame.vision, max_new_tokens, logits_processors, forced_answer,
                        prefix=frame.prefix, stage=self.stage)

    @torch.inference_mode()
    def segment_phrases(self, answers: Sequence[tuple[EagerFrame, Generation]]) -> list[HeadOutput]:
        with self.stage("sam_head"):
            queries, phrase_ids, phrase_mask, hidden, sam = self.pack_phrases(answers, [f.sam for f, _ in answers])
            prompt = self.model.phrase_prompt(phrase_ids, phrase_mask, hidden)
            head = self.model.segment_blocks(queries, prompt, phrase_mask, sam)
        return head.split([len(generation.phrases) for _, generation in answers])
