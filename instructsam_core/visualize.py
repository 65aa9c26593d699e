"""Overlay drawing: coloured masks, boxes, scores, phrase and instruction on the image.

Shared by the CLI, the benchmarks' optional mask dumps and the ROS node's overlay topic.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from .result import Result

# Distinct, colour-blind-friendly colours (Okabe-Ito), cycled per instance.
PALETTE = np.array([(230, 159, 0), (86, 180, 233), (0, 158, 115), (240, 228, 66), (0, 114, 178),
                    (213, 94, 0), (204, 121, 167), (120, 120, 120)], dtype=np.uint8)


def instance_color(index: int) -> tuple[int, int, int]:
    return tuple(int(c) for c in PALETTE[index % len(PALETTE)])


def draw_overlay(image: np.ndarray, result: Result, instruction: str = "", alpha: float = 0.5,
                 banner: str = "") -> np.ndarray:
    """`(H, W, 3)` uint8 RGB: `image` with each instance's mask tinted, its box and label
    ("phrase 0.87") drawn, and the instruction (plus an optional banner line) at the top."""
    out = image.astype(np.float32).copy()
    for i in range(len(result)):
        color = PALETTE[i % len(PALETTE)].astype(np.float32)
        m = result.masks[i]
        out[m] = (1 - alpha) * out[m] + alpha * color
    canvas = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for i in range(len(result)):
        x1, y1, x2, y2 = (int(v) for v in result.boxes[i])
        color = instance_color(i)
        draw.rectangle((x1, y1, x2, y2), outline=color, width=2)
        label = f"{result.phrases[i]} {result.scores[i]:.2f}"
        ty = max(0, y1 - 12)
        draw.rectangle((x1, ty, x1 + 6 * len(label) + 4, ty + 11), fill=color)
        draw.text((x1 + 2, ty), label, fill=(0, 0, 0))
    lines = [line for line in (banner, f"> {instruction}" if instruction else "",
                               f"{len(result)} instance(s)") if line]
    draw.rectangle((0, 0, canvas.width, 12 * len(lines) + 2), fill=(0, 0, 0))
    for row, line in enumerate(lines):
        draw.text((3, 1 + 12 * row), line, fill=(255, 255, 255))
    return np.asarray(canvas)
