"""What the PyTorch backends (eager, compiled) share: the model, its placement, the
SAM3-head inputs packed from the answers, `release` (weights back to the CPU), and the
LLM's share of a frame's encoding on its own (`encode_language`), which the backends
that run SAM3 as exported graphs (`graph_backend`) use."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence

import torch

from ..model.instructsam import InstructSam, SamFeatures
from ..outputs import Generation
from .base import Backend, FrameHandle, FrameInput


class TorchBackend(Backend):
    """A backend over the PyTorch `InstructSam` model.

    Arguments:
        model: the InstructSAM model (moved to `device`/`dtype` and set to eval here).
        device: torch device.
        dtype: floating dtype of the weights and activations.
    """

    def __init__(self, model: InstructSam, device: torch.device, dtype: torch.dtype):
        self.model = model.to(device=device, dtype=dtype).eval()
        self.device = torch.device(device)
        self.dtype = dtype
        self.config = model.config
        self.token_ids = model.token_ids

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def release(self) -> None:
        """Move the weights to the CPU and return the cached device memory."""
        self.model.to("cpu")
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @abstractmethod
    def encode_language(self, frames: Sequence[FrameInput]) -> list[FrameHandle]:
        """The LLM's share of `encode_frames`: the Qwen3-VL vision tower and the prompt
        prefix, without SAM3, for a backend that runs SAM3 elsewhere (`graph_backend`).
        The handles hold no SAM3 features."""

    def phrase_batch(self, answers: Sequence[tuple[FrameHandle, Generation]]
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
        """Every paired phrase of the answers as SAM3-head inputs, padded to `max_phrase_tokens`.

        Returns `(query_states (P, K, H), phrase_ids (P, T), phrase_mask (P, T),
        phrase_hidden (P, T, H), answer_of_phrase)` (the last on the host: which answer
        each row belongs to).
        """
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
        queries = torch.stack([p.query_states for _, p in phrases])  # (P, K, H)
        return queries, phrase_ids.to(self.device), phrase_mask.to(self.device), hidden, [i for i, _ in phrases]

    def pack_phrases(self, answers: Sequence[tuple[FrameHandle, Generation]], sam: Sequence[SamFeatures]
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, SamFeatures]:
        """`phrase_batch` with, last, the SAM3 features of each phrase's frame (`sam[i]`:
        those of answer i's frame), one row per phrase."""
        queries, phrase_ids, phrase_mask, hidden, answer_of_phrase = self.phrase_batch(answers)
        frame_of_phrase = torch.tensor(answer_of_phrase, dtype=torch.long, device=self.device)
        features = SamFeatures.cat(list(sam)).take(frame_of_phrase)
        return queries, phrase_ids, phrase_mask, hidden, features
