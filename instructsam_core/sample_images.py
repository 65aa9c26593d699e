"""Procedural tabletop scenes: sample frames for demos, tests and training, with their
exact object masks.

Drawn with PIL at run time, so the project needs no image files and no downloads.
`tabletop_scene` is a fixed wooden table with mugs, a pear and a tray (tests pin its
pixels); `random_scene` draws the synthetic tabletop world the default model is trained
on: 2-8 objects of ten kinds, eight colours and two sizes, on tables of varied colour and
texture, seen from above or at an angle, some touching or partly occluded.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw


@dataclass
class SceneObject:
    name: str  # e.g. "red mug"
    mask: np.ndarray  # (H, W) bool, the visible pixels
    kind: str = ""  # random_scene: one of KINDS
    colour: str = ""  # random_scene: one of COLOURS
    size: str = ""  # random_scene: one of SIZES


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


# ---- the synthetic tabletop world (random_scene) ------------------------------------------

KINDS = ("block", "ball", "can", "mug", "cup", "bowl", "plate", "bottle", "apple", "banana")
COLOURS = {"red": (205, 35, 35), "green": (40, 160, 60), "blue": (40, 80, 215), "yellow": (240, 210, 40),
           "orange": (245, 135, 30), "purple": (135, 55, 175), "white": (238, 238, 238), "black": (28, 28, 30)}
SIZES = ("small", "large")
VIEWS = ("top", "angle")
# Table tops: mid-tone colours (so white and black objects stand out) and a texture.
_TABLES = ((150, 105, 60), (118, 118, 124), (72, 112, 84), (170, 150, 118), (112, 82, 62), (96, 104, 134))
_TEXTURES = ("grain", "plain", "checker", "speckle")


def _shade(colour: tuple[int, int, int], factor: float) -> tuple[int, int, int]:
    return tuple(int(max(0, min(255, c * factor))) for c in colour)


def _draw_kind(draw: ImageDraw.ImageDraw, mask: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float,
               colour: tuple[int, int, int], view: str) -> None:
    """Draw one object centred at (cx, cy), radius scale r, on the image and its mask."""
    dark, light = _shade(colour, 0.7), _shade(colour, 1.25)
    edge = max(1, int(r / 8))

    def both(method: str, xy, *angles, **kw):  # the same shape on the image and (in white) the mask
        getattr(draw, method)(xy, *angles, **kw)
        mkw = {k: 255 for k in ("fill", "outline") if kw.get(k) is not None}
        if "width" in kw:
            mkw["width"] = kw["width"]
        getattr(mask, method)(xy, *angles, **mkw)

    box = lambda w, h, dy=0.0: (cx - w, cy - h + dy, cx + w, cy + h + dy)  # noqa: E731
    if kind == "block":
        both("rectangle", box(0.9 * r, 0.9 * r), fill=colour, outline=dark, width=edge)
        if view == "angle":
            both("polygon", [(cx - 0.9 * r, cy - 0.9 * r), (cx - 0.5 * r, cy - 1.3 * r),
                             (cx + 1.3 * r, cy - 1.3 * r), (cx + 0.9 * r, cy - 0.9 * r)], fill=light)
    elif kind == "ball":
        both("ellipse", box(r, r), fill=colour, outline=dark, width=edge)
        draw.ellipse(box(0.3 * r, 0.3 * r, -0.35 * r), fill=light)
    elif kind == "can":
        if view == "angle":
            both("rectangle", box(0.65 * r, 1.1 * r), fill=colour, outline=dark, width=edge)
            both("ellipse", (cx - 0.65 * r, cy - 1.35 * r, cx + 0.65 * r, cy - 0.85 * r), fill=light)
        else:
            both("ellipse", box(0.75 * r, 0.75 * r), fill=colour, outline=dark, width=edge)
            draw.ellipse(box(0.5 * r, 0.5 * r), outline=light, width=edge)
    elif kind == "mug":
        handle = (cx + 0.45 * r, cy - 0.5 * r, cx + 1.25 * r, cy + 0.5 * r)
        both("ellipse", handle, outline=colour, width=max(2, int(r / 4)))
        if view == "angle":
            both("rectangle", box(0.75 * r, 0.9 * r), fill=colour, outline=dark, width=edge)
        else:
            both("ellipse", box(0.8 * r, 0.8 * r), fill=colour, outline=dark, width=edge)
            draw.ellipse(box(0.55 * r, 0.55 * r), fill=dark)
    elif kind == "cup":
        if view == "angle":
            both("polygon", [(cx - 0.85 * r, cy - r), (cx + 0.85 * r, cy - r), (cx + 0.55 * r, cy + r),
                             (cx - 0.55 * r, cy + r)], fill=colour, outline=dark)
        else:
            both("ellipse", box(0.75 * r, 0.75 * r), fill=colour, outline=dark, width=edge)
            draw.ellipse(box(0.45 * r, 0.45 * r), fill=light)
    elif kind == "bowl":
        if view == "angle":
            both("chord", (cx - 1.3 * r, cy - 0.9 * r, cx + 1.3 * r, cy + 0.9 * r), 0, 180, fill=colour, outline=dark)
            both("ellipse", (cx - 1.3 * r, cy - 0.25 * r, cx + 1.3 * r, cy + 0.25 * r), fill=dark)
        else:
            both("ellipse", box(1.2 * r, 1.2 * r), fill=colour, outline=dark, width=edge)
            draw.ellipse(box(0.8 * r, 0.8 * r), fill=light)
    elif kind == "plate":
        if view == "angle":
            both("ellipse", (cx - 1.6 * r, cy - 0.45 * r, cx + 1.6 * r, cy + 0.45 * r), fill=colour, outline=dark)
            draw.ellipse((cx - 1.0 * r, cy - 0.25 * r, cx + 1.0 * r, cy + 0.25 * r), outline=dark)
        else:
            both("ellipse", box(1.5 * r, 1.5 * r), fill=colour, outline=dark, width=edge)
            draw.ellipse(box(1.0 * r, 1.0 * r), outline=dark, width=edge)
    elif kind == "bottle":
        if view == "angle":
            both("rectangle", (cx - 0.45 * r, cy - 0.7 * r, cx + 0.45 * r, cy + 1.3 * r), fill=colour, outline=dark)
            both("rectangle", (cx - 0.2 * r, cy - 1.4 * r, cx + 0.2 * r, cy - 0.7 * r), fill=dark)
        else:
            both("ellipse", box(0.5 * r, 0.5 * r), fill=colour, outline=dark, width=edge)
            draw.ellipse(box(0.2 * r, 0.2 * r), fill=dark)
    elif kind == "apple":
        both("ellipse", box(0.85 * r, 0.8 * r), fill=colour, outline=dark, width=edge)
        both("line", [(cx, cy - 0.8 * r), (cx + 0.2 * r, cy - 1.15 * r)], fill=(95, 60, 30), width=max(1, edge))
    elif kind == "banana":
        both("arc", (cx - 1.4 * r, cy - 1.4 * r, cx + 1.4 * r, cy + 0.6 * r), 20, 160, fill=colour,
             width=max(3, int(0.55 * r)))
    else:
        raise ValueError(f"unknown object kind {kind!r}; known: {KINDS}")


def _table(rng: np.random.Generator, width: int, height: int, view: str) -> tuple[Image.Image, int]:
    """The background: a wall above an angled table, or the table top seen from above."""
    base = _TABLES[int(rng.integers(len(_TABLES)))]
    canvas = Image.new("RGB", (width, height), base)
    draw = ImageDraw.Draw(canvas)
    top = int(height * rng.uniform(0.22, 0.38)) if view == "angle" else 0
    if top:
        draw.rectangle((0, 0, width, top), fill=tuple(int(v) for v in rng.integers(200, 245, 3)))
    texture = _TEXTURES[int(rng.integers(len(_TEXTURES)))]
    if texture == "grain":
        for y in range(top, height, max(3, height // 30)):
            draw.line((0, y, width, y + int(rng.integers(-3, 4))), fill=_shade(base, 0.88), width=1)
    elif texture == "checker":
        step = max(8, width // 10)
        for i, x in enumerate(range(0, width, step)):
            for j, y in enumerate(range(top, height, step)):
                if (i + j) % 2:
                    draw.rectangle((x, y, x + step - 1, y + step - 1), fill=_shade(base, 0.9))
    elif texture == "speckle":
        for _ in range(width * height // 60):
            x, y = int(rng.integers(width)), int(rng.integers(top, height))
            draw.point((x, y), fill=_shade(base, float(rng.uniform(0.8, 1.15))))
    return canvas, top


def random_scene(seed: int, width: int = 160, height: int = 120, num_objects: int | None = None,
                 view: str | None = None, exclude: frozenset[tuple[str, str]] = frozenset(),
                 only: frozenset[tuple[str, str]] = frozenset()) -> Scene:
    """A random tabletop of the synthetic world, deterministic for a seed.

    Arguments:
        seed: everything (table, view, objects, placement, noise) follows from it.
        width, height: image size in pixels.
        num_objects: 2..8 (default: drawn from the seed).
        view: "top" or "angle" (default: drawn from the seed).
        exclude: (colour, kind) pairs never drawn (held-out combinations).
        only: when given, one object is drawn from these (colour, kind) pairs (so a
            held-out split can show its combinations).
    Objects are drawn far to near (by their base line), so nearer ones occlude farther
    ones. Placement tries (60 times) to keep any two objects from covering more than 60 %
    of each other, then keeps the last position; an object left with fewer than 12
    visible pixels is dropped. `objects[i].mask` is exact.
    """
    rng = np.random.default_rng(seed)
    view = view or VIEWS[int(rng.integers(len(VIEWS)))]
    n = num_objects or int(rng.integers(2, 9))
    canvas, top = _table(rng, width, height, view)
    unit = min(width, height) / 14.0  # a small object's radius scale
    specs = []
    for i in range(n):
        for _ in range(100):
            if only and i == 0:
                colour, kind = sorted(only)[int(rng.integers(len(only)))]
            else:
                colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
                kind = KINDS[int(rng.integers(len(KINDS)))]
            if (colour, kind) not in exclude:
                break
        size = SIZES[int(rng.integers(2))]
        specs.append((kind, colour, size, unit * (1.0 if size == "small" else 1.55)))
    placed: list[SceneObject] = []
    layers: list[np.ndarray] = []
    order = []
    for kind, colour, size, r in specs:
        for _ in range(60):  # place where it stays mostly visible and leaves the others so
            cx = float(rng.uniform(1.6 * r, width - 1.6 * r))
            cy = float(rng.uniform(top + 1.6 * r, height - 1.6 * r))
            layer_img = Image.new("L", (width, height), 0)
            probe = Image.new("RGB", (width, height))
            _draw_kind(ImageDraw.Draw(probe), ImageDraw.Draw(layer_img), kind, cx, cy, r, COLOURS[colour], view)
            full = np.asarray(layer_img) > 0
            if not full.any():
                continue
            overlaps = [(full & m).sum() / max(1, m.sum()) for m in layers]
            if all(o < 0.6 for o in overlaps) and all((full & m).sum() < 0.6 * full.sum() for m in layers):
                break
        layers.append(full)
        order.append((cy + r, kind, colour, size, cx, cy, r))
    # Far to near: a larger base line (lower in the image) is nearer the camera.
    draw = ImageDraw.Draw(canvas)
    visible: list[np.ndarray] = []
    drawn = []
    for base, kind, colour, size, cx, cy, r in sorted(order, key=lambda o: o[0]):
        layer_img = Image.new("L", (width, height), 0)
        _draw_kind(draw, ImageDraw.Draw(layer_img), kind, cx, cy, r, COLOURS[colour], view)
        layer = np.asarray(layer_img) > 0
        visible = [v & ~layer for v in visible]
        visible.append(layer)
        drawn.append((kind, colour, size))
    for (kind, colour, size), mask in zip(drawn, visible):
        placed.append(SceneObject(name=f"{colour} {kind}", mask=mask, kind=kind, colour=colour, size=size))
    placed = [o for o in placed if o.mask.sum() >= 12]  # a sliver is no object
    noise = rng.normal(0, 3, (height, width, 3))
    image = np.clip(np.asarray(canvas, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    first = placed[0] if placed else None
    return Scene(image=image, objects=placed,
                 suggested_instruction=f"the {first.colour} {first.kind}" if first else "the mug")
