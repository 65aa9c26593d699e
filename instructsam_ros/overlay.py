"""The overlay image for RViz: the core's overlay drawing, in bgr8 channel order."""

from __future__ import annotations

import numpy as np

from instructsam_core.result import Result
from instructsam_core.visualize import PALETTE, draw_overlay

__all__ = ["PALETTE", "overlay_bgr"]


def overlay_bgr(rgb: np.ndarray, result: Result, instruction: str, banner: str = "") -> np.ndarray:
    """`(H, W, 3)` uint8 BGR overlay of `result` on the RGB source image."""
    return np.ascontiguousarray(draw_overlay(rgb, result, instruction, banner=banner)[:, :, ::-1])
