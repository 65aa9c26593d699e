"""InstructSAM's special tokens: their strings and, read from a tokenizer, their ids.

Kept apart from the model and the processing so that both can use them without
importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass

# Token strings InstructSAM adds to Qwen's vocabulary, and the two reference-span tokens
# that Qwen already has (ids 151646 / 151647 in the released vocabulary).
SEG_TOKEN = "[SEG]"
MASK_START_TOKEN = "<|mask_start|>"
MASK_END_TOKEN = "<|mask_end|>"
REGION_TOKEN = "<REGION>"
REF_START_TOKEN = "<|object_ref_start|>"
REF_END_TOKEN = "<|object_ref_end|>"
ADDED_TOKENS = (REGION_TOKEN, SEG_TOKEN, MASK_START_TOKEN, MASK_END_TOKEN)  # the release's order


@dataclass
class TokenIds:
    """Ids of the special tokens the model's sequences use (read from the tokenizer)."""

    seg: int
    mask_start: int
    mask_end: int
    ref_start: int = 151646
    ref_end: int = 151647
    image: int = 151655
    vision_start: int = 151652
    vision_end: int = 151653
    im_end: int = 151645
    eos: tuple[int, ...] = (151645, 151643)


def token_ids_from_tokenizer(tokenizer) -> TokenIds:
    """Special-token ids from the tokenizer; a missing InstructSAM token is an error naming it."""
    def get(token: str) -> int:
        idx = tokenizer.convert_tokens_to_ids(token)
        if idx is None or idx == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {token!r} token; is this an InstructSAM checkpoint?")
        return int(idx)

    return TokenIds(seg=get(SEG_TOKEN), mask_start=get(MASK_START_TOKEN), mask_end=get(MASK_END_TOKEN),
                    ref_start=get(REF_START_TOKEN), ref_end=get(REF_END_TOKEN), image=get("<|image_pad|>"),
                    vision_start=get("<|vision_start|>"), vision_end=get("<|vision_end|>"),
                    im_end=get("<|im_end|>"), eos=(get("<|im_end|>"), get("<|endoftext|>")))
