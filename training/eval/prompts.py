"""Prompt construction of each benchmark (what the paper's evaluation sends the model).

Every builder is idempotent: a text that already carries the construction (as the
official preprocessed question files do) comes back unchanged, so the same builder
serves raw datasets and preprocessed question files.
"""

from __future__ import annotations

from typing import Callable

SEG_SUFFIX = " Please output the segmentation mask."
_QUESTION_WORDS = ("will", "would", "can", "could")
_QUOTES = {'"': '"', "'": "'", "\u201c": "\u201d", "\u2018": "\u2019", "`": "`"}

PromptFn = Callable[[str], str]


def strip_quotes(text: str | None) -> str:
    """Strip whitespace and any matching pairs of surrounding quotes (None: '')."""
    t = "" if text is None else str(text).strip()
    while len(t) >= 2 and t[0] in _QUOTES and t[-1] == _QUOTES[t[0]]:
        t = t[1:-1].strip()
    return t


def _require_text(text: str) -> str:
    t = strip_quotes(text)
    if not t:
        raise ValueError("empty expression text")
    return t


def build_instruction(prompt: PromptFn, text: str) -> tuple[str, str | None]:
    """`(prompt(text), None)`, or `("", reason)` when the builder rejects the text (an
    empty expression). Readers use it so that one bad expression fails its own sample,
    in the runner, instead of aborting the reading of the whole question file."""
    try:
        return prompt(text), None
    except ValueError as e:
        return "", str(e) or type(e).__name__


def roborefit_prompt(text: str, suffix: str = SEG_SUFFIX) -> str:
    """RoboRefIt: first letter capitalised, '?' after will/would/can/could else '.', + suffix.

    A text already ending in '.', '?' or '!' keeps its punctuation; a text already
    ending with the suffix is returned as is.
    """
    t = _require_text(text)
    if suffix.strip() and t.endswith(suffix.strip()):
        return t
    t = t[0].upper() + t[1:]
    if t[-1] not in ".?!":
        first = t.split(maxsplit=1)[0].lower()
        t += "?" if first in _QUESTION_WORDS else "."
    return t + suffix


def inst2seg_prompt(text: str, suffix: str = SEG_SUFFIX) -> str:
    """Inst2Seg: the instruction + suffix, unless it already contains the suffix."""
    t = _require_text(text)
    return t if suffix.strip() in t else t + suffix


def reasonseg_prompt(question: str, is_sentence: bool) -> str:
    """ReasonSeg: long queries + suffix; short ones "Please segment the '<q>' in the image."."""
    q = _require_text(question)
    if is_sentence:
        return q if SEG_SUFFIX.strip() in q else q + SEG_SUFFIX
    if q.startswith("Please segment the '") and q.endswith("' in the image."):
        return q
    return f"Please segment the '{q[0].lower() + q[1:]}' in the image."


def grefcoco_prompt(expression: str) -> str:
    """gRefCOCO (official AP script): "Can you segment '<expression>' in the image?"."""
    e = _require_text(expression)
    if e.startswith("Can you segment '") and e.endswith("' in the image?"):
        return e
    return f"Can you segment '{e}' in the image?"


def template_prompt(template: str) -> PromptFn:
    """A prompt builder from a user template with a ``{text}`` placeholder.

    Raises:
        ValueError: the template has no ``{text}`` placeholder.
    """
    if "{text}" not in template:
        raise ValueError(f"prompt template {template!r} must contain the placeholder {{text}}")

    def build(text: str) -> str:
        return template.replace("{text}", _require_text(text))

    return build
