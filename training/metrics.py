"""Segmentation metrics shared by training and every benchmark.

One module, one set of conventions (REFERENCE.md, "Metric protocols"), so two runs of
any benchmark agree to 1e-9:

- Masks are boolean; any nonzero pixel is foreground.
- Mask IoU is ``I / (U + 1e-12)``. An IoU of exactly 0.5 with a union under 16,384
  pixels therefore lands just below 0.5; that is the protocol, kept on purpose.
- Boxes are tight boxes of masks with inclusive max pixel (``x2`` is the last foreground
  column); box IoU counts pixels (``width = x2 - x1 + 1``). An empty mask has no box and
  scores box IoU 0.
- P@t uses ``iou >= t``; box Acc@0.5 uses ``box_iou > 0.5`` (RefTR).
- Instance mAP (InstructSAM's protocol for Inst2Seg and gRefCOCO): all predicted
  instances of all queries are pooled and sorted by score (stable: ties keep input
  order); each takes the best still-unmatched GT instance of its own query (ties: lowest
  GT index) and is a TP if that IoU is ``>= t``; recall = cumTP / all GT instances;
  VOC all-point AP; mAP over ``np.linspace(0.5, 0.95, 10)``. A query without GT yields
  only false positives; with no GT at all AP is 0.
- ReasonSeg follows LISA, whose evaluation produced the paper's ReasonSeg numbers
  (`LISA_IOU`): per-sample IoU ``I / (U + 1e-5)``, 1.0 when both masks are empty, and
  cIoU ``sum I / (sum U + 1e-10)`` (0 when the summed union is 0). Every other benchmark
  uses `INSTRUCTSAM_IOU` (``I / (U + 1e-12)``; cIoU NaN when the summed union is 0).
- Averages over an empty set raise; N-acc/T-acc with a zero denominator are NaN.
- A failed sample (bad data, engine error) scores IoU 0 and is always wrong in the
  no-target confusion: a false negative when its GT is empty (against N-acc), a false
  positive when it has a target (against T-acc). ``empty_pred_rate`` is over the samples
  that ran (failures left out).

Everything here is streaming: accumulators take one sample at a time and keep only
per-sample numbers (and, for mAP, each query's small prediction x GT IoU matrix), never
the masks. Inputs may be numpy arrays or torch tensors; pairwise IoUs of torch tensors
are computed on the tensors' device.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np

from instructsam_core.postprocess import masks_to_boxes

EPS = 1e-12
"""Added to every mask/box IoU denominator (the RoboRefIt/InstructSAM convention)."""

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
"""IoU thresholds of the instance mAP (0.50:0.05:0.95)."""



@dataclass(frozen=True)
class IouFormula:
    """How a benchmark turns pixel counts into its per-sample IoU and its cIoU.

    Attributes:
        eps: added to the union of a per-sample IoU, ``I / (U + eps)``.
        both_empty: per-sample IoU when GT and prediction are both empty.
        ciou_eps: cIoU is ``sum I / (sum U + ciou_eps)``; None: NaN when ``sum U`` is 0.
    """

    eps: float = EPS
    both_empty: float = 0.0
    ciou_eps: float | None = None


INSTRUCTSAM_IOU = IouFormula()
"""RoboRefIt and InstructSAM's own evaluations: ``I / (U + 1e-12)``, 0 for two empty masks."""

GRES_IOU = IouFormula(both_empty=1.0)
"""Inst2Seg and gRefCOCO: ``I / (U + 1e-12)``, 1.0 when a no-target sample is answered empty."""

LISA_IOU = IouFormula(eps=1e-5, both_empty=1.0, ciou_eps=1e-10)
"""ReasonSeg, as LISA's evaluation computes it."""

PRECISION_THRESHOLDS = (0.5, 0.7, 0.9)
"""Thresholds of P@t (share of samples with IoU >= t)."""

BOX_ACC_THRESHOLD = 0.5
"""Box Acc counts samples with box IoU strictly above this (RefTR)."""


# --------------------------------------------------------------------------- helpers


def _is_torch(x: Any) -> bool:
    return type(x).__module__.split(".")[0] == "torch"


def as_bool_mask(mask: Any) -> np.ndarray:
    """A numpy bool array of `mask` (numpy or torch, any dtype): nonzero is foreground."""
    if _is_torch(mask):
        mask = mask.detach().cpu().numpy()
    arr = np.asarray(mask)
    return arr if arr.dtype == np.bool_ else arr != 0


