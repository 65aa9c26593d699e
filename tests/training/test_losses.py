"""The matcher and every loss against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from training.losses import (bce_cost, dice_cost, dice_score, generalized_box_iou, mask_boxes, mask_losses,
                             match_slots, point_mask_losses, point_sample, semantic_losses, slot_spread_loss,
                             text_loss, uncertain_points)


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_dice_cost_by_hand():
    probs = torch.tensor([[1.0, 0.5, 0.0, 0.0]])
    gt = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]])
    # slot vs instance 0: I = 1.5, sums 1.5 + 2; vs instance 1: I = 0
    expected = [[1 - (3.0 + 1e-3) / (3.5 + 1e-3), 1 - 1e-3 / (3.5 + 1e-3)]]
    torch.testing.assert_close(dice_cost(probs, gt), torch.tensor(expected), rtol=0, atol=1e-7)


def test_bce_cost_is_the_mean_pixel_bce_by_hand():
    logits = torch.tensor([[2.0, -1.0]])
    gt = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    # BCE(l, 1) = softplus(-l), BCE(l, 0) = softplus(l)
    expected = [[(softplus(-2.0) + softplus(-1.0)) / 2, (softplus(-2.0) + softplus(1.0)) / 2]]
    torch.testing.assert_close(bce_cost(logits, gt), torch.tensor(expected), rtol=0, atol=1e-6)


def test_matching_takes_the_cheapest_pairs_and_the_score_term_counts():
    gt = torch.zeros(2, 4, 4)
    gt[0, :2] = 1  # top half
    gt[1, 2:] = 1  # bottom half
    logits = torch.full((3, 4, 4), -8.0)
    logits[0, 2:] = 8.0  # slot 0 draws the bottom half
    logits[2, :2] = 8.0  # slot 2 draws the top half
    rows, cols = match_slots(logits, torch.zeros(3), gt)
    assert dict(zip(rows.tolist(), cols.tolist())) == {0: 1, 2: 0}
    # identical masks: the slot score decides (softplus(-logit) is smaller for a confident slot)
    same = torch.full((2, 4, 4), -8.0)
    same[:, :2] = 8.0
    rows, cols = match_slots(same, torch.tensor([-3.0, 3.0]), gt[:1])
    assert rows.tolist() == [1] and cols.tolist() == [0]
    rows, _ = match_slots(logits, torch.zeros(3), torch.zeros(0, 4, 4))
    assert rows.size == 0  # no instance: nothing matched


def test_point_sample_reads_bilinear_values_at_pixel_centres():
    maps = torch.arange(16.0).reshape(1, 1, 4, 4)
    # (x, y) of the centres of pixels (row 1, col 2) and (row 3, col 0); the midpoint of (0,0)-(0,1)
    points = torch.tensor([[[2.5 / 4, 1.5 / 4], [0.5 / 4, 3.5 / 4], [1.0 / 4, 0.5 / 4]]])
    torch.testing.assert_close(point_sample(maps, points), torch.tensor([[6.0, 12.0, 0.5]]))


def test_uncertain_points_prefer_logits_near_zero():
    torch.manual_seed(0)
    logits = torch.full((1, 1, 16, 16), 10.0)
    logits[..., :, 8:] = 0.0  # the right half is uncertain
    points = uncertain_points(logits, num_points=100, oversample_ratio=3.0, importance_sample_ratio=0.75)
    assert points.shape == (1, 100, 2)
    assert bool((points[0, :75, 0] >= 0.5 - 1 / 32).all())  # the importance-sampled three quarters
    assert 0 <= float(points.min()) and float(points.max()) <= 1


def test_point_losses_by_hand_on_a_constant_mask():
    c, n = 1.5, 200
    logits = torch.full((1, 8, 8), c)
    gt = torch.ones(1, 8, 8)
    points = 1 / 16 + torch.rand(1, n, 2) * (1 - 2 / 16)  # inside the outer pixel centres: no border padding
    bce, dice = point_mask_losses(logits, gt, points)
    p = 1 / (1 + math.exp(-c))
    assert float(bce) == pytest.approx(softplus(-c), abs=1e-6)
    assert float(dice) == pytest.approx(1 - (2 * n * p + 1) / (n * p + n + 1), abs=1e-6)


def test_dice_score_by_hand():
    probs = torch.tensor([[[0.5, 1.0], [0.0, 0.0]]])
    gt = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    assert float(dice_score(probs, gt)) == pytest.approx((2 * 1.5 + 1e-6) / (1.5 + 2 + 1e-6))


def test_mask_losses_score_targets_and_averages():
    torch.manual_seed(0)
    gt_a = torch.zeros(1, 8, 8)
    gt_a[0, :4] = 1
    logits = torch.full((2, 3, 8, 8), -6.0)
    logits[0, 1, :4] = 6.0  # phrase 0, slot 1 matches its instance almost exactly
    slot_logits = torch.zeros(2, 3, requires_grad=True)
    out = mask_losses(logits, slot_logits, [gt_a, torch.zeros(0, 8, 8)], (2.0, 0.5, 1.0), 64, 3.0, 0.75)
    probs = torch.sigmoid(logits[0, 1])
    quality = (2 * (probs * gt_a[0]).sum() + 1e-6) / (probs.sum() + gt_a.sum() + 1e-6)
    target0 = torch.tensor([0.0, float(quality), 0.0])
    expected_score = (F.binary_cross_entropy_with_logits(torch.zeros(3), target0)
                      + F.binary_cross_entropy_with_logits(torch.zeros(3), torch.zeros(3))) / 2  # phrase 1: no target
    assert float(out.score.detach()) == pytest.approx(float(expected_score), abs=1e-6)
    assert out.matched_ious == [1.0]
    out.score.backward()
    assert slot_logits.grad is not None
    with pytest.raises(ValueError, match="2 query blocks but 1 phrase targets"):
        mask_losses(logits, slot_logits, [gt_a], (2.0, 0.5, 1.0), 64, 3.0, 0.75)


def test_score_target_is_at_least_a_tenth_for_a_matched_slot():
    gt = torch.zeros(1, 4, 4)
    gt[0, 0, 0] = 1
    logits = torch.full((1, 1, 4, 4), -20.0)  # a bad mask, still the only slot
    out = mask_losses(logits, torch.zeros(1, 1), [gt], (2.0, 0.5, 1.0), 16, 3.0, 0.75)
    expected = F.binary_cross_entropy_with_logits(torch.zeros(1), torch.tensor([0.1]))
    assert float(out.score) == pytest.approx(float(expected), abs=1e-6)


def test_score_target_one_is_detrs_class_target_whatever_the_mask():
    gt = torch.zeros(1, 4, 4)
    gt[0, 0, 0] = 1
    logits = torch.full((1, 2, 4, 4), -20.0)
    logits[0, 1, 0, 0] = 20.0  # slot 1 is the match, its mask is good or bad alike
    out = mask_losses(logits, torch.zeros(1, 2), [gt], (2.0, 0.5, 1.0), 16, 3.0, 0.75, score_target="one")
    expected = F.binary_cross_entropy_with_logits(torch.zeros(2), torch.tensor([0.0, 1.0]))
    assert float(out.score) == pytest.approx(float(expected), abs=1e-6)
    with pytest.raises(ValueError, match="score_target"):
        mask_losses(logits, torch.zeros(1, 2), [gt], (2.0, 0.5, 1.0), 16, 3.0, 0.75, score_target="iou")


def test_score_target_quality_scores_every_slot_by_its_best_instance():
    gt = torch.zeros(2, 4, 4)
    gt[0, 0] = 1  # instance 0: the top row
    gt[1, 3] = 1  # instance 1: the bottom row
    logits = torch.full((2, 3, 4, 4), -20.0)
    logits[0, 0, 0] = 20.0  # slot 0: instance 0 exactly
    logits[0, 1, 0] = 20.0  # slot 1: the same mask (a duplicate, unmatched: Hungarian pairs one slot per instance)
    logits[0, 2, 3, :2] = 20.0  # slot 2: half of instance 1
    slot_logits = torch.tensor([[2.0, -1.0, 0.5], [-3.0, 0.0, 1.0]])  # (at logit 0 every target costs log 2)
    out = mask_losses(logits, slot_logits, [gt, torch.zeros(0, 4, 4)], (2.0, 0.5, 1.0), 16, 3.0, 0.75,
                      score_target="quality")
    half = (2 * 2 + 1e-6) / (2 + 4 + 1e-6)  # Dice of 2 pixels of a 4-pixel instance
    targets = torch.tensor([1.0, 1.0, half])  # the duplicate scores as high as the match
    expected = (F.binary_cross_entropy_with_logits(slot_logits[0], targets)
                + F.binary_cross_entropy_with_logits(slot_logits[1], torch.zeros(3))) / 2  # no target: all 0
    assert float(out.score) == pytest.approx(float(expected), abs=1e-5)
    release = mask_losses(logits, slot_logits, [gt, torch.zeros(0, 4, 4)], (2.0, 0.5, 1.0), 16, 3.0, 0.75)
    assert float(release.score) != pytest.approx(float(out.score), abs=1e-3)  # the release scores the duplicate 0


def test_unmatched_slots_are_pushed_off_the_phrases_instances_and_only_there():
    gt = torch.zeros(1, 4, 4)
    gt[0, 0] = 1  # the instance: the top row
    logits = torch.full((2, 3, 4, 4), -20.0)
    logits[0, 0, 0] = 20.0  # slot 0: the instance exactly (the match)
    logits[0, 1, :2] = 3.0  # slot 1: the instance and the row below it (unmatched, on the target)
    # slot 2: nothing (unmatched, off the target)
    logits.requires_grad_(True)
    slot_logits = torch.zeros(2, 3)
    out = mask_losses(logits, slot_logits, [gt, torch.zeros(0, 4, 4)], (2.0, 0.5, 1.0), 16, 3.0, 0.75)
    # the instance's 4 pixels of slots 1 and 2 (phrase 1 has no instance, so nothing to push off)
    expected = (4 * softplus(3.0) + 4 * softplus(-20.0)) / 8
    assert float(out.unmatched) == pytest.approx(expected, rel=1e-6)
    out.unmatched.backward()
    grad = logits.grad
    assert float(grad[0, 0].abs().sum()) == 0.0  # the matched slot is left alone
    assert float(grad[0, 1, 0].min()) > 0  # slot 1's pixels on the instance are pushed down...
    assert float(grad[0, 1, 1:].abs().sum()) == 0.0  # ...and nowhere else
    assert float(grad[1].abs().sum()) == 0.0
    only_match = mask_losses(logits[:1, :1], slot_logits[:1, :1], [gt], (2.0, 0.5, 1.0), 16, 3.0, 0.75)
    assert float(only_match.unmatched) == 0.0  # every slot matched: nothing to push


def test_text_loss_predicts_the_next_labelled_token_only():
    logits = torch.zeros(1, 4, 3)
    logits[0, 1, 2] = math.log(4.0)  # position 1 predicts token 2 with p = 4/6
    labels = torch.tensor([[-100, -100, 2, -100]])
    assert float(text_loss(logits, labels)) == pytest.approx(-math.log(4 / 6), abs=1e-6)
    assert float(text_loss(logits, torch.full((1, 4), -100))) == 0.0
    np.testing.assert_allclose(float(text_loss(logits, torch.tensor([[-100, 0, 2, 1]]))),
                               (math.log(3) - math.log(4 / 6) + math.log(3)) / 3, rtol=1e-6)


def test_mask_boxes_are_normalised_xyxy_one_past_the_last_pixel():
    masks = torch.zeros(3, 4, 8, dtype=torch.bool)
    masks[0, 1:3, 2:6] = True  # rows 1-2, columns 2-5
    masks[1, 3, 7] = True  # one pixel in the corner
    boxes = mask_boxes(masks)
    torch.testing.assert_close(boxes, torch.tensor([[2 / 8, 1 / 4, 6 / 8, 3 / 4], [7 / 8, 3 / 4, 1.0, 1.0],
                                                    [0.0, 0.0, 0.0, 0.0]]))


def test_generalized_box_iou_by_hand():
    a = torch.tensor([[0.0, 0.0, 0.5, 0.5]])
    b = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.25, 0.0, 0.75, 0.5], [0.5, 0.5, 1.0, 1.0]])
    # identical: 1; half overlap: I 0.125 / U 0.375, hull = union; apart: IoU 0, hull 1, union 0.5
    expected = torch.tensor([[1.0, 0.125 / 0.375, 0.0 - (1.0 - 0.5) / 1.0]])
    torch.testing.assert_close(generalized_box_iou(a, b), expected)


def test_box_cost_decides_the_match_when_masks_cannot():
    gt = torch.zeros(2, 8, 8)
    gt[0, :4, :4] = 1  # top left
    gt[1, 4:, 4:] = 1  # bottom right
    logits = torch.zeros(2, 8, 8)  # the masks say nothing
    boxes = torch.tensor([[0.5, 0.5, 1.0, 1.0], [0.0, 0.0, 0.5, 0.5]])  # slot 0 sits bottom right
    rows, cols = match_slots(logits, torch.zeros(2), gt, (1.0, 1.0, 0.0), boxes, (5.0, 2.0))
    assert dict(zip(rows.tolist(), cols.tolist())) == {0: 1, 1: 0}


def test_box_losses_average_the_layers_of_the_matched_slots():
    gt = torch.zeros(1, 8, 8)
    gt[0, :4, :4] = 1  # box (0, 0, 0.5, 0.5)
    logits = torch.full((1, 2, 8, 8), -8.0)
    logits[0, 0, :4, :4] = 8.0  # slot 0 is the match
    exact, shifted = [0.0, 0.0, 0.5, 0.5], [0.25, 0.0, 0.75, 0.5]
    layer_boxes = torch.tensor([[[exact, shifted], [shifted, exact]]])  # (P=1, L=2, K=2, 4)
    out = mask_losses(logits, torch.zeros(1, 2), [gt], (2.0, 0.5, 1.0), 64, 3.0, 0.75, layer_boxes, (5.0, 2.0))
    # slot 0: exact in layer 0 (L1 0, GIoU 1), shifted in layer 1 (L1 0.5, GIoU 1/3)
    torch.testing.assert_close(out.box_l1, torch.tensor(0.25))
    torch.testing.assert_close(out.box_giou, torch.tensor((0.0 + (1 - 1 / 3)) / 2))
    assert float(mask_losses(logits, torch.zeros(1, 2), [gt], (2.0, 0.5, 1.0), 64, 3.0, 0.75).box_l1) == 0.0


def test_semantic_losses_score_the_union_of_a_phrases_instances():
    gt = torch.zeros(2, 4, 4, dtype=torch.bool)
    gt[0, 0] = True
    gt[1, 3] = True
    perfect = torch.where(gt.any(0), 20.0, -20.0)[None]
    bce, dice = semantic_losses(perfect, [gt])
    assert float(bce) < 1e-6 and float(dice) < 1e-6
    # no target: an all-background prediction is right, an all-foreground one is not
    empty = torch.zeros(0, 4, 4, dtype=torch.bool)
    assert float(semantic_losses(torch.full((1, 4, 4), -20.0), [empty])[0]) < 1e-6
    bce, dice = semantic_losses(torch.full((1, 4, 4), 20.0), [empty])
    assert float(bce) > 10 and float(dice) == pytest.approx(1 - 1 / 17, abs=1e-4)


def test_slot_spread_loss_is_one_for_collapsed_slots_and_zero_for_orthogonal_ones():
    same = torch.randn(1, 1, 1, 8).expand(2, 3, 4, 8)  # (P, L, K, D): every slot one state
    assert float(slot_spread_loss(same)) == pytest.approx(1.0, abs=1e-6)
    orthogonal = torch.eye(8)[:4].expand(2, 3, 4, 8)
    assert float(slot_spread_loss(orthogonal)) == pytest.approx(0.0, abs=1e-7)
    # by hand: slots e0, e0 + e1 (cosine 1/sqrt 2 with e0), e2: pairs (1/2, 0, 0) twice over
    states = torch.tensor([[1.0, 0, 0], [1, 1, 0], [0, 0, 1]])[None, None]
    assert float(slot_spread_loss(states)) == pytest.approx((0.5 + 0 + 0) / 3, abs=1e-6)
    assert float(slot_spread_loss(states * 7)) == pytest.approx(1 / 6, abs=1e-6)  # the scale does not count
    grad = torch.randn(1, 2, 4, 8, requires_grad=True)
    slot_spread_loss(grad).backward()
    assert grad.grad is not None and float(grad.grad.abs().sum()) > 0
    assert float(slot_spread_loss(torch.randn(1, 2, 1, 8))) == 0.0  # one slot has nothing to be apart from
    assert float(slot_spread_loss(torch.randn(0, 2, 4, 8))) == 0.0  # no phrase in the batch
