"""Metrics against hand-computed cases (REFERENCE.md "Metric protocols") and pycocotools."""

from __future__ import annotations

import contextlib
import io
import math

import numpy as np
import pytest
import torch

from training.metrics import (
    EPS, GRES_IOU, IOU_THRESHOLDS, LISA_IOU, InstanceAPAccumulator, SampleScores, SegmentationAccumulator, box_iou,
    failed_sample, mask_iou, mask_to_box, pairwise_box_iou, pairwise_mask_iou, score_sample,
    voc_average_precision,
)


def _rect(h: int, w: int, y1: int, x1: int, y2: int, x2: int) -> np.ndarray:
    """Mask with the inclusive rectangle rows y1..y2, columns x1..x2 set."""
    m = np.zeros((h, w), dtype=bool)
    m[y1:y2 + 1, x1:x2 + 1] = True
    return m


# --------------------------------------------------------------------------- mask IoU


def test_both_empty_scores_zero_by_formula_and_one_when_asked():
    z = np.zeros((4, 5), dtype=bool)
    ov = mask_iou(z, z)
    assert (ov.intersection, ov.union, ov.iou) == (0, 0, 0.0)
    assert score_sample(z, z).iou == 0.0
    s = score_sample(z, z, formula=GRES_IOU)
    assert s.iou == 1.0 and s.gt_empty and s.pred_empty and s.box_iou == 0.0


def test_empty_prediction_scores_zero_and_no_box():
    gt = _rect(10, 10, 2, 2, 5, 5)
    s = score_sample(np.zeros_like(gt), gt)
    assert s.iou == 0.0 and s.intersection == 0 and s.union == 16
    assert s.box_iou == 0.0 and s.pred_empty and not s.gt_empty


def test_any_nonzero_prediction_pixel_is_foreground():
    gt = _rect(4, 4, 0, 0, 1, 1)
    pred = np.where(gt, 7, 0).astype(np.uint8)
    assert mask_iou(pred, gt).iou == pytest.approx(1.0, abs=1e-12)


def test_iou_of_one_half_with_small_union_falls_below_half():
    # I = 2, U = 4: 2 / (4 + 1e-12) < 0.5, so P@50 does not count it.
    gt = _rect(4, 4, 0, 0, 0, 3)  # 4 px
    pred = _rect(4, 4, 0, 0, 0, 1)  # 2 px inside
    ov = mask_iou(pred, gt)
    assert (ov.intersection, ov.union) == (2, 4)
    assert ov.iou < 0.5 and ov.iou == 2 / (4 + EPS)
    acc = SegmentationAccumulator()
    acc.add(pred, gt)
    assert acc.summary()["p@0.5"] == 0.0


def test_iou_of_one_half_with_large_union_is_exactly_half():
    # U = 20000 >= 16384: U + 1e-12 rounds to U in float64, IoU == 0.5, P@50 counts it.
    gt = _rect(100, 200, 0, 0, 99, 199)
    pred = _rect(100, 200, 0, 0, 99, 99)
    ov = mask_iou(pred, gt)
    assert (ov.intersection, ov.union) == (10000, 20000)
    assert ov.iou == 0.5
    acc = SegmentationAccumulator()
    acc.add(pred, gt)
    summary = acc.summary()
    assert summary["p@0.5"] == 1.0
    # box IoU is also exactly 0.5, and box Acc@0.5 is strict (>): not counted
    assert summary["box_miou"] == 0.5 and summary["box_acc@0.5"] == 0.0


def test_ignore_pixels_leave_both_masks():
    gt = _rect(4, 4, 0, 0, 1, 3)  # 8 px
    pred = _rect(4, 4, 0, 0, 3, 3)  # 16 px
    ignore = _rect(4, 4, 2, 0, 3, 3)  # the 8 px of pred outside gt
    assert mask_iou(pred, gt, ignore).iou == pytest.approx(1.0, abs=1e-12)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="differs from GT shape"):
        mask_iou(np.zeros((2, 3)), np.zeros((3, 2)))


