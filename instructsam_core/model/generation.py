"""Greedy generation with a KV cache that opens a block of K query slots at every phrase end.

Whenever the model emits `<|object_ref_end|>`, the next step feeds
`<|object_ref_end|><|mask_start|>[SEG]xK<|mask_end|>` in one go, as the released model does;
the last hidden states at the K query positions are that phrase's instance embeddings.
One instruction may thus yield several phrases, each with its own K slots.

Phrases and query blocks are paired as the released inference pairs them: the phrases are
found afterwards by a left-to-right scan of the answer (`find_phrase_spans`), the query
blocks are those actually run, and the i-th block goes with the i-th phrase only when both
counts agree; otherwise the release returns no masks at all (`result.ANSWER_STATUSES`).

The answer logic (`decode_answer`, `assemble_generation`, `chunk_layout`) is shared by
every PyTorch backend; each brings its own KV cache through an `AnswerRunner`. This
module's own runner is the eager one, over transformers' `DynamicCache`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import DynamicCache

from ..outputs import GeneratedPhrase, Generation, LogitsProcessor
from ..result import STATUS_BUDGET_CUT, STATUS_NO_TARGET, STATUS_OK, STATUS_UNPAIRED
from .attention import hybrid_attention_mask
from .instructsam import InstructSam, VisionTokens
from .positions import mrope_positions

__all__ = ["AnswerRunner", "GeneratedPhrase", "Generation", "LogitsProcessor", "PromptPrefix", "assemble_generation",
           "chunk_layout", "decode_answer", "expand_answer", "find_phrase_spans", "generate", "prefill_prefix"]


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


def query_block(model: InstructSam) -> list[int]:
    """`<ref_end><mask_start>[SEG]xK<mask_end>`: what a phrase end feeds in one step."""
    ids = model.token_ids
    return [ids.ref_end, ids.mask_start] + [ids.seg] * model.config.num_queries + [ids.mask_end]


def expand_answer(model: InstructSam, answer: Sequence[int]) -> list[int]:
    """The tokens an answer runs through the LLM: each phrase end opens its query block."""
    block = query_block(model)
    out: list[int] = []
    for token in answer:
        out.extend(block if token == model.token_ids.ref_end else [token])
    return out


def chunk_layout(model: InstructSam, new: Sequence[int], next_pos: torch.Tensor, past_len: int
                 ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Positions `(3, 1, Q)`, mask `(1, 1, Q, P + Q)` (None for a single token) and the
    next position, for text tokens `new` (no image tokens) fed on a cache of `P = past_len`.

    Any run of tokens, query blocks included, gets the layout that feeding it one step at
    a time (a token, or a whole block at a phrase end) would give, so a backend may run
    several steps in one pass. "consistent": positions continue from `next_pos` and the
    hybrid mask applies, exactly as in the teacher-forced forward. "release": as the
    released inference code runs, a query block's positions start one past where it
    starts, and its queries (and `<|mask_end|>`) see the whole block, `<|mask_end|>`
    included; the token after a block continues from the block's start plus its length.
    """
    ids = model.token_ids
    device = next_pos.device
    q = len(new)
    block_len = model.config.num_queries + 3
    blocks = [i for i in range(q - 1) if new[i] == ids.ref_end and new[i + 1] == ids.mask_start]
    release = model.config.generation_compat == "release"
    offsets = list(range(q))
    if release:
        for b in blocks:
            for j in range(b, min(b + block_len, q)):
                offsets[j] += 1
    offset = torch.tensor(offsets, device=device).view(1, 1, -1)
    positions = (next_pos.view(1, 1, 1) + offset).expand(3, 1, q)
    if q == 1:
        return positions, None, next_pos + 1  # one new token sees the whole cache: the plain causal case
    new_ids = torch.tensor([list(new)], device=device)
    mask = hybrid_attention_mask(new_ids == ids.seg, torch.ones(1, past_len + q, dtype=torch.bool, device=device))
    if release and blocks:
        mask = mask.clone()
        for b in blocks:
            end = min(b + block_len, q)
            mask[:, :, b + 2:end, past_len + b:past_len + end] = True
    return positions, mask, next_pos + q


# A backend's stage context (`Backend.stage`): called with a stage name around each pass.
StageContext = Callable[[str], AbstractContextManager]


def _no_stage(name: str) -> AbstractContextManager:
    return nullcontext()


