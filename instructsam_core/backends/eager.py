"""Plain PyTorch execution: the reference backend, on CPU or CUDA."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..model.generation import Generation, LogitsProcessor, generate, prefill_prefix
from ..model.sam3_head import HeadOutput
from .base import Backend, FrameFeatures


class EagerBackend(Backend):
    """Runs the stock modules as they are, under `torch.inference_mode`."""

    def __init__(self, model, device, dtype):
        super().__init__(model, device, dtype)
        self.model.to(device=device, dtype=dtype).eval()

    @torch.inference_mode()
    def encode_frame(self, vlm_pixels, grid_thw, sam_pixels, prefix_ids) -> FrameFeatures:
        vision = self.model.encode_image_vlm(vlm_pixels.to(self.device, self.dtype), grid_thw)
        sam = self.model.encode_image_sam(sam_pixels.to(self.device, self.dtype))
        prefix = prefill_prefix(self.model, torch.tensor([prefix_ids], device=self.device), vision)
        return FrameFeatures(vision=vision, sam=sam, prefix=prefix)

    @torch.inference_mode()
    def generate(self, frame: FrameFeatures, prompt_ids: list[int], max_new_tokens: int,
                 logits_processors: Sequence[LogitsProcessor] = (), force_phrase_end: bool = False) -> Generation:
        ids = torch.tensor([prompt_ids], dtype=torch.long, device=self.device)
        return generate(self.model, ids, frame.vision, max_new_tokens, logits_processors, force_phrase_end,
                        prefix=frame.prefix)

    @torch.inference_mode()
    def segment_phrases(self, frame: FrameFeatures, generation: Generation) -> HeadOutput:
        model = self.model
        phrases = generation.phrases
        T = model.config.max_phrase_tokens
        phrase_ids = torch.zeros(len(phrases), T, dtype=torch.long, device=self.device)
        phrase_mask = torch.zeros(len(phrases), T, dtype=torch.bool, device=self.device)
        hidden = model.mask_queries.new_zeros(len(phrases), T, model.mask_queries.shape[-1])
        for i, phrase in enumerate(phrases):
            n = len(phrase.token_ids)
            phrase_ids[i, :n] = torch.tensor(phrase.token_ids, device=self.device)
            phrase_mask[i, :n] = True
            hidden[i, :n] = phrase.phrase_states
        prompt = model.phrase_prompt(phrase_ids, phrase_mask, hidden)
        queries = torch.stack([p.query_states for p in phrases])  # (P, K, H)
        one_image = torch.zeros(len(phrases), dtype=torch.long, device=self.device)
        return model.segment_blocks(queries, prompt, phrase_mask, frame.sam.take(one_image))
