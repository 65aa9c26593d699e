"""Greedy generation with a KV cache that opens a block of K query slots at every phrase end.

Whenever the model emits `<|object_ref_end|>`, the next step feeds
`<|object_ref_end|><|mask_start|>[SEG]xK<|mask_end|>` in one go, as the released model does;
the last hidden states at the K query positions are that phrase's instance embeddings.
One instruction may thus yield several phrases, each with its own K slots.
"""

from __future__ import annotations

import copy
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


@dataclass
class PromptPrefix:
    """The KV cache of the prompt part every instruction on a frame shares (the chat header
    and the image), computed once per frame. `generate` copies it, never changes it."""

    token_ids: list[int]
    cache: DynamicCache
    next_position: torch.Tensor  # (1,) the position the token after the prefix takes


def _step_layout(model: InstructSam, new_ids: torch.Tensor, next_pos: torch.Tensor, past_len: int,
                 is_block: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions `(3, 1, Q)` and mask `(1, 1, Q, P + Q)` (None for a single token) for text
    tokens fed on a cache.

    "consistent": positions continue from `next_pos` and the hybrid mask applies, exactly
    as in the teacher-forced forward. "release": as the released inference code runs, a
    query block's positions start one past `next_pos`, and its queries (and
    `<|mask_end|>`) see the whole block, `<|mask_end|>` included.
    """
    q = new_ids.shape[1]
    release_block = is_block and model.config.generation_compat == "release"
    start = next_pos + (1 if release_block else 0)
    positions = (start.view(1, 1, 1) + torch.arange(q, device=new_ids.device).view(1, 1, -1)).expand(3, 1, q)
    if q == 1:
        return positions, None  # one new token sees the whole cache: the plain causal case
    mask = hybrid_attention_mask(new_ids == model.token_ids.seg,
                                 torch.ones(1, past_len + q, dtype=torch.bool, device=new_ids.device))
    if release_block:
        mask = mask.clone()
        mask[:, :, 2:, past_len:] = True
    return positions, mask


def _extend(model: InstructSam, cache: DynamicCache, new_ids: torch.Tensor, next_pos: torch.Tensor,
            past_len: int, is_block: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Run text tokens `(1, Q)` (no image tokens) on top of a cache of `past_len` tokens.
    Returns `(hidden (1, Q, H), next position)`."""
    positions, mask = _step_layout(model, new_ids, next_pos, past_len, is_block)
    embeds = model.embed_text(new_ids, num_blocks=1 if is_block else 0)
    return model.run_language_model(embeds, mask, positions, cache), next_pos + new_ids.shape[1]


def _prefill(model: InstructSam, prompt_ids: torch.Tensor, vision: VisionTokens | None
             ) -> tuple[torch.Tensor, DynamicCache, torch.Tensor]:
    """The whole prompt `(1, L)` (image included) into a fresh cache.

    "consistent" uses Qwen3-VL's 3-D positions (as training does); "release" numbers every
    token 0..L-1 on all three axes, as the released inference code does.
    """
    ones = torch.ones_like(prompt_ids)
    if model.config.generation_compat == "release":
        length = prompt_ids.shape[1]
        positions = torch.arange(length, device=prompt_ids.device).view(1, 1, -1).expand(3, 1, -1)
        next_pos = torch.tensor([length], device=prompt_ids.device)
    else:
        merge = model.vlm.config.vision_config.spatial_merge_size
        positions, next_pos = mrope_positions(prompt_ids, ones, model.token_ids.image,
                                              [vision.grid_thw if vision else None], merge)
    embeds, visual_pos_mask, deepstack = model.embed(prompt_ids, [vision])
    cache = DynamicCache(config=model.vlm.config.text_config)
    mask = hybrid_attention_mask(prompt_ids == model.token_ids.seg, ones.bool())
    hidden = model.run_language_model(embeds, mask, positions, cache, visual_pos_mask, deepstack)
    return hidden, cache, next_pos


@torch.no_grad()
def prefill_prefix(model: InstructSam, prefix_ids: torch.Tensor, vision: VisionTokens | None) -> PromptPrefix:
    """Encode the shared prompt prefix `(1, L)` of a frame once."""
    _, cache, next_pos = _prefill(model, prefix_ids, vision)
    return PromptPrefix(token_ids=prefix_ids[0].tolist(), cache=cache, next_position=next_pos)


@torch.no_grad()
def generate(
    model: InstructSam,
    prompt_ids: torch.Tensor,
    vision: VisionTokens | None,
    max_new_tokens: int = 64,
    logits_processors: Sequence[LogitsProcessor] = (),
    force_phrase_end: bool = False,
    prefix: PromptPrefix | None = None,
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
        prefix: the frame's cached prompt prefix; `prompt_ids` must start with its tokens.
            Only the rest of the prompt is then run.
    """
    ids = model.token_ids
    k = model.config.num_queries
    device = prompt_ids.device
    if prefix is not None:
        n = len(prefix.token_ids)
        if prompt_ids[0, :n].tolist() != prefix.token_ids:
            raise ValueError("the prompt does not start with the cached prefix of this frame")
        if bool((prompt_ids[0, n:] == ids.image).any()):
            raise ValueError("image tokens after the cached prefix")
        cache = copy.deepcopy(prefix.cache)
        hidden, next_pos = _extend(model, cache, prompt_ids[:, n:], prefix.next_position, n)
    else:
        hidden, cache, next_pos = _prefill(model, prompt_ids, vision)

    sequence = prompt_ids[0].tolist()
    states = [hidden[0]]  # hidden states of the positions run so far (not the cached prefix)
    first_state = len(sequence) - hidden.shape[1]
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
        past = len(sequence)
        hidden, next_pos = _extend(model, cache, torch.tensor([new], dtype=torch.long, device=device), next_pos, past,
                                   is_block=token == ids.ref_end)
        sequence.extend(new)
        states.append(hidden[0])
        out.token_ids.extend(new)
        step_hidden = hidden[:, -1]
        if token == ids.ref_end:
            start = _phrase_span(sequence, ids.ref_start, past)
            span = list(range(start if start >= 0 else past, past + 1))[: model.config.max_phrase_tokens]
            if span[0] < first_state:
                raise ValueError("the phrase starts inside the cached prefix")
            all_states = torch.cat(states)
            out.phrases.append(GeneratedPhrase(
                token_ids=[sequence[i] for i in span],
                query_states=hidden[0, 2:2 + k],
                phrase_states=all_states[[i - first_state for i in span]],
            ))
    return out
