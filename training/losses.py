"""InstructSAM's losses: Hungarian matching of the K slots to a phrase's instances, BCE and
Dice on sampled points of the matched masks, slot-score BCE, and the text loss.

What the release computes (its assigner, point sampler and loss modules), written anew:

- matching cost per (slot, instance): `match_bce` x mean pixel BCE + `match_dice` x
  (1 - (2 I + 1e-3) / (sum p + sum g + 1e-3)) on sigmoid masks + `match_score` x
  softplus(-slot logit), solved with scipy's `linear_sum_assignment`;
- matched masks: BCE and Dice (eps 1.0) on `num_points` points, 3/4 of them the most
  uncertain of 3x as many random ones (|logit| smallest), 1/4 uniform;
- slot scores: BCE against max(dice(sigmoid mask, instance), 0.1) for matched slots and 0
  for the others (all 0 for a phrase with no instance);
- averages: mask terms over all matched slots of the batch, the score term over phrases.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment


def dice_cost(pred_probs: torch.Tensor, gt: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """`(K, N)` 1 - naive Dice between `(K, HW)` probabilities and `(N, HW)` binary masks."""
    numerator = 2 * pred_probs @ gt.T
    denominator = pred_probs.sum(-1)[:, None] + gt.sum(-1)[None, :]
    return 1 - (numerator + eps) / (denominator + eps)


def bce_cost(pred_logits: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """`(K, N)` mean pixel BCE of `(K, HW)` logits against each of `(N, HW)` masks."""
    pos = F.binary_cross_entropy_with_logits(pred_logits, torch.ones_like(pred_logits), reduction="none")
    neg = F.binary_cross_entropy_with_logits(pred_logits, torch.zeros_like(pred_logits), reduction="none")
    return (pos @ gt.T + neg @ (1 - gt).T) / pred_logits.shape[1]


@torch.no_grad()
def match_slots(mask_logits: torch.Tensor, slot_logits: torch.Tensor, gt: torch.Tensor,
                weights: tuple[float, float, float] = (2.0, 0.5, 1.0)) -> tuple[np.ndarray, np.ndarray]:
    """Hungarian matching of K slots to N instances.

    Arguments:
        mask_logits: `(K, h, w)` predicted mask logits.
        slot_logits: `(K,)` slot score logits.
        gt: `(N, h, w)` instance masks (0/1) at the same resolution.
        weights: (bce, dice, score) cost weights.

    Returns `(slot_indices, instance_indices)`, min(K, N) pairs.
    """
    k, n = mask_logits.shape[0], gt.shape[0]
    if n == 0 or k == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    logits = mask_logits.reshape(k, -1).float()
    target = gt.reshape(n, -1).float()
    w_bce, w_dice, w_score = weights
    cost = (w_bce * bce_cost(logits, target) + w_dice * dice_cost(logits.sigmoid(), target)
            + w_score * F.softplus(-slot_logits.float())[:, None].expand(k, n))
    rows, cols = linear_sum_assignment(cost.cpu().numpy())
    return rows.astype(np.int64), cols.astype(np.int64)


def point_sample(maps: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Values of `(M, 1, h, w)` maps at `(M, P, 2)` points in [0, 1]^2 (x, y): `(M, P)`,
    bilinear (align_corners=False)."""
    grid = (2 * points - 1).unsqueeze(2)  # (M, P, 1, 2) in [-1, 1]
    return F.grid_sample(maps, grid, align_corners=False)[:, 0, :, 0]


@torch.no_grad()
def uncertain_points(mask_logits: torch.Tensor, num_points: int, oversample_ratio: float,
                     importance_sample_ratio: float) -> torch.Tensor:
    """`(M, num_points, 2)` points: the most uncertain (|logit| smallest) of
    `oversample_ratio x num_points` uniform ones, the rest uniform."""
    m = mask_logits.shape[0]
    candidates = torch.rand(m, int(num_points * oversample_ratio), 2, device=mask_logits.device)
    uncertainty = -point_sample(mask_logits, candidates).abs()
    n_uncertain = int(importance_sample_ratio * num_points)
    chosen = uncertainty.topk(n_uncertain, dim=1).indices
    points = torch.gather(candidates, 1, chosen[..., None].expand(-1, -1, 2))
    random = torch.rand(m, num_points - n_uncertain, 2, device=mask_logits.device)
    return torch.cat([points, random], dim=1)


