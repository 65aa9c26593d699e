"""Procedural tabletop scenes: sample frames for demos and tests, with their object masks.

Drawn with PIL at run time, so the project needs no image files and no downloads. Each
scene is a wooden table with coloured mugs, fruit and a tray, the kind of frame a
manipulation robot sees; `objects` holds the exact mask of each object for tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw


@dataclass
class SceneObject:
    name: str  # e.g. "red mug"
    mask: np.ndarray  # (H, W) bool, the visible pixels


@dataclass
class Scene:
    image: np.ndarray  # (H, W, 3) uint8 RGB
    objects: list[SceneObject]
    suggested_instruction: str


_COLORS = {"red": (200, 40, 40), "blue": (40, 80, 200), "green": (50, 160, 70), "yellow": (230, 200, 40)}


def _draw_object(canvas: Image.Image, masks: list[tuple[str, Image.Image]], name: str, shape: str,
                 box: tuple[int, int, int, int], color: tuple[int, int, int]) -> None:
    layer = Image.new("L", canvas.size, 0)
    draw_mask = ImageDraw.Draw(layer)
    draw = ImageDraw.Draw(canvas)
    x1, y1, x2, y2 = box
    if shape == "mug":
        draw.rectangle(box, fill=color)
        draw_mask.rectangle(box, fill=255)
        handle = (x2 - 2, y1 + (y2 - y1) // 4, x2 + (x2 - x1) // 3, y1 + 3 * (y2 - y1) // 4)
        draw.ellipse(handle, outline=color, width=max(2, (x2 - x1) // 10))
        draw_mask.ellipse(handle, outline=255, width=max(2, (x2 - x1) // 10))
    elif shape == "fruit":
        draw.ellipse(box, fill=color)
        draw_mask.ellipse(box, fill=255)
    else:  # tray
        draw.rounded_rectangle(box, radius=6, fill=color)
        draw_mask.rounded_rectangle(box, radius=6, fill=255)
    # Later objects occlude earlier ones.
    for i, (other, m) in enumerate(masks):
        masks[i] = (other, Image.fromarray(np.asarray(m) & ~np.asarray(layer)))
    masks.append((name, layer))


def tabletop_scene(width: int = 320, height: int = 240, seed: int = 0) -> Scene:
    """A table with a tray, two or three mugs and a piece of fruit; deterministic per seed."""
    rng = np.random.default_rng(seed)
    canvas = Image.new("RGB", (width, height), (235, 232, 225))  # wall
    draw = ImageDraw.Draw(canvas)
    table_top = int(height * 0.45)
    draw.rectangle((0, table_top, width, height), fill=(150, 105, 60))  # table
    for y in range(table_top, height, max(4, height // 30)):  # wood grain
        draw.line((0, y, width, y + int(rng.integers(-3, 4))), fill=(135, 95, 55), width=1)
    masks: list[tuple[str, Image.Image]] = []
    s = width / 320.0
    tray = (int(20 * s), int(table_top + 30 * s), int(150 * s), int(table_top + 95 * s))
    _draw_object(canvas, masks, "tray", "tray", tray, (90, 90, 95))
    mug_colors = list(rng.permutation(["red", "blue", "green"]))[: int(rng.integers(2, 4))]
    x = int(170 * s)
    for i, color in enumerate(mug_colors):
        w = int((32 + 10 * i) * s)
        h = int((40 + 10 * i) * s)
        y2 = int(table_top + (50 + 15 * rng.random()) * s)
        _draw_object(canvas, masks, f"{color} mug", "mug", (x, y2 - h, x + w, y2), _COLORS[color])
        x += w + int(22 * s)
    fx = int(50 * s + 40 * rng.random() * s)
    fruit = (fx, int(table_top + 40 * s), fx + int(30 * s), int(table_top + 68 * s))
    _draw_object(canvas, masks, "yellow pear", "fruit", fruit, _COLORS["yellow"])
    noise = rng.normal(0, 3, (height, width, 3))  # a little sensor noise
    image = np.clip(np.asarray(canvas, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    objects = [SceneObject(name, np.asarray(m) > 0) for name, m in masks]
    return Scene(image=image, objects=objects, suggested_instruction=f"the {mug_colors[0]} mug")
