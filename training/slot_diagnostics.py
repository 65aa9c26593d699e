"""What a model's slots propose and whether its scores pick the right proposals.

`tabletop.evaluate` scores what the engine returns at its threshold. When those scores
are poor it cannot say why: are the slots' masks bad, or are good masks kept and scored
no better than masks of other objects? This report runs every instruction of a split
with no score threshold (every slot the mask NMS keeps) and measures the two apart:

- **proposals**: per ground-truth instance, the best IoU any kept mask reaches
  (`instance_best_iou`, and the share of instances found at IoU >= 0.5 and >= 0.75).
  A collapsed model (every slot one union mask) keeps one mask and finds few instances.
- **scores**: a kept mask is *on target* when at least half its pixels lie inside the
  instruction's target union. `score_auc` is the probability that an on-target mask
  outscores an off-target one of the same sample (the AUC within each sample that has
  both, averaged over those samples: 0.5 = the scores ignore the phrase, 1 = they
  separate perfectly). `top1_on_target` is the share of samples with a target whose
  best-scoring mask is on target.

    python -m training.slot_diagnostics MODEL_DIR runs/default_model/full/data/heldout.json

prints one row per instruction kind and writes `--json` if given (null where a kind
has nothing to measure, e.g. no target).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from training.metrics import pairwise_mask_iou
from training.split_report_cli import run_split_report

ON_TARGET_SHARE = 0.5  # a kept mask with at least this share of its pixels inside the target union


def within_sample_auc(on_target_scores: Sequence[float], off_target_scores: Sequence[float]) -> float:
    """P(an on-target score > an off-target score), ties counted half; nan without both."""
    pos = np.asarray(on_target_scores, dtype=np.float64)
    neg = np.asarray(off_target_scores, dtype=np.float64)
    if pos.size == 0 or neg.size == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (pos.size * neg.size))


def sample_diagnostics(masks: np.ndarray, scores: np.ndarray, gt_instances: np.ndarray) -> dict[str, Any]:
    """One sample's proposal and score figures.

    Arguments:
        masks: `(P, H, W)` bool, the kept masks (no score threshold), any order.
        scores: `(P,)` their scores.
        gt_instances: `(G, H, W)` bool target instances (G = 0 for "no target").

    Returns a dict: `instance_best_iou` (G floats), `on_target` (P bools), `auc` (nan
    unless the sample has on- and off-target masks), `top1_on_target` (None without a
    target or without masks), `kept` (P).
    """
    masks = np.asarray(masks, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    gt_instances = np.asarray(gt_instances, dtype=bool)
    if masks.ndim != 3 or scores.shape != (masks.shape[0],):
        raise ValueError(f"expected (P, H, W) masks and (P,) scores, got {masks.shape} and {scores.shape}")
    kept = masks.shape[0]
    if gt_instances.shape[0] and kept:
        best = pairwise_mask_iou(masks, gt_instances).max(0)
    else:
        best = np.zeros(gt_instances.shape[0])
    union = gt_instances.any(0) if gt_instances.shape[0] else np.zeros(masks.shape[1:], dtype=bool)
    pixels = int(np.prod(masks.shape[1:]))  # explicit: numpy cannot infer -1 for zero masks
    areas = masks.reshape(kept, pixels).sum(1)
    inside = (masks & union).reshape(kept, pixels).sum(1)
    on_target = inside >= ON_TARGET_SHARE * np.maximum(areas, 1)
    top1 = None
    if gt_instances.shape[0] and kept:
        top1 = bool(on_target[int(np.argmax(scores))])
    return {"instance_best_iou": [float(x) for x in best], "on_target": [bool(x) for x in on_target],
            "auc": within_sample_auc(scores[on_target], scores[~on_target]), "top1_on_target": top1,
            "kept": kept}


def summarise(per_sample: Sequence[dict[str, Any]]) -> dict[str, float | int]:
    """Pool `sample_diagnostics` results (e.g. of one instruction kind) into one row."""
    best = np.array([x for s in per_sample for x in s["instance_best_iou"]], dtype=np.float64)
    aucs = np.array([s["auc"] for s in per_sample if not np.isnan(s["auc"])], dtype=np.float64)
    top1 = [s["top1_on_target"] for s in per_sample if s["top1_on_target"] is not None]
    nan = float("nan")
    return {
        "n": len(per_sample),
        "kept": float(np.mean([s["kept"] for s in per_sample])) if per_sample else nan,
        "instance_best_iou": float(best.mean()) if best.size else nan,
        "found_50": float((best >= 0.5).mean()) if best.size else nan,
        "found_75": float((best >= 0.75).mean()) if best.size else nan,
        "score_auc": float(aucs.mean()) if aucs.size else nan,
        "auc_samples": int(aucs.size),
        "top1_on_target": float(np.mean(top1)) if top1 else nan,
    }


def slot_report(segmenter, split_file: Path, limit: int | None = None, progress: bool = False) -> dict:
    """`summarise` per instruction kind and over all kinds, for a split `tabletop` wrote.

    Runs `segmenter` at score threshold 0 (its mask NMS still applies, so near-equal
    slots count once).
    """
    from tqdm import tqdm

    from instructsam_core.processing import load_rgb
    from training.tabletop import split_samples

    split_file = Path(split_file)
    by_kind: dict[str, list[dict]] = defaultdict(list)
    for sample, kind in tqdm(split_samples(split_file, limit), desc=f"slots {split_file.stem}", disable=not progress):
        gt = sample.load_gt()
        result = segmenter.segment_image(load_rgb(sample.image), sample.instruction, key=str(sample.image),
                                         score_threshold=0.0)
        by_kind[kind].append(sample_diagnostics(result.masks, result.scores, gt.instances))
    report = {kind: summarise(rows) for kind, rows in by_kind.items()}
    report["all"] = summarise([row for rows in by_kind.values() for row in rows])
    return report


def format_report(report: dict) -> str:
    """A plain-text table of `slot_report`'s rows."""
    cols = ("n", "kept", "instance_best_iou", "found_50", "found_75", "score_auc", "top1_on_target")
    lines = ["kind          " + "  ".join(f"{c:>17s}" for c in cols)]
    for kind, row in report.items():
        cells = [f"{row[c]:17d}" if isinstance(row[c], int) else f"{row[c]:17.3f}" for c in cols]
        lines.append(f"{kind:13s} " + "  ".join(cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return run_split_report(argv, "python -m training.slot_diagnostics", __doc__, slot_report, format_report)


if __name__ == "__main__":
    raise SystemExit(main())
