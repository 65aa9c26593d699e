"""Where a model's answers to colour instructions land, by object colour.

`tabletop.evaluate` gives one mIoU for the colour kind; this report says what the misses
are. For each colour instruction ("the red object") it runs the engine with no score
threshold and splits the answer's union mask by what lies under it in the rendered scene:
objects of the named colour, objects of each other colour, the table. Per named colour, the
shares are pooled over its instructions' predicted pixels. A row such as "red: red 0.56,
black 0.22, orange 0.11" says the model confuses red with black and orange, which a
per-kind mIoU cannot tell from blurred masks.

    python -m training.colour_confusion MODEL_DIR runs/default_model/full/data/heldout.json

prints one row per named colour and writes `--json` if given.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from instructsam_core.sample_images import COLOURS, Scene
from training.split_report_cli import run_split_report

TABLE = "table"  # pixels on no object


def pixel_shares(mask: np.ndarray, scene: Scene) -> Counter:
    """Pixels of `mask` ((H, W) bool) on each colour's objects of `scene`, and on the table
    (`TABLE`). The renderer's object masks are disjoint (each pixel shows one object)."""
    counts: Counter = Counter()
    on_objects = np.zeros(mask.shape, dtype=bool)
    for obj in scene.objects:
        counts[obj.colour] += int((mask & obj.mask).sum())
        on_objects |= obj.mask
    counts[TABLE] += int((mask & ~on_objects).sum())
    return counts


def colour_confusion(segmenter, split_file: Path, limit: int | None = None, progress: bool = False) -> dict:
    """Per named colour: `n` (its colour instructions), `pixels` (their predicted pixels)
    and `shares` (the share of those pixels on each colour's objects and on the table, the
    largest first). Only the colour kind is run; its instructions name one colour."""
    from tqdm import tqdm

    from instructsam_core.processing import load_rgb
    from training.probes import COLOUR_NAMES, named_colour, scene_of
    from training.tabletop import split_samples

    pixels: dict[str, Counter] = {}
    counts: Counter = Counter()
    samples = [sample for sample, kind in split_samples(split_file, limit) if kind == "colour"]
    for sample in tqdm(samples, desc=f"colours {Path(split_file).stem}", disable=not progress):
        named = named_colour(sample.text)
        if named < 0:
            continue
        colour = COLOUR_NAMES[named]
        image = load_rgb(sample.image)
        result = segmenter.segment_image(image, sample.instruction, key=str(sample.image), score_threshold=0.0)
        pixels.setdefault(colour, Counter()).update(pixel_shares(result.union_mask(), scene_of(sample.image, image)))
        counts[colour] += 1
    report = {}
    for colour in COLOURS:
        if colour not in pixels:
            continue
        total = sum(pixels[colour].values())
        shares = {k: v / total for k, v in pixels[colour].most_common()} if total else {}
        report[colour] = {"n": counts[colour], "pixels": total, "shares": shares}
    return report


def format_report(report: dict, top: int = 4) -> str:
    """One line per named colour: its own share, then the largest others."""
    lines = [f"{'named':<8} {'n':>4} {'on it':>6}  elsewhere (largest first)"]
    for colour, row in report.items():
        own = row["shares"].get(colour, 0.0)
        others = [f"{k} {v:.2f}" for k, v in row["shares"].items() if k != colour][:top]
        lines.append(f"{colour:<8} {row['n']:>4} {own:>6.2f}  {', '.join(others)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return run_split_report(argv, "python -m training.colour_confusion", __doc__, colour_confusion, format_report)


if __name__ == "__main__":
    raise SystemExit(main())
