"""From slots to instances: threshold, NMS, upsampling, boxes."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from instructsam_core.postprocess import label_image, mask_iou, masks_to_boxes, slots_to_result


def test_boxes_use_inclusive_max_pixel_and_empty_masks_have_none():
    masks = np.zeros((3, 6, 8), dtype=bool)
    masks[0, 2:5, 1:4] = True  # rows 2..4, cols 1..3
    masks[1, 0, 7] = True
    boxes = masks_to_boxes(masks)
    assert boxes.tolist() == [[1, 2, 3, 4], [7, 0, 7, 0], [-1, -1, -1, -1]]


def _logits(P, K, h=8, w=8):
    logits = torch.full((P, K, h, w), -5.0)
    return logits


def test_threshold_sorting_and_slot_bookkeeping():
    logits = _logits(2, 3)
    logits[0, 1, :4, :4] = 5.0
    logits[1, 2, 4:, 4:] = 5.0
    logits[1, 0, 4:, :4] = 5.0
    scores = torch.tensor([[0.1, 0.8, 0.2], [0.6, 0.3, 0.9]])
    r = slots_to_result(logits, scores, ["mug", "cup"], (16, 16), score_threshold=0.5)
    assert r.scores.tolist() == pytest.approx([0.9, 0.8, 0.6])
    assert r.slots.tolist() == [2, 1, 0] and r.phrase_indices.tolist() == [1, 0, 1]
    assert r.phrases == ["cup", "mug", "cup"]
    assert r.masks.shape == (3, 16, 16) and r.masks.dtype == bool
    assert r.boxes[1].tolist() == [0, 0, 7, 7]


def test_upsampling_is_bilinear_without_corner_alignment():
    torch.manual_seed(0)
    logits = torch.randn(1, 1, 8, 8)
    r = slots_to_result(logits, torch.tensor([[0.9]]), ["x"], (20, 30), 0.5, mask_nms_iou=None)
    ref = F.interpolate(logits, size=(20, 30), mode="bilinear", align_corners=False)[0, 0] > 0
    np.testing.assert_array_equal(r.masks[0], ref.numpy())


def test_duplicate_slots_are_suppressed_and_cap_applies():
    logits = _logits(1, 3)
    logits[0, 0, :4, :4] = 5.0
    logits[0, 1, :4, :4] = 5.0  # duplicate of slot 0
    logits[0, 2, 4:, 4:] = 5.0
    scores = torch.tensor([[0.7, 0.9, 0.8]])
    r = slots_to_result(logits, scores, ["a"], (8, 8), 0.5, mask_nms_iou=0.7)
    assert r.slots.tolist() == [1, 2]
    r = slots_to_result(logits, scores, ["a"], (8, 8), 0.5, mask_nms_iou=None)
    assert r.slots.tolist() == [1, 2, 0]
    r = slots_to_result(logits, scores, ["a"], (8, 8), 0.5, max_instances=1)
    assert len(r) == 1


def test_nothing_above_threshold_or_empty_masks_is_no_target():
    logits = _logits(1, 2)
    r = slots_to_result(logits, torch.tensor([[0.9, 0.95]]), ["a"], (8, 8), 0.5)  # masks all background
    assert len(r) == 0 and r.masks.shape == (0, 8, 8)
    r = slots_to_result(logits, torch.tensor([[0.1, 0.2]]), ["a"], (8, 8), 0.5)
    assert len(r) == 0 and not r.union_mask().any()


def test_overlapping_slots_both_survive_by_default():
    from instructsam_core.config import EngineConfig

    logits = _logits(1, 2)
    logits[0, 0, :4, :4] = 5.0
    logits[0, 1, :4, :5] = 5.0  # IoU 0.8 with slot 0
    r = slots_to_result(logits, torch.tensor([[0.9, 0.8]]), ["a"], (8, 8), 0.5)
    assert r.slots.tolist() == [0, 1]  # the release keeps every slot above the threshold
    assert EngineConfig().mask_nms_iou is None


def test_label_image_lower_id_wins_overlaps_and_is_lossless_elsewhere():
    masks = np.zeros((3, 6, 8), bool)
    masks[0, 1:4, 1:4] = True
    masks[1, 2:6, 2:7] = True  # overlaps instance 1
    masks[2, 0, 7] = True
    labels = label_image(masks)
    assert labels.dtype == np.uint16
    assert labels[2, 2] == 1  # overlap: instance 1 (higher score) wins
    assert labels[5, 6] == 2 and labels[0, 7] == 3 and labels[0, 0] == 0
    only = masks.sum(0) == 1
    for k in range(3):  # where masks do not overlap, each mask is recovered exactly
        np.testing.assert_array_equal((labels == k + 1) & only, masks[k] & only)
    with pytest.raises(ValueError, match="do not fit a uint8 label image"):
        label_image(np.zeros((256, 2, 2), bool), np.uint8)


def test_mask_iou_by_hand_and_two_empty_masks_agree():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[0, :2] = True  # 2 pixels
    b[0, 1:4] = True  # 3 pixels, 1 shared
    assert mask_iou(a, b) == pytest.approx(1 / 4)
    assert mask_iou(np.zeros((4, 4), bool), np.zeros((4, 4), bool)) == 1.0
    assert mask_iou(a, np.zeros((4, 4), bool)) == 0.0
    with pytest.raises(ValueError, match="shapes differ"):
        mask_iou(a, np.zeros((3, 4), bool))
