"""Learning curves of training runs as a PNG (PIL only: no plotting library needed).

    plot_curves([Path("runs/s1/metrics.jsonl"), Path("runs/s2/metrics.jsonl")], Path("curves.png"))

Runs are drawn one after another on a shared step axis (stage 2 continues where stage 1
ended), a dashed line marking each boundary. Two panels: the training loss and the
matched-mask IoU (training batches, smoothed; validation as dots).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from instructsam_core.fileio import atomic_file

PANELS = (("loss", "training loss"), ("mask_iou", "matched-mask IoU (train: line, validation: dots)"))
_COLOURS = ((31, 119, 180), (214, 39, 40))


def read_metrics(paths: list[Path]) -> tuple[list[dict], list[dict], list[int]]:
    """Step and evaluation records of consecutive runs on one step axis, and the boundaries."""
    steps, evals, boundaries = [], [], []
    offset = 0
    for path in paths:
        last = 0
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            record = json.loads(line)
            record = {**record, "step": record["step"] + offset}
            (evals if "eval" in record else steps).append(record)
            last = max(last, record["step"])
        boundaries.append(last)
        offset = last
    return steps, evals, boundaries[:-1]


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    if len(values) < window or window < 2:
        return values
    kernel = np.ones(window) / window
    return np.convolve(np.pad(values, (window // 2, window - 1 - window // 2), mode="edge"), kernel, mode="valid")


def plot_curves(paths: list[Path], out: Path, width: int = 900, panel_height: int = 260) -> Path:
    """Draw the curves of `paths` (metrics.jsonl files, in order) into `out` (PNG)."""
    steps, evals, boundaries = read_metrics([p for p in paths if Path(p).is_file()])
    font = ImageFont.load_default()
    margin_l, margin_r, margin_t, margin_b = 60, 20, 28, 30
    canvas = Image.new("RGB", (width, panel_height * len(PANELS)), "white")
    draw = ImageDraw.Draw(canvas)
    max_step = max([r["step"] for r in steps] + [1])
    for row, (key, title) in enumerate(PANELS):
        top = row * panel_height
        x0, x1, y0, y1 = margin_l, width - margin_r, top + margin_t, top + panel_height - margin_b
        xs = np.array([r["step"] for r in steps if r.get(key) is not None], dtype=float)
        ys = np.array([r[key] for r in steps if r.get(key) is not None], dtype=float)
        ev = [(r["step"], r["eval"][key]) for r in evals if r["eval"].get(key) is not None]
        lo, hi = (0.0, 1.0) if key == "mask_iou" else (0.0, float(np.percentile(ys, 99)) if len(ys) else 1.0)
        hi = hi if hi > lo else lo + 1.0
        sx = lambda s: x0 + (x1 - x0) * s / max_step  # noqa: E731
        sy = lambda v: y1 - (y1 - y0) * (min(max(v, lo), hi) - lo) / (hi - lo)  # noqa: E731
        draw.rectangle((x0, y0, x1, y1), outline=(0, 0, 0))
        draw.text((x0, top + 8), title, fill=(0, 0, 0), font=font)
        for frac in (0.0, 0.5, 1.0):
            v = lo + frac * (hi - lo)
            draw.text((4, sy(v) - 5), f"{v:.2f}", fill=(0, 0, 0), font=font)
        for b in boundaries:
            for y in range(int(y0), int(y1), 8):
                draw.line((sx(b), y, sx(b), y + 4), fill=(120, 120, 120))
        if len(xs) > 1:
            smooth = _smooth(ys, max(1, len(ys) // 60))
            draw.line([(sx(s), sy(v)) for s, v in zip(xs, smooth)], fill=_COLOURS[0], width=2)
        for s, v in ev:
            draw.ellipse((sx(s) - 3, sy(v) - 3, sx(s) + 3, sy(v) + 3), fill=_COLOURS[1])
        draw.text((x1 - 60, y1 + 8), f"step {max_step}", fill=(0, 0, 0), font=font)
    with atomic_file(out) as tmp:
        canvas.save(tmp, format="PNG")
    return Path(out)
