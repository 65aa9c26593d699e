"""Overlay drawing: coloured masks, boxes, numbered labels, and the instruction banner.

One implementation for the CLI, the benchmarks and the ROS node's overlay topic. Label k
names instance k (1-based, the id it has in the ROS label image).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .result import STATUS_OK, Result

# Distinct colours (RGB) for instances 1, 2, ...; cycled beyond ten.
PALETTE = np.array([
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
], dtype=np.uint8)


def _font(size: int):
    try:  # scalable default font (Pillow >= 10.1); older Pillow has only the bitmap one
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def draw_overlay(image: np.ndarray, result: Result, instruction: str = "", alpha: float = 0.5,
                 banner: str = "") -> np.ndarray:
    """`(H, W, 3)` uint8 RGB: `image` with each instance's mask tinted, its box and label
    ("k phrase 0.87") drawn, and a banner with the instruction (and `banner`, e.g. a
    warning that the model is untrained) at the top."""
    out = image.astype(np.float32)
    for k in range(len(result)):
        m = result.masks[k]
        out[m] = (1.0 - alpha) * out[m] + alpha * PALETTE[k % len(PALETTE)].astype(np.float32)
    canvas = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    h = image.shape[0]
    font = _font(max(10, h // 40))
    found = f"{len(result)} found" + ("" if result.status == STATUS_OK else f", answer {result.status}")
    title = f"{instruction or '(no instruction)'}  [{found}]"
    lines = [line for line in (banner, title) if line]
    line_h = draw.textbbox((0, 0), "Ag", font=font)[3] + 2
    banner_h = 4 + line_h * len(lines) + 2
    for k in range(len(result)):
        color = tuple(int(c) for c in PALETTE[k % len(PALETTE)])
        x1, y1, x2, y2 = (int(v) for v in result.boxes[k])
        draw.rectangle([x1, y1, x2, y2], outline=color, width=max(1, h // 240))
        label = f"{k + 1} {result.phrases[k]} {float(result.scores[k]):.2f}"
        th = draw.textbbox((0, 0), label, font=font)[3] + 2
        # Above the box when there is room below the banner, else inside its top edge;
        # labels of boxes sharing a corner are stacked.
        ty = y1 - th if y1 - th >= banner_h else max(y1, banner_h) + 1 + (k * th if y1 < banner_h else 0)
        draw.rectangle(draw.textbbox((x1 + 2, ty), label, font=font), fill=color)
        draw.text((x1 + 2, ty), label, fill=(0, 0, 0), font=font)
    draw.rectangle((0, 0, image.shape[1], banner_h), fill=(0, 0, 0))
    for row, line in enumerate(lines):
        draw.text((4, 4 + row * line_h), line, fill=(255, 255, 255), font=font)
    return np.asarray(canvas)
