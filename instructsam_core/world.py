"""The synthetic tabletop world's language: its instructions of nine kinds with their exact
targets (`expressions`), the words they use, and the small tokenizer the default model
reads them with.

Qwen's 151,680-token vocabulary would be 94 % of a small model's weights, so the default
model carries a word-level tokenizer of the world's few hundred words (plus Qwen's and
InstructSAM's special tokens, which the engine finds by name). A word it does not know
becomes `<unk>`: the default model only knows the synthetic tabletop world.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .sample_images import COLOURS, KINDS, SIZES, Scene

# Every word the world's instructions, prompts and answers use (`expressions` below,
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


# ---- instructions with their exact targets -----------------------------------------------

INSTRUCTION_KINDS = ("category", "colour", "attribute", "spatial", "superlative", "exclusion", "intent", "multi",
                     "no_target")
INTENTS = {
    "something to drink from": ("cup", "mug"),
    "something to pour water into": ("cup", "mug", "bowl"),
    "something to eat": ("apple", "banana"),
    "something to roll": ("ball",),
    "something to stack": ("block",),
    "something to serve food on": ("plate",),
    "something that holds soup": ("bowl",),
    "something to carry water in": ("bottle",),
    "a drink in a can": ("can",),
}


# The one form the default model's training data ask an instruction in: the gRefCOCO
# reader's question (training/eval/prompts.py, `grefcoco_prompt`). It has never seen a bare
# expression and answers one badly, so its engine_config.json carries this as its
# `instruction_template` and the engine puts a plain instruction in this form.
TRAINED_TEMPLATE = "Can you segment '{instruction}' in the image?"


def trained_instruction(expression: str) -> str:
    """`expression` in the form the default model was trained on (`TRAINED_TEMPLATE`)."""
    return TRAINED_TEMPLATE.replace("{instruction}", expression)


@dataclass
class Expression:
    """An instruction's referring expression, its kind, and the indices of its targets."""

    text: str
    kind: str
    targets: list[int]


def _centre_x(scene: Scene, i: int) -> float:
    return float(np.nonzero(scene.objects[i].mask)[1].mean())


def _area(scene: Scene, i: int) -> int:
    return int(scene.objects[i].mask.sum())


def expressions(scene: Scene, rng: np.random.Generator, kinds: tuple[str, ...] = INSTRUCTION_KINDS,
                exclude: frozenset[tuple[str, str]] = frozenset()) -> list[Expression]:
    """At most one expression of each requested kind the scene allows; a no-target
    expression never names an `exclude`d (colour, kind) pair."""
    objs = scene.objects
    by_kind: dict[str, list[int]] = {}
    by_colour: dict[str, list[int]] = {}
    for i, o in enumerate(objs):
        by_kind.setdefault(o.kind, []).append(i)
        by_colour.setdefault(o.colour, []).append(i)
    pick = lambda seq: seq[int(rng.integers(len(seq)))]  # noqa: E731
    out: list[Expression] = []
    for kind in kinds:
        made = None
        if kind == "category" and by_kind:
            k = pick(sorted(by_kind))
            word = PLURAL[k] if len(by_kind[k]) > 1 else k
            made = Expression(f"the {word}", kind, by_kind[k])
        elif kind == "colour" and by_colour:
            c = pick(sorted(by_colour))
            many = len(by_colour[c]) > 1
            template = pick(["the {c} objects", "the {c} ones", "everything {c}"] if many else
                            ["the {c} object", "the {c} one", "the {c} thing"])
            made = Expression(template.format(c=c), kind, by_colour[c])
        elif kind == "attribute" and objs:
            o = objs[int(rng.integers(len(objs)))]
            targets = [i for i, p in enumerate(objs) if (p.kind, p.colour, p.size) == (o.kind, o.colour, o.size)]
            word = PLURAL[o.kind] if len(targets) > 1 else o.kind
            made = Expression(f"the {o.size} {o.colour} {word}", kind, targets)
        elif kind == "spatial":
            several = sorted(k for k, v in by_kind.items() if len(v) > 1)
            unique = sorted(k for k, v in by_kind.items() if len(v) == 1)
            options = []
            if several:
                k = pick(several)
                side = pick(["leftmost", "rightmost"])
                xs = [_centre_x(scene, i) for i in by_kind[k]]
                target = by_kind[k][int(np.argmin(xs) if side == "leftmost" else np.argmax(xs))]
                options.append(Expression(f"the {side} {k}", kind, [target]))
            if unique and len(by_kind) > 1:
                anchor = pick(unique)
                k = pick(sorted(x for x in by_kind if x != anchor))
                side = pick(["left", "right"])
                ax = _centre_x(scene, by_kind[anchor][0])
                targets = [i for i in by_kind[k] if (_centre_x(scene, i) < ax) == (side == "left")]
                word = PLURAL[k] if len(targets) > 1 else k
                options.append(Expression(f"the {word} {side} of the {anchor}", kind, targets))
            made = pick(options) if options else None
        elif kind == "superlative":
            several = sorted(k for k, v in by_kind.items() if len(v) > 1)
            if several:
                k = pick(several)
                areas = [_area(scene, i) for i in by_kind[k]]
                order = [by_kind[k][j] for j in np.argsort(areas, kind="stable")]
                if len(order) > 2 and rng.random() < 0.5:
                    made = Expression(f"the two largest {PLURAL[k]}", kind, order[-2:])
                else:
                    size = pick(["largest", "smallest"])
                    made = Expression(f"the {size} {k}", kind, [order[-1] if size == "largest" else order[0]])
        elif kind == "exclusion":
            options = [(k, c) for k, idx in sorted(by_kind.items()) if len(idx) > 1
                       for c in sorted({objs[i].colour for i in idx})
                       if 0 < sum(objs[i].colour == c for i in idx) < len(idx)]
            if options:
                k, c = pick(options)
                made = Expression(f"every {k} except the {c} one", kind,
                                  [i for i in by_kind[k] if objs[i].colour != c])
        elif kind == "intent":
            present = [t for t, ks in INTENTS.items() if any(k in by_kind for k in ks)]
            if present:
                t = pick(sorted(present))
                made = Expression(t, kind, [i for i, o in enumerate(objs) if o.kind in INTENTS[t]])
        elif kind == "multi" and len(by_kind) > 1:
            a, b = rng.choice(sorted(by_kind), size=2, replace=False)
            made = Expression(f"the {a} and the {b}", kind, sorted(by_kind[a] + by_kind[b]))
        elif kind == "no_target":
            absent = [(c, k) for c in COLOURS for k in KINDS if (c, k) not in exclude
                      and not any((o.colour, o.kind) == (c, k) for o in objs)]
            c, k = pick(absent)
            made = Expression(f"the {c} {k}", kind, [])
        if made is not None:
            out.append(made)
    return out
