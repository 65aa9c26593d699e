"""What a benchmark sample is, independent of the file format it came from."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np


@dataclass
class GroundTruth:
    """A sample's ground truth, loaded lazily by the runner.

    Attributes:
        instances: `(G, H, W)` bool, one mask per GT instance (G = 0: no target).
        size: `(H, W)` of the masks (kept for G = 0).
        box: the dataset's GT box, inclusive-pixel xyxy, where it gives one.
        ignore: `(H, W)` bool pixels left out of the mask IoU, or None.
    """

    instances: np.ndarray
    size: tuple[int, int]
    box: tuple[float, float, float, float] | None = None
    ignore: np.ndarray | None = None

    @classmethod
    def from_masks(cls, masks: list[np.ndarray], size: tuple[int, int], **kwargs) -> "GroundTruth":
        """Stack instance masks of one size (an empty list: no target)."""
        h, w = size
        inst = np.stack(masks).astype(bool) if masks else np.zeros((0, h, w), dtype=bool)
        return cls(instances=inst, size=(h, w), **kwargs)

    @property
    def union(self) -> np.ndarray:
        """`(H, W)` union of all instances."""
        return self.instances.any(axis=0) if len(self.instances) else np.zeros(self.size, dtype=bool)


@dataclass
class Sample:
    """One (image, instruction) query of a benchmark.

    Attributes:
        sample_id: stable id within its split (resume and sharding key on it).
        image: path of the RGB image.
        text: the expression or question as the dataset gives it, surrounding quotes
            stripped.
        instruction: the prompt sent to the engine (the benchmark's prompt construction).
        group: the reporting group known from the question file (RoboRefIt scene,
            ReasonSeg short/long); None if the benchmark groups by GT instead.
        load_gt: returns the GroundTruth (may raise `DataError`); None: no GT, the sample
            runs predict-only and stays out of the metrics.
        meta: extra fields copied into the per-sample log.
        error: known at read time (e.g. an empty expression): the runner records the
            sample as failed with this reason, IoU 0, without running the engine.
    """

    sample_id: str
    image: Path
    text: str
    instruction: str
    group: str | None = None
    load_gt: Callable[[], GroundTruth] | None = None
    meta: dict = field(default_factory=dict)
    error: str | None = None
