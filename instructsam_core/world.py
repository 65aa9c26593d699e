"""The synthetic tabletop world's language: the words its instructions use and the small
tokenizer the default model reads them with.

Qwen's 151,680-token vocabulary would be 94 % of a small model's weights, so the default
model carries a word-level tokenizer of the world's few hundred words (plus Qwen's and
InstructSAM's special tokens, which the engine finds by name). A word it does not know
becomes `<unk>`: the default model only knows the synthetic tabletop world.
"""

from __future__ import annotations

from functools import lru_cache

from .sample_images import COLOURS, KINDS, SIZES

# Every word the world's instructions, prompts and answers use (training/tabletop.py,
# training/eval/prompts.py, the chat template); tests check nothing falls outside.
_WORDS = (
    # the chat template and the benchmarks' prompts
    "system user assistant You are a helpful Can you segment in the image Please output segmentation mask "
    "I want to get give me "
    # referring expressions
    "the object objects one ones thing things everything every except of and two largest smallest "
    "leftmost rightmost left right something to drink from pour water into eat roll stack serve food on "
    "that holds soup carry can drink "
    # the node's and the demo's own words
    "warm up"
)
PLURAL = {kind: kind + "s" for kind in KINDS}  # every kind takes a plain -s
PUNCTUATION = (" ", "\n", "\t", "'", '"', "?", ".", ",", "!", "-", ":", ";", "(", ")")
UNKNOWN = "<unk>"


def world_words() -> list[str]:
    """The world's words, in a fixed order (the tokenizer's ids follow it)."""
    words = set(_WORDS.split()) | set(KINDS) | set(COLOURS) | set(SIZES)
    words |= set(PLURAL.values())
    words |= {w.capitalize() for w in words}
    return sorted(words)


@lru_cache(maxsize=1)
def world_tokenizer():
    """A word-level tokenizer of the world: words, single punctuation and whitespace
    characters, then Qwen's special tokens and InstructSAM's added ones."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from .processing import QWEN_SPECIAL_TOKENS
    from .tokens import ADDED_TOKENS

    vocab = {token: i for i, token in enumerate([UNKNOWN, *PUNCTUATION, *world_words()])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNKNOWN))
    # Words, numbers, and every other character on its own, whitespace included, so that
    # decoding (Fuse: no separator) gives the text back.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[A-Za-z]+|\d+|[^A-Za-z\d]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t in QWEN_SPECIAL_TOKENS + ADDED_TOKENS])
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token=UNKNOWN, model_max_length=4096)
