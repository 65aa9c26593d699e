"""What the model's stages hand back: plain data that crosses the backend door.

These types hold `torch.Tensor`s as plain arrays (on the backend's device) and nothing
else of PyTorch: no module, no KV cache, no autograd state. Every backend builds them,
the PyTorch ones from their modules, a TensorRT one from the output buffers it binds; the
engine post-processes them. The model code (`model/`) and the backends (`backends/`)
both import them from here, so neither depends on the other for its outputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .result import STATUS_NO_TARGET

# Same call shape as transformers' LogitsProcessor: (input_ids (1, L), scores (1, V)) -> scores.
LogitsProcessor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class GeneratedPhrase:
    """One `<ref_start> phrase <ref_end>` span and the query block paired with it.

    Attributes:
        token_ids: ids of `<ref_start> phrase <ref_end>`, capped at `max_phrase_tokens`.
        query_states: `(K, H)` last hidden states at the K query positions.
        phrase_states: `(T, H)` last hidden states at the phrase tokens (same cap).
    """

    token_ids: list[int]
    query_states: torch.Tensor
    phrase_states: torch.Tensor


@dataclass
class Generation:
    """What one generation produced.

    Attributes:
        token_ids: every token after the prompt (query blocks included as fed).
        phrase_token_ids: every closed phrase of the answer, `<ref_start> ... <ref_end>`
            capped at `max_phrase_tokens`, paired or not.
        phrases: the phrases paired with a query block; empty unless `status` is "ok".
        status: how the answer's phrases and query blocks paired (`result.ANSWER_STATUSES`).
    """

    token_ids: list[int] = field(default_factory=list)
    phrase_token_ids: list[list[int]] = field(default_factory=list)
    phrases: list[GeneratedPhrase] = field(default_factory=list)
    status: str = STATUS_NO_TARGET


@dataclass
class HeadOutput:
    """Per-slot predictions of the SAM3 head.

    Attributes:
        mask_logits: `(B, K, h, w)` mask logits at SAM3's mask resolution (288 at 1008 px).
        logits: `(B, K)` slot logits from dot-product scoring (query . pooled prompt).
        boxes: `(B, K, 4)` normalised xyxy boxes in [0, 1] from the decoder's box head.
        presence_logits: `(B, 1)` presence logits, or None without the presence token.
        layer_boxes: `(B, L, K, 4)` every decoder layer's xyxy box prediction (the last is
            `boxes`), differentiable through the box head: what a box loss supervises.
        semantic_logits: `(B, h, w)` the mask decoder's semantic head: one mask of
            everything the prompt names (SAM3 trains it; inference does not use it).
        layer_states: `(B, L, K, D)` every decoder layer's normalised query states (the
            last layer's are what the scoring and the mask decoder read): what training's
            slot-spread loss reads.
        fusion_tokens: `(B, h*w, D)` the image tokens the DETR decoder reads (the fusion
            encoder's output, with `fusion_image_skip` and `fusion_output_norm` applied):
            what training's object-colour target reads.
    """

    mask_logits: torch.Tensor
    logits: torch.Tensor
    boxes: torch.Tensor
    presence_logits: torch.Tensor | None = None
    layer_boxes: torch.Tensor | None = None
    semantic_logits: torch.Tensor | None = None
    layer_states: torch.Tensor | None = None
    fusion_tokens: torch.Tensor | None = None

    def split(self, sizes: list[int]) -> list["HeadOutput"]:
        """Per-group outputs of a head run over several groups of rows (`sizes` rows each)."""
        parts = [torch.split(t, sizes) if t is not None else [None] * len(sizes)
                 for t in (self.mask_logits, self.logits, self.boxes, self.presence_logits, self.layer_boxes,
                           self.semantic_logits, self.layer_states, self.fusion_tokens)]
        return [HeadOutput(*fields) for fields in zip(*parts)]

    def scores(self) -> torch.Tensor:
        """`(B, K)` slot probabilities; with a presence token, times its probability."""
        scores = self.logits.sigmoid()
        if self.presence_logits is not None:
            scores = scores * self.presence_logits.sigmoid()
        return scores