def test_pairwise_mask_iou_matches_single_and_torch():
    rng = np.random.default_rng(0)
    p = rng.random((3, 9, 7)) > 0.5
    g = rng.random((2, 9, 7)) > 0.5
    m = pairwise_mask_iou(p, g)
    for i in range(3):
        for j in range(2):
            assert m[i, j] == pytest.approx(mask_iou(p[i], g[j]).iou, abs=1e-15)
    mt = pairwise_mask_iou(torch.from_numpy(p), torch.from_numpy(g))
    np.testing.assert_allclose(mt, m, atol=1e-15, rtol=0)


# --------------------------------------------------------------------------- boxes


def test_tight_box_has_inclusive_max_pixel():
    m = np.zeros((6, 8), dtype=bool)
    m[2, 3] = True
    m[4, 6] = True
    np.testing.assert_array_equal(mask_to_box(m), [3, 2, 6, 4])
    assert mask_to_box(np.zeros((3, 3), bool)) is None


def test_box_iou_counts_pixels():
    # a single pixel box has area 1, not 0
    assert box_iou([2, 2, 2, 2], [2, 2, 2, 2]) == 1 / (1 + EPS)
    # [0..1]x[0..1] (4 px) vs [1..2]x[1..2] (4 px): I = 1, U = 7
    assert box_iou([0, 0, 1, 1], [1, 1, 2, 2]) == 1 / (7 + EPS)
    assert box_iou([0, 0, 1, 1], [5, 5, 6, 6]) == 0.0
    assert box_iou(None, [0, 0, 1, 1]) == 0.0


def test_dataset_box_is_used_over_the_mask_box():
    gt = _rect(10, 10, 0, 0, 4, 4)
    pred = _rect(10, 10, 0, 0, 4, 4)
    assert score_sample(pred, gt).box_iou == pytest.approx(1.0, abs=1e-12)
    # JSON bbox covering twice the width: 25 / 50
    assert score_sample(pred, gt, gt_box=[0, 0, 9, 4]).box_iou == 25 / (50 + EPS)


# --------------------------------------------------------------------------- accumulation


def test_ciou_is_summed_intersection_over_summed_union():
    acc = SegmentationAccumulator()
    acc.add(_rect(10, 10, 0, 0, 0, 0), _rect(10, 10, 0, 0, 0, 1))  # I 1, U 2
    acc.add(_rect(10, 10, 0, 0, 9, 9), _rect(10, 10, 0, 0, 4, 9))  # I 50, U 100
    s = acc.summary()
    assert s["ciou"] == 51 / 102
    assert s["mean_iou"] == pytest.approx((0.5 + 0.5) / 2, abs=1e-9)
    assert s["n"] == 2 and s["failures"] == 0


def test_failure_scores_zero_and_counts_gt_area_in_union():
    acc = SegmentationAccumulator()
    acc.add(_rect(4, 4, 0, 0, 3, 3), _rect(4, 4, 0, 0, 3, 3))
    acc.add_scores(failed_sample(gt_area=16))
    s = acc.summary()
    assert s["n"] == 2 and s["failures"] == 1
    assert s["mean_iou"] == pytest.approx(0.5, abs=1e-12)
    assert s["ciou"] == 16 / 32
    assert s["empty_pred_rate"] == 0.0  # over the sample that ran; the failure is not an empty prediction


def test_average_over_no_samples_raises():
    with pytest.raises(ValueError, match="zero samples"):
        SegmentationAccumulator().summary()


def test_nacc_tacc_follow_gres_and_are_nan_without_cases():
    acc = SegmentationAccumulator(GRES_IOU)
    z = np.zeros((3, 3), bool)
    one = _rect(3, 3, 0, 0, 0, 0)
    acc.add(z, z)      # no-target, predicted none: TP
    acc.add(one, z)    # no-target, predicted some: FN
    acc.add(z, z)      # TP
    s = acc.summary()
    assert s["n_acc"] == 2 / 3
    assert math.isnan(s["t_acc"])
    acc.add(one, one)  # target, found: TN
    acc.add(z, one)    # target, predicted none: FP
    s = acc.summary()
    assert s["t_acc"] == 0.5
    assert s["mean_iou"] == pytest.approx((1 + 0 + 1 + 1 + 0) / 5, abs=1e-9)