def _mean(values: Sequence[float] | np.ndarray, what: str) -> float:
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        raise ValueError(f"cannot average {what} over zero samples")
    return float(arr.mean())


def _ratio_or_nan(num: float, den: float) -> float:
    return float(num) / float(den) if den else math.nan


# --------------------------------------------------------------------------- mask IoU


@dataclass(frozen=True)
class MaskOverlap:
    """Pixel counts of one prediction/GT pair and their IoU ``I / (U + 1e-12)``."""

    intersection: int
    union: int
    iou: float


def mask_iou(pred: Any, gt: Any, ignore: Any | None = None) -> MaskOverlap:
    """IoU of two `(H, W)` masks, ``I / (U + 1e-12)`` (0 when both are empty).

    Args:
        pred: predicted mask, numpy or torch; nonzero is foreground.
        gt: ground-truth mask of the same shape.
        ignore: optional `(H, W)` mask of pixels left out of both (LISA's GT value 255,
            or an official ``ignore_mask``).

    Raises:
        ValueError: the shapes differ.
    """
    p, g = as_bool_mask(pred), as_bool_mask(gt)
    if p.shape != g.shape:
        raise ValueError(f"prediction shape {p.shape} differs from GT shape {g.shape}")
    if ignore is not None:
        keep = ~as_bool_mask(ignore)
        if keep.shape != g.shape:
            raise ValueError(f"ignore mask shape {keep.shape} differs from GT shape {g.shape}")
        p, g = p & keep, g & keep
    inter = int(np.count_nonzero(p & g))
    union = int(np.count_nonzero(p | g))
    return MaskOverlap(inter, union, inter / (union + EPS))


def pairwise_mask_iou(preds: Any, gts: Any) -> np.ndarray:
    """`(P, G)` float64 IoUs ``I / (U + 1e-12)`` between `(P, H, W)` and `(G, H, W)` masks.

    Vectorised as one matrix product; torch inputs stay on their device (float64, exact
    pixel counts). Empty `P` or `G` gives an empty matrix.
    """
    if _is_torch(preds) or _is_torch(gts):
        import torch

        device = preds.device if _is_torch(preds) else gts.device
        p = torch.as_tensor(preds, device=device)
        g = torch.as_tensor(gts, device=device)
        if p.shape[1:] != g.shape[1:]:
            raise ValueError(f"prediction masks {tuple(p.shape)} and GT masks {tuple(g.shape)} differ in size")
        pf = (p != 0).reshape(p.shape[0], -1).to(torch.float64)  # (P, HW)
        gf = (g != 0).reshape(g.shape[0], -1).to(torch.float64)  # (G, HW)
        inter = pf @ gf.T  # (P, G)
        union = pf.sum(1)[:, None] + gf.sum(1)[None, :] - inter
        return (inter / (union + EPS)).cpu().numpy()
    p, g = as_bool_mask(preds), as_bool_mask(gts)
    if p.ndim != 3 or g.ndim != 3 or p.shape[1:] != g.shape[1:]:
        raise ValueError(f"expected (P, H, W) and (G, H, W) masks of one size, got {p.shape} and {g.shape}")
    pf = p.reshape(p.shape[0], -1).astype(np.float64)  # (P, HW)
    gf = g.reshape(g.shape[0], -1).astype(np.float64)  # (G, HW)
    inter = pf @ gf.T  # (P, G)
    union = pf.sum(1)[:, None] + gf.sum(1)[None, :] - inter
    return inter / (union + EPS)


# --------------------------------------------------------------------------- boxes


def mask_to_box(mask: Any) -> np.ndarray | None:
    """Tight box ``[x1, y1, x2, y2]`` (int64, inclusive max pixel) of a mask; None if empty."""
    box = masks_to_boxes(as_bool_mask(mask)[None])[0]
    return None if box[0] < 0 else box


