"""Greedy generation with a KV cache that opens a block of K query slots at every phrase end.

Whenever the model emits `<|object_ref_end|>`, the next step feeds
`<|object_ref_end|><|mask_start|>[SEG]xK<|mask_end|>` in one go, as the released model does;
the last hidden states at the K query positions are that phrase's instance embeddings.
One instruction may thus yield several phrases, each with its own K slots.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from .attention import hybrid_attention_mask
from .instructsam import InstructSam, VisionTokens
from .positions import mrope_positions

# Same call shape as transformers' LogitsProcessor: (input_ids (1, L), scores (1, V)) -> scores.
LogitsProcessor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class GeneratedPhrase:
    """One `<ref_start> phrase <ref_end>` span and its query block.

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
    """What one generation produced: every token after the prompt, and the phrases."""

    token_ids: list[int] = field(default_factory=list)
    phrases: list[GeneratedPhrase] = field(default_factory=list)


def _phrase_span(sequence: list[int], ref_start: int, ref_end_pos: int) -> int:
    """Position of the `<ref_start>` that opens the phrase ending at `ref_end_pos` (-1 if none)."""
    for i in range(ref_end_pos - 1, -1, -1):
        if sequence[i] == ref_start:
            return i
    return -1


@torch.no_grad()
def generate(
    model: InstructSam,
    prompt_ids: torch.Tensor,
    vision: VisionTokens | None,
    max_new_tokens: int = 64,
    logits_processors: Sequence[LogitsProcessor] = (),
    force_phrase_end: bool = False,
) -> Generation:
    """Greedy decoding of one prompt `(1, L)` with query blocks injected at phrase ends.

    Arguments:
        model: the InstructSAM model.
        prompt_ids: `(1, L)` chat prompt with the image placeholders.
        vision: the image's Qwen3-VL tokens (None for a text-only prompt).
        max_new_tokens: budget for generated tokens; a query block counts as one step.
        logits_processors: applied in order to each step's scores before the argmax.
        force_phrase_end: the prompt already ends in `<ref_start> phrase`; close it at once
            with a query block and stop (the caller forced the phrase, no generation).
    """
    ids = model.token_ids
    k = model.config.num_queries
    device = prompt_ids.device
    merge = model.vlm.config.vision_config.spatial_merge_size
    ones = torch.ones_like(prompt_ids)
    positions, next_pos = mrope_positions(prompt_ids, ones, ids.image, [vision.grid_thw if vision else None], merge)
    embeds, visual_pos_mask, deepstack = model.embed(prompt_ids, [vision])
    cache = DynamicCache(config=model.vlm.config.text_config)
    mask = hybrid_attention_mask(prompt_ids == ids.seg, ones.bool())
    hidden = model.run_language_model(embeds, mask, positions, cache, visual_pos_mask, deepstack)

    sequence = prompt_ids[0].tolist()
    states = [hidden[0]]  # hidden states of every position so far, in chunks
    out = Generation()
    block = [ids.ref_end, ids.mask_start] + [ids.seg] * k + [ids.mask_end]
    step_hidden = hidden[:, -1]
    for _ in range(max_new_tokens):
        if force_phrase_end:
            token = ids.ref_end if not out.phrases else ids.eos[0]
        else:
            scores = model.vlm.lm_head(step_hidden).float()
            for processor in logits_processors:
                scores = processor(torch.tensor([sequence], device=device), scores)
            token = int(scores.argmax(dim=-1))
        if token in ids.eos:
            out.token_ids.append(token)
            break
        new = block if token == ids.ref_end else [token]
        new_ids = torch.tensor([new], dtype=torch.long, device=device)
        q = len(new)
        new_pos = (next_pos.view(1, 1, 1) + torch.arange(q, device=device).view(1, 1, -1)).expand(3, 1, q)
        next_pos = next_pos + q
        past = len(sequence)
        mask = hybrid_attention_mask(new_ids == ids.seg, torch.ones(1, past + q, dtype=torch.bool, device=device))
        new_embeds, _, _ = model.embed(new_ids)
        hidden = model.run_language_model(new_embeds, mask, new_pos, cache)
        sequence.extend(new)
        states.append(hidden[0])
        out.token_ids.extend(new)
        step_hidden = hidden[:, -1]
        if token == ids.ref_end:
            ref_end_pos = past
            start = _phrase_span(sequence, ids.ref_start, ref_end_pos)
            all_states = torch.cat(states)
            span = list(range(start if start >= 0 else ref_end_pos, ref_end_pos + 1))[: model.config.max_phrase_tokens]
            out.phrases.append(GeneratedPhrase(
                token_ids=[sequence[i] for i in span],
                query_states=hidden[0, 2:2 + k],
                phrase_states=all_states[span],
            ))
    return out