def point_mask_losses(mask_logits: torch.Tensor, gt: torch.Tensor, points: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pair, BCE and Dice (eps 1.0) at `(M, P, 2)` points of `(M, h, w)` matched
    logits and `(M, h, w)` masks: two `(M,)` tensors. Points within half a pixel of the
    border read zeros beyond it (grid_sample's zero padding, as the release samples)."""
    logits = mask_logits.float()[:, None]
    pred = point_sample(logits, points)  # (M, P)
    with torch.no_grad():
        target = point_sample(gt.float()[:, None], points)
    bce = F.binary_cross_entropy_with_logits(pred, target, reduction="none").mean(dim=1)
    probs = pred.sigmoid()
    dice = 1 - (2 * (probs * target).sum(1) + 1.0) / (probs.sum(1) + target.sum(1) + 1.0)
    return bce, dice


@torch.no_grad()
def dice_score(probs: torch.Tensor, gt: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """`(M,)` soft Dice of `(M, h, w)` probabilities with `(M, h, w)` masks (score targets)."""
    probs, gt = probs.flatten(1).float(), gt.flatten(1).float()
    return (2 * (probs * gt).sum(1) + eps) / (probs.sum(1) + gt.sum(1) + eps)


@dataclass
class MaskLosses:
    """The mask and score losses of a batch of phrases (unweighted means) and the IoU of
    each matched slot's mask (`logit > 0`) with its instance, for logs and evaluation."""

    bce: torch.Tensor
    dice: torch.Tensor
    score: torch.Tensor
    matched_ious: list[float]


def mask_losses(mask_logits: torch.Tensor, slot_logits: torch.Tensor, targets: list[torch.Tensor],
                match_weights: tuple[float, float, float], num_points: int, oversample_ratio: float,
                importance_sample_ratio: float) -> MaskLosses:
    """Match each phrase's slots to its instances, then the release's losses.

    Arguments:
        mask_logits: `(P, K, h, w)` mask logits of P phrases.
        slot_logits: `(P, K)` slot score logits.
        targets: per phrase, `(N_p, h, w)` instance masks (N_p = 0: no target).
    """
    if len(targets) != mask_logits.shape[0]:
        raise ValueError(f"{mask_logits.shape[0]} query blocks but {len(targets)} phrase targets")
    matched_logits, matched_gt, score_loss = [], [], []
    for p, gt in enumerate(targets):
        gt = gt.to(mask_logits.device)
        if gt.shape[-2:] != mask_logits.shape[-2:]:
            raise ValueError(f"targets are {tuple(gt.shape[-2:])}, masks {tuple(mask_logits.shape[-2:])}: "
                             "set data.mask_size to the model's mask resolution")
        rows, cols = match_slots(mask_logits[p], slot_logits[p], gt, match_weights)
        score_target = torch.zeros_like(slot_logits[p], dtype=torch.float32)
        if len(rows):
            rows_t = torch.as_tensor(rows, device=mask_logits.device)
            cols_t = torch.as_tensor(cols, device=mask_logits.device)
            quality = dice_score(mask_logits[p, rows_t].sigmoid(), gt[cols_t])
            score_target[rows_t] = quality.clamp(min=0.1)
            matched_logits.append(mask_logits[p, rows_t])
            matched_gt.append(gt[cols_t])
        score_loss.append(F.binary_cross_entropy_with_logits(slot_logits[p].float(), score_target))
    zero = mask_logits.sum() * 0.0  # keeps the graph when nothing matched
    if matched_logits:
        logits, gt = torch.cat(matched_logits), torch.cat(matched_gt)
        points = uncertain_points(logits.float()[:, None], num_points, oversample_ratio, importance_sample_ratio)
        bce, dice = point_mask_losses(logits, gt, points)
        with torch.no_grad():
            pred = logits > 0
            inter = (pred & gt.bool()).flatten(1).sum(1).float()
            union = (pred | gt.bool()).flatten(1).sum(1).float()
            ious = (inter / union.clamp(min=1)).tolist()
        bce, dice = bce.mean(), dice.mean()
    else:
        bce, dice, ious = zero, zero, []
    score = torch.stack(score_loss).mean() if score_loss else zero
    return MaskLosses(bce=bce, dice=dice, score=score, matched_ious=ious)


def text_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over labelled positions: `logits (B, L, V)` predict
    `labels (B, L)` one position later (-100: not a target)."""
    shifted = labels[:, 1:]
    if not bool((shifted != -100).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), shifted.reshape(-1),
                           ignore_index=-100)