def pairwise_box_iou(a: Any, b: Any) -> np.ndarray:
    """`(N, M)` IoUs of inclusive-pixel xyxy boxes (``width = x2 - x1 + 1``), ``/(U+1e-12)``."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    area_a = (a[:, 2] - a[:, 0] + 1) * (a[:, 3] - a[:, 1] + 1)
    area_b = (b[:, 2] - b[:, 0] + 1) * (b[:, 3] - b[:, 1] + 1)
    iw = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]) + 1
    ih = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]) + 1
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    union = area_a[:, None] + area_b[None, :] - inter
    return inter / (union + EPS)


def box_iou(a: Sequence[float] | np.ndarray | None, b: Sequence[float] | np.ndarray | None) -> float:
    """IoU of two inclusive-pixel xyxy boxes; 0 when either is None (an empty mask)."""
    if a is None or b is None:
        return 0.0
    return float(pairwise_box_iou(a, b)[0, 0])


# --------------------------------------------------------------------------- per-sample scores


@dataclass(frozen=True)
class SampleScores:
    """What one sample contributes to the referring-segmentation metrics.

    Attributes:
        iou: IoU of the predicted union mask with the GT union mask (0 for a failure).
        intersection, union: their pixel counts (for cIoU).
        box_iou: IoU of the predicted union mask's tight box with the GT box.
        gt_empty: the GT has no target (the no-target class of GRES).
        pred_empty: the prediction is empty ("no target" predicted). A failed sample
            carries True here (its empty prediction enters cIoU), but the accumulator
            never takes it for a "no target" answer.
        failed: the sample could not be evaluated (bad data or engine error): IoU 0,
            and wrong in the no-target confusion whatever its GT.
    """

    iou: float
    intersection: int
    union: int
    box_iou: float
    gt_empty: bool
    pred_empty: bool
    failed: bool = False

    def to_dict(self) -> dict:
        """Plain JSON-able fields."""
        return asdict(self)


def score_sample(
    pred_mask: Any,
    gt_mask: Any,
    *,
    gt_box: Sequence[float] | None = None,
    ignore: Any | None = None,
    formula: IouFormula = INSTRUCTSAM_IOU,
) -> SampleScores:
    """Score one predicted union mask against the GT union mask.

    Args:
        pred_mask: `(H, W)` predicted union mask.
        gt_mask: `(H, W)` GT union mask.
        gt_box: the dataset's GT box (inclusive-pixel xyxy) if it gives one; otherwise
            the GT mask's tight box is used.
        ignore: pixels left out of the mask IoU (not of the boxes).
        formula: the benchmark's IoU formula (its epsilon and its value for two empty
            masks: 0 for RoboRefIt, 1.0 for LISA/GRES/InstructSAM's Inst2Seg).
    """
    p, g = as_bool_mask(pred_mask), as_bool_mask(gt_mask)
    ov = mask_iou(p, g, ignore)
    iou = ov.intersection / (ov.union + formula.eps)
    if ov.union == 0:
        iou = float(formula.both_empty)
    gbox = np.asarray(gt_box, dtype=np.float64) if gt_box is not None else mask_to_box(g)
    biou = box_iou(mask_to_box(p), gbox)
    return SampleScores(
        iou=float(iou),
        intersection=ov.intersection,
        union=ov.union,
        box_iou=biou,
        gt_empty=not g.any(),
        pred_empty=not p.any(),
    )


def failed_sample(gt_area: int = 0, gt_empty: bool = False) -> SampleScores:
    """Scores of a failed sample: IoU 0, box IoU 0, empty prediction.

    `gt_area` (the GT pixels, when the GT could be read) enters the cIoU union, as the
    empty prediction it stands for would. `SegmentationAccumulator` counts it as wrong
    in the no-target confusion (FN if `gt_empty`, else FP) and leaves it out of
    ``empty_pred_rate``.
    """
    return SampleScores(
        iou=0.0, intersection=0, union=int(gt_area), box_iou=0.0,
        gt_empty=gt_empty, pred_empty=True, failed=True,
    )


class SegmentationAccumulator:
    """Streaming referring-segmentation metrics over samples (numbers only, no masks).

    Call `add` per sample (or `add_scores` with stored `SampleScores`), then `summary()`.
    """

    def __init__(self, formula: IouFormula = INSTRUCTSAM_IOU) -> None:
        self.formula = formula
        self._iou: list[float] = []
        self._box: list[float] = []
        self._inter = 0
        self._union = 0
        self._failures = 0
        # GRES no-target confusion: positive = GT has no target.
        self._tp = self._fn = self._tn = self._fp = 0
        self._pred_empty = 0  # among samples that ran (not failed)

    def __len__(self) -> int:
        return len(self._iou)

    def add(self, pred_mask: Any, gt_mask: Any, *, gt_box: Sequence[float] | None = None,
            ignore: Any | None = None) -> SampleScores:
        """Score one sample (see `score_sample`), accumulate it and return its scores."""
        s = score_sample(pred_mask, gt_mask, gt_box=gt_box, ignore=ignore,
                         formula=self.formula)
        self.add_scores(s)
        return s

    def add_scores(self, s: SampleScores) -> None:
        """Accumulate a sample scored earlier (e.g. read back from a per-sample log)."""
        self._iou.append(float(s.iou))
        self._box.append(float(s.box_iou))
        self._inter += int(s.intersection)
        self._union += int(s.union)
        self._failures += bool(s.failed)
        if s.failed:
            # a failure answered nothing: always wrong, never a "no target" hit
            if s.gt_empty:
                self._fn += 1
            else:
                self._fp += 1
            return
        self._pred_empty += bool(s.pred_empty)
        if s.gt_empty:
            if s.pred_empty:
                self._tp += 1
            else:
                self._fn += 1
        elif s.pred_empty:
            self._fp += 1
        else:
            self._tn += 1

    def _ciou(self) -> float:
        if self.formula.ciou_eps is None:
            return _ratio_or_nan(self._inter, self._union)
        return self._inter / (self._union + self.formula.ciou_eps)

    def summary(self) -> dict[str, float | int]:
        """Metrics over all samples added.

        Keys: ``n``, ``failures``, ``mean_iou`` (mIoU = gIoU), ``ciou`` (sum I / sum U,
        as the formula says; NaN if the summed union is 0 and it adds no epsilon), ``p@0.5``/``p@0.7``/``p@0.9``, ``box_acc@0.5``,
        ``box_miou``, ``empty_pred_rate`` (share of empty predictions among the samples
        that ran, failures left out; NaN if all failed), ``n_acc``, ``t_acc`` (NaN
        without no-target / target samples; a failure counts as wrong in both).

        Raises:
            ValueError: no sample was added.
        """
        iou = np.asarray(self._iou, dtype=np.float64)
        box = np.asarray(self._box, dtype=np.float64)
        out: dict[str, float | int] = {
            "n": int(iou.size),
            "failures": self._failures,
            "mean_iou": _mean(iou, "mask IoU"),
            "ciou": self._ciou(),
        }
        for t in PRECISION_THRESHOLDS:
            out[f"p@{t:g}"] = _mean(iou >= t, f"P@{t:g}")
        out[f"box_acc@{BOX_ACC_THRESHOLD:g}"] = _mean(box > BOX_ACC_THRESHOLD, "box accuracy")
        out["box_miou"] = _mean(box, "box IoU")
        out["empty_pred_rate"] = _ratio_or_nan(self._pred_empty, iou.size - self._failures)
        out["n_acc"] = _ratio_or_nan(self._tp, self._tp + self._fn)
        out["t_acc"] = _ratio_or_nan(self._tn, self._tn + self._fp)
        return out


# --------------------------------------------------------------------------- instance mAP


def voc_average_precision(recall: np.ndarray, precision: np.ndarray) -> float:
    """VOC all-point AP: area under the precision envelope, summed where recall changes."""
    mrec = np.concatenate(([0.0], np.asarray(recall, np.float64), [1.0]))
    mpre = np.concatenate(([0.0], np.asarray(precision, np.float64), [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    idx = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[idx + 1] - mrec[idx]) * mpre[idx + 1]))


def _ap_key(t: float) -> str:
    return f"AP@{t:.2f}"


class InstanceAPAccumulator:
    """Streaming instance mAP in InstructSAM's protocol (pooled over queries).

    Per query it keeps only the scores and the `(P, G)` IoU matrix of its predictions
    against its own GT instances; `compute()` pools, sorts and matches.
    """

    def __init__(self) -> None:
        self._scores: list[np.ndarray] = []
        self._ious: list[np.ndarray] = []

    def __len__(self) -> int:
        return len(self._scores)

    def add(self, pred_masks: Any, scores: Any, gt_masks: Any) -> np.ndarray:
        """Add one query: `(P, H, W)` predictions, `(P,)` scores, `(G, H, W)` GT instances.

        Returns the `(P, G)` IoU matrix (to log it, e.g. for a resumable run).
        """
        p, g = np.asarray(as_bool_mask(pred_masks)), np.asarray(as_bool_mask(gt_masks))
        if p.ndim != 3 or g.ndim != 3:
            raise ValueError(f"expected (P, H, W) and (G, H, W) masks, got {p.shape} and {g.shape}")
        if p.shape[0] and g.shape[0] and p.shape[1:] != g.shape[1:]:
            raise ValueError(f"prediction masks {p.shape} and GT masks {g.shape} differ in size")
        ious = pairwise_mask_iou(p, g) if p.shape[0] and g.shape[0] else np.zeros((p.shape[0], g.shape[0]))
        self.add_ious(scores, ious)
        return ious

    def add_ious(self, scores: Any, ious: Any) -> None:
        """Add one query from its `(P,)` scores and `(P, G)` IoU matrix."""
        s = np.asarray(scores.detach().cpu() if _is_torch(scores) else scores, dtype=np.float64).reshape(-1)
        m = np.asarray(ious, dtype=np.float64)
        if m.ndim != 2 or m.shape[0] != s.shape[0]:
            raise ValueError(f"IoU matrix {m.shape} does not match {s.shape[0]} scores")
        if not np.all(np.isfinite(s)):
            raise ValueError("prediction scores must be finite")
        self._scores.append(s)
        self._ious.append(m)

    def match(self, thresholds: Sequence[float] | np.ndarray = IOU_THRESHOLDS) -> tuple[np.ndarray, np.ndarray]:
        """Pool, sort and match all predictions.

        Returns:
            `(order, tp)`: `order` `(N,)` indices of the pooled predictions (queries in
            the order added, each query's predictions in its order) sorted by score,
            stable; `tp` `(T, N)` bool, True where the prediction at that rank is a
            true positive at threshold `t`.
        """
        thr = np.asarray(thresholds, dtype=np.float64).reshape(-1)
        n_t = thr.size
        if not self._scores:
            return np.zeros(0, dtype=np.int64), np.zeros((n_t, 0), dtype=bool)
        scores = np.concatenate(self._scores)
        query = np.concatenate([np.full(s.size, q, dtype=np.int64) for q, s in enumerate(self._scores)])
        row = np.concatenate([np.arange(s.size) for s in self._scores]).astype(np.int64)
        order = np.argsort(-scores, kind="stable")
        matched = [np.zeros((n_t, m.shape[1]), dtype=bool) for m in self._ious]
        tp = np.zeros((n_t, order.size), dtype=bool)
        t_idx = np.arange(n_t)
        for rank, k in enumerate(order):
            q = query[k]
            m = self._ious[q]
            if m.shape[1] == 0:
                continue  # a query without GT: a false positive at every threshold
            cand = np.where(matched[q], -np.inf, m[row[k]][None, :])  # (T, G)
            j = cand.argmax(axis=1)  # first maximum: lowest GT index on ties
            hit = cand[t_idx, j] >= thr
            tp[hit, rank] = True
            matched[q][t_idx[hit], j[hit]] = True
        return order, tp

    def compute(self, thresholds: Sequence[float] | np.ndarray = IOU_THRESHOLDS) -> dict[str, float | int]:
        """AP at each threshold (keys ``AP@0.50``...), ``mAP``, ``AP50``, ``AP75``, counts.

        Raises:
            ValueError: no query was added.
        """
        if not self._scores:
            raise ValueError("cannot compute mAP over zero queries")
        thr = np.asarray(thresholds, dtype=np.float64).reshape(-1)
        total_gt = int(sum(m.shape[1] for m in self._ious))
        order, tp = self.match(thr)

        out: dict[str, float | int] = {}
        aps = []
        n_seen = np.arange(1, order.size + 1, dtype=np.float64)
        for i, t in enumerate(thr):
            if total_gt == 0:
                ap = 0.0
            else:
                ctp = np.cumsum(tp[i], dtype=np.float64)
                ap = voc_average_precision(ctp / total_gt, ctp / np.maximum(n_seen, EPS))
            out[_ap_key(t)] = ap
            aps.append(ap)
        out["mAP"] = float(np.mean(aps))
        for name, t in (("AP50", 0.5), ("AP75", 0.75)):
            hits = np.flatnonzero(np.isclose(thr, t))
            if hits.size:
                out[name] = aps[int(hits[0])]
        out["num_queries"] = len(self._scores)
        out["num_gt"] = total_gt
        out["num_pred"] = int(order.size)
        return out


__all__ = [
    "BOX_ACC_THRESHOLD", "EPS", "IOU_THRESHOLDS", "PRECISION_THRESHOLDS",
    "InstanceAPAccumulator", "MaskOverlap", "SampleScores", "SegmentationAccumulator",
    "as_bool_mask", "box_iou", "failed_sample", "mask_iou", "mask_to_box",
    "pairwise_box_iou", "pairwise_mask_iou", "score_sample", "voc_average_precision",
]