def test_sample_scores_round_trip_through_dict():
    s = score_sample(_rect(5, 5, 1, 1, 2, 2), _rect(5, 5, 1, 1, 3, 3))
    assert SampleScores(**s.to_dict()) == s


# --------------------------------------------------------------------------- instance mAP


def _ap(queries, thresholds=(0.5,)):
    acc = InstanceAPAccumulator()
    for scores, ious in queries:
        ious = np.asarray(ious, dtype=np.float64)
        acc.add_ious(scores, ious if ious.ndim == 2 else ious.reshape(len(scores), -1))
    return acc.compute(thresholds)


def test_voc_all_point_ap_by_hand():
    # tp = [1, 0, 1] over 2 GT: rec [.5, .5, 1], prec [1, .5, 2/3] -> .5 * 1 + .5 * 2/3
    assert voc_average_precision(np.array([0.5, 0.5, 1.0]), np.array([1.0, 0.5, 2 / 3])) == pytest.approx(
        0.5 + 1 / 3, abs=1e-12)


def test_each_prediction_takes_the_best_unmatched_gt_of_its_query():
    # p1 overlaps g0 best, but g0 is taken by p0: p1 gets g1 (IoU 0.1) -> FP
    out = _ap([([0.9, 0.8, 0.7], [[0.9, 0.0], [0.8, 0.1], [0.0, 0.6]])])
    assert out["AP@0.50"] == pytest.approx(0.5 + 1 / 3, abs=1e-12)
    assert out["num_gt"] == 2 and out["num_pred"] == 3


def test_score_ties_keep_input_order():
    fp_query = ([0.5], [[0.0]])
    tp_query = ([0.5], [[1.0]])
    # FP first: rec [0, .5], prec [0, .5] -> 0.25 ; TP first: rec [.5, .5] prec [1, .5] -> 0.5
    assert _ap([fp_query, tp_query])["AP@0.50"] == pytest.approx(0.25, abs=1e-12)
    assert _ap([tp_query, fp_query])["AP@0.50"] == pytest.approx(0.5, abs=1e-12)


def test_iou_tie_between_gts_takes_lowest_gt_index():
    # p0 ties g0/g1; taking g0 leaves p1 (which only overlaps g0) a FP: AP 0.5 (else 1.0)
    out = _ap([([0.9, 0.8], [[0.6, 0.6], [0.6, 0.0]])])
    assert out["AP@0.50"] == pytest.approx(0.5, abs=1e-12)


def test_query_without_gt_yields_only_false_positives():
    out = _ap([([0.4], [[1.0]]), ([0.9], np.zeros((1, 0)))])
    # FP (0.9) then TP (0.4): rec [0, 1], prec [0, .5] -> 0.5
    assert out["AP@0.50"] == pytest.approx(0.5, abs=1e-12)
    assert out["num_queries"] == 2 and out["num_gt"] == 1


def test_no_gt_at_all_gives_zero_ap_and_no_queries_raise():
    assert _ap([([0.9], np.zeros((1, 0)))])["mAP"] == 0.0
    assert _ap([([], np.zeros((0, 2)))])["mAP"] == 0.0  # GT but no predictions
    with pytest.raises(ValueError, match="zero queries"):
        InstanceAPAccumulator().compute()


def test_map_averages_the_ten_thresholds():
    assert list(IOU_THRESHOLDS) == list(np.linspace(0.5, 0.95, 10))
    out = _ap([([0.9], [[0.72]])], IOU_THRESHOLDS)
    assert out["AP50"] == 1.0 and out["AP75"] == 0.0
    assert out["AP@0.70"] == 1.0 and out["AP@0.90"] == 0.0
    assert out["mAP"] == pytest.approx(0.5, abs=1e-12)


def test_mask_level_add_equals_iou_level_add():
    rng = np.random.default_rng(1)
    preds = rng.random((4, 12, 10)) > 0.4
    gts = rng.random((2, 12, 10)) > 0.4
    scores = rng.random(4)
    a = InstanceAPAccumulator()
    ious = a.add(preds, scores, gts)
    b = InstanceAPAccumulator()
    b.add_ious(scores, pairwise_mask_iou(preds, gts))
    assert a.compute() == b.compute()
    assert ious.shape == (4, 2)