class AnswerRunner(Protocol):
    """Runs text tokens on top of a backend's KV cache of the prompt so far."""

    def run(self, new: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed `new` (a token, a query block, or several steps at once, laid out by
        `chunk_layout`); returns `(hidden (1, Q, H), next-token logits (1, V) of the last)`."""


def decode_answer(model: InstructSam, runner: AnswerRunner, sequence: list[int], hidden: torch.Tensor,
                  logits: torch.Tensor, max_new_tokens: int, logits_processors: Sequence[LogitsProcessor] = (),
                  forced_answer: Sequence[int] | None = None, stage: StageContext = _no_stage) -> Generation:
    """The greedy decode loop, over any backend's `runner`.

    Arguments:
        sequence: the prompt ids (the loop appends the answer to it).
        hidden: `(1, Q, H)` hidden states of the prompt positions the runner ran (the
            rest sat in a cached prefix), the last of which predicts the first token.
        logits: `(1, V)` next-token logits of that last position.
        max_new_tokens, logits_processors, forced_answer, stage: as in `generate`.
    """
    ids = model.token_ids
    device = hidden.device
    states = [hidden[0]]  # hidden states of the positions run so far (not the cached prefix)
    first_state = len(sequence) - hidden.shape[1]
    answer: list[int] = []
    query_blocks: list[torch.Tensor] = []  # (K, H) per block run, in order
    budget_cut = False
    k = model.config.num_queries
    budget = len(forced_answer) if forced_answer is not None else max_new_tokens
    for step in range(budget):
        if forced_answer is not None:
            token = int(forced_answer[step])
        else:
            scores = logits.float()
            for processor in logits_processors:
                scores = processor(torch.tensor([sequence], device=device), scores)
            token = int(scores.argmax(dim=-1))
        if token in ids.eos or step == budget - 1:
            # The last token gets no query block (as in the release) and is not run, except
            # a phrase end: a phrase it closes may still pair and need its hidden state.
            budget_cut = token == ids.ref_end
            if budget_cut:
                with stage("decode"):
                    hidden, logits = runner.run([token])
                states.append(hidden[0])
            sequence.append(token)
            answer.append(token)
            break
        new = query_block(model) if token == ids.ref_end else [token]
        with stage("query_pass" if token == ids.ref_end else "decode"):
            hidden, logits = runner.run(new)
        sequence.extend(new)
        states.append(hidden[0])
        answer.extend(new)
        if token == ids.ref_end:
            query_blocks.append(hidden[0, 2:2 + k])
    return assemble_generation(model, sequence, answer, torch.cat(states), first_state, query_blocks, budget_cut)


def assemble_generation(model: InstructSam, sequence: list[int], answer: list[int], states: torch.Tensor,
                        first_state: int, query_blocks: list[torch.Tensor], budget_cut: bool) -> Generation:
    """Pair the answer's phrases with the query blocks run, as the release does.

    Arguments:
        sequence: prompt and answer ids.
        answer: the answer's ids (query blocks included as fed).
        states: `(N, H)` hidden states of `sequence[first_state:first_state + N]`.
        query_blocks: `(K, H)` query states of each block run, in order.
        budget_cut: the budget ended on a phrase end, whose block never ran.
    """
    ids = model.token_ids
    out = Generation(token_ids=list(answer))
    cap = model.config.max_phrase_tokens
    spans = [list(range(start, end + 1))[:cap] for start, end in find_phrase_spans(sequence, ids.ref_start, ids.ref_end)]
    out.phrase_token_ids = [[sequence[i] for i in span] for span in spans]
    out.status = _pairing_status(len(query_blocks), len(spans), budget_cut)
    if out.status != STATUS_OK:
        return out
    if spans[0][0] < first_state:
        raise ValueError("the phrase starts inside the cached prefix")
    for span, token_ids, query_states in zip(spans, out.phrase_token_ids, query_blocks):
        out.phrases.append(GeneratedPhrase(token_ids=token_ids, query_states=query_states,
                                           phrase_states=states[[i - first_state for i in span]]))
    return out


# ---- the eager runner: transformers' DynamicCache ------------------------------------

@dataclass
class PromptPrefix:
    """The KV cache of the prompt part every instruction on a frame shares (the chat header
    and the image), computed once per frame. `generate` copies it, never changes it."""

    token_ids: list[int]
    cache: DynamicCache
    next_position: torch.Tensor  # (1,) the position the token after the prefix takes


class _DynamicRunner:
    """Runs text tokens on a `DynamicCache` (grows by concatenation, any length)."""

    def __init__(self, model: InstructSam, cache: DynamicCache, next_pos: torch.Tensor, past_len: int):
        self.model, self.cache, self.next_pos, self.past_len = model, cache, next_pos, past_len

    def run(self, new: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        model = self.model
        positions, mask, self.next_pos = chunk_layout(model, new, self.next_pos, self.past_len)
        new_ids = torch.tensor([new], dtype=torch.long, device=self.next_pos.device)
        embeds = model.embed_text(new_ids, num_blocks=new.count(model.token_ids.seg) // model.config.num_queries)
        hidden = model.run_language_model(embeds, mask, positions, self.cache)
        self.past_len += len(new)
        return hidden, model.vlm.lm_head(hidden[:, -1])


def _prefill(model: InstructSam, prompt_ids: torch.Tensor, vision: VisionTokens | None
             ) -> tuple[torch.Tensor, DynamicCache, torch.Tensor]:
    """The whole prompt `(1, L)` (image included) into a fresh cache.

    "consistent" uses Qwen3-VL's 3-D positions (as training does); "release" numbers every
    token 0..L-1 on all three axes, as the released inference code does.
    """
    positions, next_pos = prompt_positions(model, prompt_ids, vision)
    ones = torch.ones_like(prompt_ids)
    embeds, visual_pos_mask, deepstack = model.embed(prompt_ids, [vision])
    cache = DynamicCache(config=model.vlm.config.text_config)
    mask = hybrid_attention_mask(prompt_ids == model.token_ids.seg, ones.bool())
    hidden = model.run_language_model(embeds, mask, positions, cache, visual_pos_mask, deepstack)
    return hidden, cache, next_pos


def prompt_positions(model: InstructSam, prompt_ids: torch.Tensor, vision: VisionTokens | None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """`(3, 1, L)` positions of a prompt run from position 0, and the next position `(1,)`."""
    if model.config.generation_compat == "release":
        length = prompt_ids.shape[1]
        positions = torch.arange(length, device=prompt_ids.device).view(1, 1, -1).expand(3, 1, -1)
        return positions, torch.tensor([length], device=prompt_ids.device)
    merge = model.vlm.config.vision_config.spatial_merge_size
    return mrope_positions(prompt_ids, torch.ones_like(prompt_ids), model.token_ids.image,
                           [vision.grid_thw if vision else None], merge)


@torch.no_grad()
def prefill_prefix(model: InstructSam, prefix_ids: torch.Tensor, vision: VisionTokens | None) -> PromptPrefix:
    """Encode the shared prompt prefix `(1, L)` of a frame once."""
    _, cache, next_pos = _prefill(model, prefix_ids, vision)
    return PromptPrefix(token_ids=prefix_ids[0].tolist(), cache=cache, next_position=next_pos)


def check_prefix(model: InstructSam, prompt_ids: Sequence[int], prefix_ids: Sequence[int]) -> None:
    """ValueError unless the prompt starts with the frame's prefix and has no image after it."""
    n = len(prefix_ids)
    if list(prompt_ids[:n]) != list(prefix_ids):
        raise ValueError("the prompt does not start with the cached prefix of this frame")
    if model.token_ids.image in prompt_ids[n:]:
        raise ValueError("image tokens after the cached prefix")


@torch.no_grad()
def generate(
    model: InstructSam,
    prompt_ids: torch.Tensor,
    vision: VisionTokens | None,
    max_new_tokens: int = 1024,
    logits_processors: Sequence[LogitsProcessor] = (),
    forced_answer: Sequence[int] | None = None,
    prefix: PromptPrefix | None = None,
    stage: StageContext = _no_stage,
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
        forced_answer: the answer's tokens to emit instead of generating them (a phrase end
            opens its query block as always; the budget is their number). E.g.
            `[ref_end, eos]` closes a phrase the prompt already opened (`<ref_start> phrase`).
        prefix: the frame's cached prompt prefix; `prompt_ids` must start with its tokens.
            Only the rest of the prompt is then run.
        stage: called with "prefill", "decode" or "query_pass" around each LLM pass
            (a backend's `stage`, for its stage timer).
    """
    if prefix is not None:
        prompt = prompt_ids[0].tolist()
        check_prefix(model, prompt, prefix.token_ids)
        n = len(prefix.token_ids)
        with stage("prefill"):
            runner = _DynamicRunner(model, copy.deepcopy(prefix.cache), prefix.next_position, n)
            hidden, logits = runner.run(prompt[n:])
    else:
        with stage("prefill"):
            hidden, cache, next_pos = _prefill(model, prompt_ids, vision)
            runner = _DynamicRunner(model, cache, next_pos, prompt_ids.shape[1])
            logits = model.vlm.lm_head(hidden[:, -1])
    return decode_answer(model, runner, prompt_ids[0].tolist(), hidden, logits, max_new_tokens, logits_processors,
                         forced_answer, stage)
