"""Greedy generation with a KV cache that opens a block of K query slots at every phrase end.

Whenever the model emits `<|object_ref_end|>`, the next step feeds
`<|object_ref_end|><|mask_start|>[SEG]xK<|mask_end|>` in one go, as the released model does;
the last hidden states at the K query positions are that phrase's instance embeddings.
One instruction may thus yield several phrases, each with its own K slots.

Phrases and query blocks are paired as the released inference pairs them: the phrases are
found afterwards by a left-to-right scan of the answer (`find_phrase_spans`), the query
blocks are those actually run, and the i-th block goes with the i-th phrase only when both
counts agree; otherwise the release returns no masks at all (`result.ANSWER_STATUSES`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from ..result import STATUS_BUDGET_CUT, STATUS_NO_TARGET, STATUS_OK, STATUS_UNPAIRED
from .attention import hybrid_attention_mask
from .instructsam import InstructSam, VisionTokens
from .positions import mrope_positions

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


def find_phrase_spans(sequence: Sequence[int], ref_start: int, ref_end: int) -> list[tuple[int, int]]:
    """`(start, end)` positions of the closed phrases in `sequence`, as the release finds them.

    A left-to-right scan: a `<ref_start>` opens a phrase that the first `<ref_end>` after
    it closes (a `<ref_start>` inside an open phrase is part of the phrase); a
    `<ref_end>` with no open phrase is skipped; a phrase never closed is no phrase.
    """
    spans = []
    start = -1
    for pos, token in enumerate(sequence):
        if token == ref_start and start < 0:
            start = pos
        elif token == ref_end and start >= 0:
            spans.append((start, pos))
            start = -1
    return spans


def _pairing_status(num_blocks: int, num_phrases: int, budget_cut_on_phrase_end: bool) -> str:
    if num_blocks == num_phrases:
        return STATUS_OK if num_blocks else STATUS_NO_TARGET
    return STATUS_BUDGET_CUT if budget_cut_on_phrase_end else STATUS_UNPAIRED


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
    max_new_tokens: int = 1024,
    logits_processors: Sequence[LogitsProcessor] = (),
    force_phrase_end: bool = False,
    prefix: PromptPrefix | None = None,
) -> Generation:
    """Greedy decoding of one prompt `(1, L)` with query blocks injected at phrase ends.

    Arguments:
        model: the InstructSAM model.
        prompt_ids: `(1, L)` chat prompt with the image placeholders.
        vision: the image's Qwen3-VL tokens (None for a text-only prompt).
        max_new_tokens: budget for generated tokens; a query block counts as one step. As
            in the release, a phrase end chosen by the last step of the budget gets no
            query block (the step that would run it never comes).
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
    query_blocks: list[torch.Tensor] = []  # (K, H) per block run, in order
    budget_cut = False
    step_hidden = hidden[:, -1]
    budget = 2 if force_phrase_end else max_new_tokens
    for step in range(budget):
        if force_phrase_end:
            token = ids.ref_end if not query_blocks else ids.eos[0]
        else:
            scores = model.vlm.lm_head(step_hidden).float()
            for processor in logits_processors:
                scores = processor(torch.tensor([sequence], device=device), scores)
            token = int(scores.argmax(dim=-1))
        if token in ids.eos or step == budget - 1:
            # The last token gets no query block (as in the release) and is not run, except
            # a phrase end: a phrase it closes may still pair and need its hidden state.
            budget_cut = token == ids.ref_end
            if budget_cut:
                hidden, next_pos = _extend(model, cache, torch.tensor([[token]], device=device), next_pos,
                                           len(sequence))
                states.append(hidden[0])
            sequence.append(token)
            out.token_ids.append(token)
            break
        new = block if token == ids.ref_end else [token]
        hidden, next_pos = _extend(model, cache, torch.tensor([new], dtype=torch.long, device=device), next_pos,
                                   len(sequence), is_block=token == ids.ref_end)
        sequence.extend(new)
        states.append(hidden[0])
        out.token_ids.extend(new)
        step_hidden = hidden[:, -1]
        if token == ids.ref_end:
            query_blocks.append(hidden[0, 2:2 + k])

    cap = model.config.max_phrase_tokens
    spans = [list(range(start, end + 1))[:cap] for start, end in find_phrase_spans(sequence, ids.ref_start, ids.ref_end)]
    out.phrase_token_ids = [[sequence[i] for i in span] for span in spans]
    out.status = _pairing_status(len(query_blocks), len(spans), budget_cut)
    if out.status != STATUS_OK:
        return out
    if spans[0][0] < first_state:
        raise ValueError("the phrase starts inside the cached prefix")
    all_states = torch.cat(states)
    for span, token_ids, query_states in zip(spans, out.phrase_token_ids, query_blocks):
        out.phrases.append(GeneratedPhrase(token_ids=token_ids, query_states=query_states,
                                           phrase_states=all_states[[i - first_state for i in span]]))
    return out