def test_non_finite_scores_are_rejected():
    with pytest.raises(ValueError, match="finite"):
        InstanceAPAccumulator().add_ious([math.nan], np.zeros((1, 1)))


# --------------------------------------------------------------------------- pycocotools cross-checks


def _rle(m):
    from pycocotools import mask as mu
    return mu.encode(np.asfortranarray(m.astype(np.uint8)))


def test_mask_ious_agree_with_pycocotools():
    mu = pytest.importorskip("pycocotools.mask")
    rng = np.random.default_rng(2)
    preds = rng.random((5, 23, 17)) > 0.5
    gts = rng.random((3, 23, 17)) > 0.5
    ref = mu.iou([_rle(p) for p in preds], [_rle(g) for g in gts], [0, 0, 0])
    np.testing.assert_allclose(pairwise_mask_iou(preds, gts), ref, atol=1e-9, rtol=0)


def test_box_ious_agree_with_pycocotools():
    mu = pytest.importorskip("pycocotools.mask")
    rng = np.random.default_rng(3)
    xy = rng.integers(0, 40, size=(6, 2))
    wh = rng.integers(1, 30, size=(6, 2))
    boxes = np.concatenate([xy, xy + wh - 1], axis=1)  # inclusive xyxy
    xywh = np.concatenate([xy, wh], axis=1).astype(np.float64)  # COCO: width = x2 - x1 + 1
    ref = mu.iou(xywh[:3], xywh[3:], [0, 0, 0])
    np.testing.assert_allclose(pairwise_box_iou(boxes[:3], boxes[3:]), ref, atol=1e-9, rtol=0)


def test_single_query_tp_fp_sequence_agrees_with_coco_eval():
    pytest.importorskip("pycocotools")
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    rng = np.random.default_rng(4)
    h, w = 30, 40
    gts = []
    for _ in range(4):
        y1, x1 = rng.integers(0, h - 8), rng.integers(0, w - 8)
        gts.append(_rect(h, w, y1, x1, y1 + rng.integers(3, 8), x1 + rng.integers(3, 8)))
    preds = []
    for g in gts + gts[:2]:  # near-copies of GTs, two duplicates
        p = g.copy()
        p ^= rng.random((h, w)) > 0.97
        preds.append(p)
    preds.append(_rect(h, w, 0, 0, 2, 2))  # a stray one
    scores = rng.permutation(np.linspace(0.2, 0.9, len(preds)))
    ours = InstanceAPAccumulator()
    ious = ours.add(np.stack(preds), scores, np.stack(gts))
    for t in IOU_THRESHOLDS:  # only compare where both IoU definitions agree on the side
        assert np.all(np.abs(ious - t) > 1e-9)
    # COCO breaks IoU ties towards the later GT; make sure there are none among candidates
    for row in ious:
        nz = row[row > 0]
        assert len(np.unique(nz)) == len(nz)
    order, tp = ours.match()

    gt_ds = {"images": [{"id": 1, "height": h, "width": w}], "categories": [{"id": 1, "name": "x"}],
             "annotations": []}
    for k, g in enumerate(gts):
        r = _rle(g)
        r["counts"] = r["counts"].decode()
        gt_ds["annotations"].append({"id": k + 1, "image_id": 1, "category_id": 1, "segmentation": r,
                                     "area": float(g.sum()), "bbox": [0, 0, 1, 1], "iscrowd": 0})
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt_ds
        coco_gt.createIndex()
        dts = []
        for p, s in zip(preds, scores):
            r = _rle(p)
            r["counts"] = r["counts"].decode()
            dts.append({"image_id": 1, "category_id": 1, "segmentation": r, "score": float(s)})
        coco_dt = coco_gt.loadRes(dts)
        ev = COCOeval(coco_gt, coco_dt, "segm")
        ev.params.iouThrs = IOU_THRESHOLDS
        ev.evaluate()
    img = next(e for e in ev.evalImgs if e is not None and e["aRng"] == ev.params.areaRng[0])
    # COCO's detections are score-sorted with a stable sort, as ours
    coco_order = [int(i) - 1 for i in img["dtIds"]]
    assert coco_order == list(order)
    np.testing.assert_array_equal(img["dtMatches"] > 0, tp)
    assert tp.any() and not tp.all()


