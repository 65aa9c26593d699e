"""The engine's answer for one (frame, instruction) pair.

Kept free of torch so that consumers (the ROS node, the benchmarks) can hold results
without touching the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# How the model's answer paired its phrases with query blocks (`Result.status`). The
# released inference returns masks only when every query block it ran has a closed
# phrase to go with, in order; otherwise it returns no mask at all. We do the same and
# say why.
STATUS_OK = "ok"  # every phrase got its query block (instances may still be 0: none above the threshold)
STATUS_NO_TARGET = "no_target"  # the answer named no phrase: the model's "nothing to segment"
STATUS_BUDGET_CUT = "budget_cut"  # max_new_tokens ran out right after a phrase end, before its query block
STATUS_UNPAIRED = "unpaired_phrases"  # query blocks and closed phrases differ in number (e.g. an
#   <|object_ref_end|> with no <|object_ref_start|> before it)
ANSWER_STATUSES = (STATUS_OK, STATUS_NO_TARGET, STATUS_BUDGET_CUT, STATUS_UNPAIRED)


@dataclass
class Result:
    """Instances found for one instruction on one image.

    Zero instances is a valid answer ("no target"): every array then has length 0.

    Attributes:
        masks: `(N, H, W)` bool, one full-image mask per instance, in the pixels of the
            image given to `set_image`.
        scores: `(N,)` float32 in [0, 1], sorted descending.
        boxes: `(N, 4)` int64 pixel boxes `x1, y1, x2, y2` with inclusive max pixel
            (`x2` is the last foreground column), the tight box of each mask.
        phrases: `N` target phrases, the phrase each instance was segmented for.
        phrase_indices: `(N,)` int64 index of that phrase in the generated answer
            (one instruction may yield several phrases, each with its own K slots).
        slots: `(N,)` int64 index of the query slot (0..K-1) that produced the instance.
        image_size: `(H, W)` of the image.
        timings: seconds per stage (`image_encode`, `generate`, `mask_head`,
            `postprocess`, `total`); `image_encode` is 0 when the frame was cached.
        generated_text: the model's full answer text (phrases with their tokens).
        target_phrases: every closed phrase the answer named, in order; `phrase_indices`
            index it. Kept when no instance survives, so "looked for X, found none" is visible.
        status: why the answer did (or did not) give masks, one of `ANSWER_STATUSES`.
    """

    masks: np.ndarray
    scores: np.ndarray
    boxes: np.ndarray
    phrases: list[str]
    phrase_indices: np.ndarray
    slots: np.ndarray
    image_size: tuple[int, int]
    timings: dict[str, float] = field(default_factory=dict)
    generated_text: str = ""
    target_phrases: list[str] = field(default_factory=list)
    status: str = STATUS_OK

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    @classmethod
    def empty(cls, image_size: tuple[int, int], **kwargs) -> "Result":
        """A result with no instances for an image of `image_size` (H, W)."""
        h, w = image_size
        return cls(
            masks=np.zeros((0, h, w), dtype=bool),
            scores=np.zeros((0,), dtype=np.float32),
            boxes=np.zeros((0, 4), dtype=np.int64),
            phrases=[],
            phrase_indices=np.zeros((0,), dtype=np.int64),
            slots=np.zeros((0,), dtype=np.int64),
            image_size=(h, w),
            **kwargs,
        )

    def union_mask(self) -> np.ndarray:
        """`(H, W)` bool union of all instance masks (all False when there are none)."""
        if len(self) == 0:
            return np.zeros(self.image_size, dtype=bool)
        return self.masks.any(axis=0)

    def to_json(self) -> dict:
        """Instances as plain JSON-able data (no masks), for CLIs and logs."""
        return {
            "image_size": list(self.image_size),
            "generated_text": self.generated_text,
            "target_phrases": list(self.target_phrases),
            "status": self.status,
            "timings_ms": {k: round(v * 1e3, 3) for k, v in self.timings.items()},
            "instances": [
                {
                    "score": round(float(self.scores[i]), 6),
                    "box_xyxy": [int(v) for v in self.boxes[i]],
                    "area": int(self.masks[i].sum()),
                    "phrase": self.phrases[i],
                    "phrase_index": int(self.phrase_indices[i]),
                    "slot": int(self.slots[i]),
                }
                for i in range(len(self))
            ],
        }
