"""InstructSAM's losses: Hungarian matching of the K slots to a phrase's instances, BCE and
Dice on sampled points of the matched masks, slot-score BCE, and the text loss.

What the release computes (its assigner, point sampler and loss modules), written anew:

- matching cost per (slot, instance): `match_bce` x mean pixel BCE + `match_dice` x
  (1 - (2 I + 1e-3) / (sum p + sum g + 1e-3)) on sigmoid masks + `match_score` x
  softplus(-slot logit), solved with scipy's `linear_sum_assignment`;
- matched masks: BCE and Dice (eps 1.0) on `num_points` points, 3/4 of them the most
  uncertain of 3x as many random ones (|logit| smallest), 1/4 uniform;
- slot scores: BCE against max(dice(sigmoid mask, instance), 0.1) for matched slots and 0
  for the others (all 0 for a phrase with no instance); optionally 1 for matched slots
  (`score_target="one"`, DETR's class target: a matched slot's score does not wait for
  its mask to be good, which matters for a head trained from random weights); or, for every
  slot, matched or not, the best Dice of its mask with any of the phrase's instances
  (`score_target="quality"`, a mask-quality score like SAM's IoU prediction: slots that
  predict the same good mask all score high, and the engine's `mask_nms_iou` keeps one;
  a head trained from random weights whose slots have not come apart still learns to
  score its answer);
- averages: mask terms over all matched slots of the batch, the score term over phrases.

Optionally (off in the release's recipe, whose SAM3 starts pretrained), DETR's box terms:
L1 and generalized IoU between every decoder layer's boxes and the boxes of the matched
instances' masks, in the loss and in the matching cost. A SAM3 head trained from random
weights needs them: its box head otherwise never learns, and the boxes steer the decoder's
attention (SAM3's box relative position bias) to random places. Likewise optional, SAM3's
semantic head: BCE and Dice of one mask of everything a phrase names (the union of its
instances), a dense signal every pixel of every sample gives, independent of matching.
And a slot-spread term (`slot_spread_loss`): the different slots' query states held
apart after every decoder layer, against the collapse of all slots into one answer. And an
unmatched-slot term (`MaskLosses.unmatched`): the matching gives each instance one slot and
the rest only a score target of 0, so nothing moves their masks; a slot model warm-started
from a union-mask model keeps every slot on the phrase's region, and its scores cannot rank
slots that all draw the same mask. The term pushes the unmatched slots' masks off the
phrase's instances (BCE against 0 on the instances' pixels).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment


SCORE_TARGETS = ("dice", "one", "quality")


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


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """`(N, 4)` xyxy boxes of `(N, h, w)` masks, normalised to [0, 1] (x2 = one past the
    last column / w), as the decoder predicts them; an empty mask gives a zero box."""
    n, h, w = masks.shape
    if n == 0:
        return torch.zeros(0, 4, device=masks.device)
    cols, rows = masks.bool().any(1), masks.bool().any(2)  # (N, w), (N, h)
    x = torch.arange(w, device=masks.device)
    y = torch.arange(h, device=masks.device)
    big = max(h, w)
    x1 = torch.where(cols, x, big).amin(1).clamp(max=w)
    x2 = torch.where(cols, x + 1, 0).amax(1)
    y1 = torch.where(rows, y, big).amin(1).clamp(max=h)
    y2 = torch.where(rows, y + 1, 0).amax(1)
    boxes = torch.stack([x1 / w, y1 / h, x2 / w, y2 / h], dim=1).float()
    return torch.where(x2[:, None] > 0, boxes, torch.zeros_like(boxes))


def generalized_box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`(M, N)` generalized IoU of xyxy boxes `(M, 4)` and `(N, 4)` (degenerate boxes allowed)."""
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    lt, rb = torch.max(a[:, None, :2], b[None, :, :2]), torch.min(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = area_a[:, None] + area_b[None, :] - inter
    iou = inter / union.clamp(min=1e-7)
    hull = (torch.max(a[:, None, 2:], b[None, :, 2:]) - torch.min(a[:, None, :2], b[None, :, :2])).clamp(min=0).prod(-1)
    return iou - (hull - union) / hull.clamp(min=1e-7)


@torch.no_grad()
def match_slots(mask_logits: torch.Tensor, slot_logits: torch.Tensor, gt: torch.Tensor,
                weights: tuple[float, float, float] = (2.0, 0.5, 1.0), boxes: torch.Tensor | None = None,
                box_weights: tuple[float, float] = (0.0, 0.0)) -> tuple[np.ndarray, np.ndarray]:
    """Hungarian matching of K slots to N instances.

    Arguments:
        mask_logits: `(K, h, w)` predicted mask logits.
        slot_logits: `(K,)` slot score logits.
        gt: `(N, h, w)` instance masks (0/1) at the same resolution.
        weights: (bce, dice, score) cost weights.
        boxes: `(K, 4)` predicted xyxy boxes, for the box cost terms.
        box_weights: (L1, 1 - generalized IoU) cost weights against the masks' boxes.

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
    if boxes is not None and any(box_weights):
        gt_boxes, pred = mask_boxes(gt), boxes.float()
        cost = cost + box_weights[0] * torch.cdist(pred, gt_boxes, p=1)
        cost = cost + box_weights[1] * (1 - generalized_box_iou(pred, gt_boxes))
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


@torch.no_grad()
def best_dice(probs: torch.Tensor, gt: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """`(K,)` each of `(K, h, w)` probability maps' best soft Dice with any of `(N, h, w)` masks."""
    probs, gt = probs.flatten(1).float(), gt.flatten(1).float()
    inter = probs @ gt.T  # (K, N)
    dice = (2 * inter + eps) / (probs.sum(1)[:, None] + gt.sum(1)[None] + eps)
    return dice.max(1).values


@dataclass
class MaskLosses:
    """The mask, score and box losses of a batch of phrases (unweighted means) and the IoU
    of each matched slot's mask (`logit > 0`) with its instance, for logs and evaluation.
    The box terms are zero unless boxes were given. `unmatched`: `unmatched_bce` averaged
    over the phrases that have instances and unmatched slots."""

    bce: torch.Tensor
    dice: torch.Tensor
    score: torch.Tensor
    matched_ious: list[float]
    box_l1: torch.Tensor | None = None
    box_giou: torch.Tensor | None = None
    unmatched: torch.Tensor | None = None


def unmatched_bce(slot_mask_logits: torch.Tensor, unmatched: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Mean BCE against 0 of the `unmatched` slots' `(K, h, w)` mask logits on the pixels
    of the phrase's `(N, h, w)` instances: 0 when those slots leave every instance alone.

    BCE rather than the sigmoid's mean: a slot that confidently draws the target (a large
    logit) still gets a gradient of about 1 per pixel, not a vanishing one.
    """
    union = gt.any(0)
    if not bool(unmatched.any()) or not bool(union.any()):
        return slot_mask_logits.sum() * 0.0
    on_target = slot_mask_logits[unmatched][:, union].float()  # (U, pixels of the instances)
    return F.softplus(on_target).mean()


def mask_losses(mask_logits: torch.Tensor, slot_logits: torch.Tensor, targets: list[torch.Tensor],
                match_weights: tuple[float, float, float], num_points: int, oversample_ratio: float,
                importance_sample_ratio: float, layer_boxes: torch.Tensor | None = None,
                box_match_weights: tuple[float, float] = (0.0, 0.0), score_target: str = "dice") -> MaskLosses:
    """Match each phrase's slots to its instances, then the release's losses.

    Arguments:
        mask_logits: `(P, K, h, w)` mask logits of P phrases.
        slot_logits: `(P, K)` slot score logits.
        targets: per phrase, `(N_p, h, w)` instance masks (N_p = 0: no target).
        layer_boxes: `(P, L, K, 4)` every decoder layer's xyxy boxes, or None: with them,
            the box L1 and generalized-IoU losses (the mean over layers of each layer's
            mean over matched slots; L1 summed over the 4 coordinates, as DETR).
        box_match_weights: (L1, GIoU) matching cost weights on the last layer's boxes.
        score_target: what the slot scores learn: "dice" (the release: a matched slot's
            max(Dice of its mask, 0.1), 0 for the others), "one" (DETR's class target: 1
            for a matched slot) or "quality" (every slot: its mask's best Dice with any
            instance).
    """
    if score_target not in SCORE_TARGETS:
        raise ValueError(f"score_target must be one of {SCORE_TARGETS}, got {score_target!r}")
    if len(targets) != mask_logits.shape[0]:
        raise ValueError(f"{mask_logits.shape[0]} query blocks but {len(targets)} phrase targets")
    matched_logits, matched_gt, score_loss, matched_boxes, matched_gt_boxes = [], [], [], [], []
    unmatched_loss = []
    for p, gt in enumerate(targets):
        gt = gt.to(mask_logits.device)
        if gt.shape[-2:] != mask_logits.shape[-2:]:
            raise ValueError(f"targets are {tuple(gt.shape[-2:])}, masks {tuple(mask_logits.shape[-2:])}: "
                             "set data.mask_size to the model's mask resolution")
        last_boxes = layer_boxes[p, -1] if layer_boxes is not None else None
        rows, cols = match_slots(mask_logits[p], slot_logits[p], gt, match_weights, last_boxes, box_match_weights)
        targets_p = torch.zeros_like(slot_logits[p], dtype=torch.float32)
        if len(rows):
            rows_t = torch.as_tensor(rows, device=mask_logits.device)
            cols_t = torch.as_tensor(cols, device=mask_logits.device)
            quality = dice_score(mask_logits[p, rows_t].sigmoid(), gt[cols_t])
            targets_p[rows_t] = quality.clamp(min=0.1) if score_target == "dice" else 1.0
            matched_logits.append(mask_logits[p, rows_t])
            matched_gt.append(gt[cols_t])
            if layer_boxes is not None:
                matched_boxes.append(layer_boxes[p][:, rows_t])  # (L, M, 4)
                matched_gt_boxes.append(mask_boxes(gt[cols_t]))
            unmatched = torch.ones(slot_logits.shape[1], dtype=torch.bool, device=mask_logits.device)
            unmatched[rows_t] = False
            if bool(unmatched.any()):
                unmatched_loss.append(unmatched_bce(mask_logits[p], unmatched, gt))
        if score_target == "quality" and len(gt):
            targets_p = best_dice(mask_logits[p].sigmoid(), gt)
        score_loss.append(F.binary_cross_entropy_with_logits(slot_logits[p].float(), targets_p))
    zero = mask_logits.sum() * 0.0  # keeps the graph when nothing matched
    box_l1 = box_giou = zero
    if matched_boxes:
        pred = torch.cat(matched_boxes, dim=1).float()  # (L, M, 4)
        target = torch.cat(matched_gt_boxes)  # (M, 4)
        box_l1 = (pred - target).abs().sum(-1).mean()
        giou = torch.stack([generalized_box_iou(layer, target).diagonal() for layer in pred])
        box_giou = (1 - giou).mean()
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
    unmatched = torch.stack(unmatched_loss).mean() if unmatched_loss else zero
    return MaskLosses(bce=bce, dice=dice, score=score, matched_ious=ious, box_l1=box_l1, box_giou=box_giou,
                      unmatched=unmatched)


def semantic_losses(semantic_logits: torch.Tensor, targets: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean BCE and Dice (eps 1.0) of `(P, h, w)` semantic logits against the union of
    each phrase's `(N_p, h, w)` instances (empty for no target)."""
    if len(targets) != semantic_logits.shape[0]:
        raise ValueError(f"{semantic_logits.shape[0]} query blocks but {len(targets)} phrase targets")
    union = torch.stack([t.to(semantic_logits.device).any(0) if len(t) else
                         torch.zeros(semantic_logits.shape[1:], dtype=torch.bool, device=semantic_logits.device)
                         for t in targets]).float()
    logits = semantic_logits.float().flatten(1)
    union = union.flatten(1)
    bce = F.binary_cross_entropy_with_logits(logits, union)
    probs = logits.sigmoid()
    dice = 1 - (2 * (probs * union).sum(1) + 1.0) / (probs.sum(1) + union.sum(1) + 1.0)
    return bce, dice.mean()


def slot_spread_loss(layer_states: torch.Tensor) -> torch.Tensor:
    """Mean squared cosine similarity of different slots' query states, over every decoder
    layer and phrase, from `(P, L, K, D)` states (`HeadOutput.layer_states`).

    1 when the K slots of a phrase all hold one state (the collapse docs/training.md
    describes), about 1/D for unrelated states: a weight on it makes each slot's own
    content outlast every decoder layer, so the matching has different slots to tell apart.
    """
    k = layer_states.shape[-2]
    if k < 2 or layer_states.shape[0] == 0:
        return layer_states.sum() * 0.0
    unit = F.normalize(layer_states.float(), dim=-1)
    cosine = unit @ unit.transpose(-1, -2)  # (P, L, K, K)
    different = ~torch.eye(k, dtype=torch.bool, device=cosine.device)
    return cosine[..., different].pow(2).mean()


def text_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over labelled positions: `logits (B, L, V)` predict
    `labels (B, L)` one position later (-100: not a target)."""
    shifted = labels[:, 1:]
    if not bool((shifted != -100).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), shifted.reshape(-1),
                           ignore_index=-100)