def test_failed_sample_counts_as_wrong_in_the_no_target_confusion():
    acc = SegmentationAccumulator(GRES_IOU)
    z = np.zeros((3, 3), bool)
    one = _rect(3, 3, 0, 0, 0, 0)
    acc.add(z, z)                                      # no-target, predicted none: TP
    acc.add_scores(failed_sample(gt_area=0, gt_empty=True))   # no-target, failed: FN
    acc.add(one, one)                                  # target, found: TN
    acc.add_scores(failed_sample(gt_area=1, gt_empty=False))  # target, failed: FP
    s = acc.summary()
    assert s["n_acc"] == 0.5  # 1 TP / (1 TP + 1 FN): the failure is not a no-target hit
    assert s["t_acc"] == 0.5  # 1 TN / (1 TN + 1 FP)
    assert s["failures"] == 2
    # a no-target split whose only sample failed: N-acc 0, not 1
    only = SegmentationAccumulator(GRES_IOU)
    only.add_scores(failed_sample(gt_area=0, gt_empty=True))
    assert only.summary()["n_acc"] == 0.0


def test_empty_pred_rate_is_over_samples_that_ran_not_failures():
    acc = SegmentationAccumulator()
    z = np.zeros((4, 4), bool)
    full = _rect(4, 4, 0, 0, 3, 3)
    acc.add(z, full)     # ran, empty prediction
    acc.add(full, full)  # ran, non-empty
    acc.add(full, full)  # ran, non-empty
    acc.add_scores(failed_sample(gt_area=16))
    acc.add_scores(failed_sample(gt_area=16))
    s = acc.summary()
    assert s["n"] == 5 and s["failures"] == 2
    assert s["empty_pred_rate"] == pytest.approx(1 / 3, abs=1e-12)
    only_failed = SegmentationAccumulator()
    only_failed.add_scores(failed_sample(gt_area=16))
    assert math.isnan(only_failed.summary()["empty_pred_rate"])


# ---- ReasonSeg follows LISA ---------------------------------------------------------


def test_lisa_per_sample_iou_adds_1e5_and_scores_two_empty_masks_one():
    pred, gt = np.zeros((4, 4), bool), np.zeros((4, 4), bool)
    pred[0, :3] = True  # 3 pixels
    gt[0, 1:] = True  # 3 pixels, 2 shared: I = 2, U = 4
    assert score_sample(pred, gt, formula=LISA_IOU).iou == 2 / (4 + 1e-5)
    assert score_sample(pred, gt).iou == 2 / (4 + 1e-12)  # the other benchmarks' formula
    empty = np.zeros((4, 4), bool)
    assert score_sample(empty, empty, formula=LISA_IOU).iou == 1.0
    assert score_sample(pred, empty, formula=LISA_IOU).iou == 0.0


def test_lisa_ciou_adds_1e10_and_is_zero_when_nothing_is_anywhere():
    acc = SegmentationAccumulator(LISA_IOU)
    a, b = np.zeros((2, 8), bool), np.zeros((2, 8), bool)
    a[0, :5], b[0, 2:] = True, True  # I = 3, U = 8
    acc.add(a, b)
    acc.add(np.zeros((2, 8), bool), b)  # I = 0, U = 6
    s = acc.summary()
    assert s["ciou"] == 3 / (14 + 1e-10)
    assert s["mean_iou"] == pytest.approx((3 / (8 + 1e-5) + 0.0) / 2, abs=0)
    nothing = SegmentationAccumulator(LISA_IOU)
    nothing.add(np.zeros((2, 2), bool), np.zeros((2, 2), bool))
    assert nothing.summary()["ciou"] == 0.0 and nothing.summary()["mean_iou"] == 1.0
    plain = SegmentationAccumulator()
    plain.add(np.zeros((2, 2), bool), np.zeros((2, 2), bool))
    assert np.isnan(plain.summary()["ciou"])  # the other benchmarks: undefined, not 0
    with pytest.raises(ValueError):
        SegmentationAccumulator(LISA_IOU).summary()  # an empty sample set still raises
