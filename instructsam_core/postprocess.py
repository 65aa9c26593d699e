"""From per-slot predictions to instances: threshold, upsample, de-duplicate, box; label images.

Follows the released inference: a slot is kept when its score exceeds the threshold, its
mask logits are upsampled bilinearly (align_corners=False) to the image size and the
foreground is logit > 0. Slots whose mask comes out empty are dropped (the release keeps
them); optionally (`mask_nms_iou`, off by default as in the release), so are slots whose
masks repeat a better slot's mask.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .result import Result


def masks_to_boxes(masks: np.ndarray) -> np.ndarray:
    """`(N, 4)` int64 tight boxes `x1, y1, x2, y2` (inclusive max pixel) of `(N, H, W)` masks.

    An empty mask has no box: its row is `-1, -1, -1, -1`.
    """
    n = masks.shape[0]
    boxes = np.full((n, 4), -1, dtype=np.int64)
    if n == 0:
        return boxes
    rows = masks.any(axis=2)  # (N, H)
    cols = masks.any(axis=1)  # (N, W)
    nonempty = rows.any(axis=1)
    h, w = masks.shape[1:]
    boxes[nonempty, 0] = cols[nonempty].argmax(axis=1)
    boxes[nonempty, 1] = rows[nonempty].argmax(axis=1)
    boxes[nonempty, 2] = w - 1 - cols[nonempty][:, ::-1].argmax(axis=1)
    boxes[nonempty, 3] = h - 1 - rows[nonempty][:, ::-1].argmax(axis=1)
    return boxes


def label_image(masks: np.ndarray, dtype: type = np.uint16) -> np.ndarray:
    """`(H, W)` label image of `(N, H, W)` bool masks sorted best first: 0 = background,
    k = masks[k-1]. Where masks overlap the lower id (the higher score) wins, so the image
    is lossless exactly where instances do not overlap."""
    n, h, w = masks.shape
    if n > np.iinfo(dtype).max:
        raise ValueError(f"{n} instances do not fit a {np.dtype(dtype).name} label image")
    labels = np.zeros((h, w), dtype=dtype)
    for k in range(n - 1, -1, -1):  # paint worst first so the best ends on top
        labels[masks[k]] = k + 1
    return labels


def mask_iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """IoU of two `(H, W)` bool masks; 1.0 when both are empty (a correct "no target")."""
    if pred.shape != gt.shape:
        raise ValueError(f"mask shapes differ: {pred.shape} and {gt.shape}")
    union = int(np.logical_or(pred, gt).sum())
    return 1.0 if union == 0 else int(np.logical_and(pred, gt).sum()) / union


def _mask_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of one mask `(H*W,)` against many `(M, H*W)` (bool)."""
    inter = (a[None] & b).sum(dim=1).float()
    union = (a[None] | b).sum(dim=1).float()
    return inter / union.clamp(min=1)


def slots_to_result(
    mask_logits: torch.Tensor,
    scores: torch.Tensor,
    phrases: list[str],
    image_size: tuple[int, int],
    score_threshold: float,
    mask_nms_iou: float | None = None,
    max_instances: int | None = None,
) -> Result:
    """Turn P phrases x K slots into a `Result`.

    Arguments:
        mask_logits: `(P, K, h, w)` mask logits at SAM3's resolution.
        scores: `(P, K)` slot probabilities in [0, 1].
        phrases: the P phrase texts.
        image_size: `(H, W)` of the original image.
        score_threshold: keep slots with score strictly above this.
        mask_nms_iou: drop a slot whose mask IoU with a kept, better slot exceeds this
            (None or >= 1: off, the release's behaviour).
        max_instances: keep at most this many, best first (None: all).
    """
    P, K = scores.shape
    H, W = image_size
    flat_scores = scores.reshape(-1).float()
    keep = torch.nonzero(flat_scores > score_threshold).flatten()
    if keep.numel() == 0:
        return Result.empty((H, W))
    order = torch.argsort(flat_scores[keep], descending=True, stable=True)
    keep = keep[order]
    logits = mask_logits.reshape(P * K, *mask_logits.shape[-2:])[keep].float()
    masks = F.interpolate(logits[:, None], size=(H, W), mode="bilinear", align_corners=False)[:, 0] > 0
    flat = masks.reshape(masks.shape[0], -1)
    chosen: list[int] = []
    for i in range(flat.shape[0]):
        if not bool(flat[i].any()):
            continue  # an empty mask is no instance
        if chosen and mask_nms_iou is not None and mask_nms_iou < 1:
            if bool((_mask_iou(flat[i], flat[chosen]) > mask_nms_iou).any()):
                continue
        chosen.append(i)
        if max_instances is not None and len(chosen) >= max_instances:
            break
    if not chosen:
        return Result.empty((H, W))
    idx = torch.tensor(chosen, dtype=torch.long, device=keep.device)
    slot_ids = keep[idx].cpu().numpy()
    masks_np = masks[idx].cpu().numpy()
    return Result(
        masks=masks_np,
        scores=flat_scores[keep[idx]].cpu().numpy().astype(np.float32),
        boxes=masks_to_boxes(masks_np),
        phrases=[phrases[int(s) // K] for s in slot_ids],
        phrase_indices=(slot_ids // K).astype(np.int64),
        slots=(slot_ids % K).astype(np.int64),
        image_size=(H, W),
    )
