"""Denoising queries (DN-DETR's idea, for a SAM3 head trained from random weights).

Trained from scratch, the DETR decoder falls into a symmetric fixed point: while the
Hungarian matching pairs slots with instances almost at random, the best any slot can do
is the union of the phrase's instances, so the decoder learns to overwrite what tells
its K slots apart (their contents from the LLM, their reference boxes), and every slot
predicts the same mask with the same score from then on (docs/training.md, "The default
model"). Denoising queries give the decoder a task it cannot solve that way: each starts
from a noised box of one ground-truth instance and must return that instance's mask and
box, with no matching. To solve it the decoder has to use a slot's reference box (its
position query and the box bias of its image attention), which is what the matched slots
need to come apart.

One extra head pass per phrase with instances, in training only: the queries' contents
are the phrase's own slot states (instance i takes slot i mod K's), their reference boxes
the instances' boxes with DN-DETR's noise (centre moved by up to `noise` / 2 of the box
size, width and height scaled by up to 1 +- `noise`). Nothing changes at inference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from instructsam_core.model.instructsam import InstructSam, InstructSamOutput, SamFeatures
from training.losses import generalized_box_iou, mask_boxes, point_mask_losses, uncertain_points


@dataclass
class DenoisingLosses:
    """The denoising queries' mask (BCE, Dice) and box (L1, GIoU; mean over layers) losses."""

    bce: torch.Tensor
    dice: torch.Tensor
    box_l1: torch.Tensor
    box_giou: torch.Tensor


def xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], dim=-1)


def noised_boxes(boxes: torch.Tensor, noise: float) -> torch.Tensor:
    """`(N, 4)` cxcywh boxes in (0, 1) moved and rescaled at random (DN-DETR's box noise),
    from torch's global generator (saved in training checkpoints, so a resume repeats it)."""
    centre, size = boxes[:, :2], boxes[:, 2:]
    shift = (torch.rand_like(centre) * 2 - 1) * noise * size / 2
    scale = 1 + (torch.rand_like(size) * 2 - 1) * noise
    out = torch.cat([centre + shift, size * scale], dim=1)
    return out.clamp(1e-3, 1 - 1e-3)


def denoising_losses(model: InstructSam, out: InstructSamOutput, input_ids: torch.Tensor, sam: SamFeatures,
                     targets: list[torch.Tensor], noise: float, num_points: int, oversample_ratio: float,
                     importance_sample_ratio: float) -> DenoisingLosses:
    """Run the denoising queries of every phrase with instances and their losses.

    Arguments:
        model, out, input_ids, sam: the teacher-forced pass (`out.blocks`, its hidden states)
            and the SAM3 features it used.
        targets: per block, its instance masks `(N, h, w)` at the head's mask size.
        noise: DN-DETR's box noise scale (0.4 in its paper).
        num_points, oversample_ratio, importance_sample_ratio: the mask losses' point
            sampling, as for the matched slots.
    """
    zero = out.head.mask_logits.sum() * 0.0
    keep = [p for p, gt in enumerate(targets) if len(gt)]
    if not keep:
        return DenoisingLosses(zero, zero, zero, zero)
    device = out.head.mask_logits.device
    keep_t = torch.as_tensor(keep, device=device)
    query_states, prompt = model.block_head_inputs(input_ids, out.extras["hidden_states"], out.blocks)
    query_states, prompt = query_states[keep_t], prompt[keep_t]
    k = query_states.shape[1]
    n_max = max(len(targets[p]) for p in keep)
    contents = query_states[:, torch.arange(n_max, device=device) % k]  # (P, n_max, H)
    gt_boxes = torch.zeros(len(keep), n_max, 4, device=device)  # xyxy in [0, 1]
    valid = torch.zeros(len(keep), n_max, dtype=torch.bool, device=device)
    for row, p in enumerate(keep):
        gt_boxes[row, :len(targets[p])] = mask_boxes(targets[p])
        valid[row, :len(targets[p])] = True
    start = torch.full_like(gt_boxes, 0.5)  # padding queries start at the image centre; no loss
    start[valid] = noised_boxes(xyxy_to_cxcywh(gt_boxes[valid]), noise)
    head = model.segment_blocks(contents, prompt, out.blocks.phrase_mask[keep_t],
                                sam.take(out.blocks.batch_index[keep_t]), reference_boxes=start)

    logits = head.mask_logits[valid]  # (M, h, w), the instances in block order
    gt = torch.cat([targets[p] for p in keep]).to(logits.dtype)
    if logits.shape[-2:] != gt.shape[-2:]:
        raise ValueError(f"masks are {tuple(gt.shape[-2:])} but the head predicts {tuple(logits.shape[-2:])}")
    points = uncertain_points(logits.float()[:, None], num_points, oversample_ratio, importance_sample_ratio)
    bce, dice = point_mask_losses(logits, gt, points)
    pred_boxes = head.layer_boxes.transpose(1, 2)[valid].transpose(0, 1).float()  # (L, M, 4)
    target = gt_boxes[valid]
    box_l1 = (pred_boxes - target).abs().sum(-1).mean()
    giou = torch.stack([generalized_box_iou(layer, target).diagonal() for layer in pred_boxes])
    return DenoisingLosses(bce=bce.mean(), dice=dice.mean(), box_l1=box_l1, box_giou=(1 - giou).mean())
