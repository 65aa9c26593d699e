"""Plain PyTorch execution: the reference backend, on CPU or CUDA."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..model.generation import Generation, LogitsProcessor, generate, prefill_prefix
from ..model.sam3_head import HeadOutput
from ..model.instructsam import SamFeatures
from .base import Backend, FrameFeatures, FrameInput


class EagerBackend(Backend):
    """Runs the stock modules as they are, under `torch.inference_mode`."""

    def __init__(self, model, device, dtype):
        super().__init__(model, device, dtype)
        self.model.to(device=device, dtype=dtype).eval()

    @torch.inference_mode()
    def encode_frames(self, frames: Sequence[FrameInput]) -> list[FrameFeatures]:
        model = self.model
        visions = model.encode_images_vlm([f.vlm_pixels.to(self.device, self.dtype) for f in frames],
                                          [f.grid_thw for f in frames])
        sam = model.encode_image_sam(torch.cat([f.sam_pixels for f in frames]).to(self.device, self.dtype))
        out = []
        for i, (frame, vision) in enumerate(zip(frames, visions)):
            prefix = prefill_prefix(model, torch.tensor([frame.prefix_ids], device=self.device), vision)
            out.append(FrameFeatures(vision=vision, sam=sam.take(torch.tensor([i], device=self.device)), prefix=prefix))
        return out

    @torch.inference_mode()
    def generate(self, frame: FrameFeatures, prompt_ids: list[int], max_new_tokens: int,
                 logits_processors: Sequence[LogitsProcessor] = (), force_phrase_end: bool = False) -> Generation:
        ids = torch.tensor([prompt_ids], dtype=torch.long, device=self.device)
        return generate(self.model, ids, frame.vision, max_new_tokens, logits_processors, force_phrase_end,
                        prefix=frame.prefix)

    @torch.inference_mode()
    def segment_phrases(self, answers: Sequence[tuple[FrameFeatures, Generation]]) -> list[HeadOutput]:
        model = self.model
        phrases = [(i, p) for i, (_, generation) in enumerate(answers) for p in generation.phrases]
        T = model.config.max_phrase_tokens
        phrase_ids = torch.zeros(len(phrases), T, dtype=torch.long)
        phrase_mask = torch.zeros(len(phrases), T, dtype=torch.bool)
        hidden = model.mask_queries.new_zeros(len(phrases), T, model.mask_queries.shape[-1])
        for row, (_, phrase) in enumerate(phrases):
            n = len(phrase.token_ids)
            phrase_ids[row, :n] = torch.tensor(phrase.token_ids)
            phrase_mask[row, :n] = True
            hidden[row, :n] = phrase.phrase_states
        phrase_ids, phrase_mask = phrase_ids.to(self.device), phrase_mask.to(self.device)
        prompt = model.phrase_prompt(phrase_ids, phrase_mask, hidden)
        queries = torch.stack([p.query_states for _, p in phrases])  # (P, K, H)
        frame_of_phrase = torch.tensor([i for i, _ in phrases], dtype=torch.long, device=self.device)
        sam = SamFeatures.cat([frame.sam for frame, _ in answers]).take(frame_of_phrase)
        head = model.segment_blocks(queries, prompt, phrase_mask, sam)
        return head.split([len(generation.phrases) for _, generation in answers])
