"""The slot report: proposals' instance recall and whether scores pick on-target masks."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from training.slot_diagnostics import main, sample_diagnostics, summarise, within_sample_auc


def _box(y1: int, y2: int, x1: int, x2: int) -> np.ndarray:
    m = np.zeros((20, 20), bool)
    m[y1:y2, x1:x2] = True
    return m


def test_within_sample_auc_counts_pairs_and_half_ties():
    assert within_sample_auc([0.9, 0.5], [0.5, 0.1]) == 3.5 / 4
    assert within_sample_auc([0.2], [0.9]) == 0.0
    assert math.isnan(within_sample_auc([], [0.3]))


def test_sample_diagnostics_finds_instances_and_judges_the_scores():
    inst = np.stack([_box(0, 4, 0, 4), _box(10, 14, 10, 18)])  # 16 and 32 pixels
    masks = np.stack([_box(0, 4, 0, 4),        # instance 0 exactly
                      _box(10, 14, 10, 14),    # half of instance 1
                      _box(16, 20, 0, 8)])     # no target pixel at all
    d = sample_diagnostics(masks, np.array([0.2, 0.6, 0.9]), inst)
    np.testing.assert_allclose(d["instance_best_iou"], [1.0, 0.5])
    assert d["on_target"] == [True, True, False]
    assert d["auc"] == 0.0 and d["top1_on_target"] is False  # the off-target mask scores highest
    d = sample_diagnostics(masks, np.array([0.7, 0.6, 0.1]), inst)
    assert d["auc"] == 1.0 and d["top1_on_target"] is True


def test_sample_diagnostics_without_masks_or_targets():
    inst = np.stack([_box(0, 4, 0, 4)])
    d = sample_diagnostics(np.zeros((0, 20, 20), bool), np.zeros(0), inst)
    assert d["instance_best_iou"] == [0.0] and d["top1_on_target"] is None and math.isnan(d["auc"])
    d = sample_diagnostics(np.stack([_box(0, 4, 0, 4)]), np.array([0.4]), np.zeros((0, 20, 20), bool))
    assert d["instance_best_iou"] == [] and d["on_target"] == [False] and d["top1_on_target"] is None


def test_summarise_pools_instances_and_samples():
    rows = [{"instance_best_iou": [1.0, 0.6], "auc": 1.0, "top1_on_target": True, "kept": 3},
            {"instance_best_iou": [0.2], "auc": float("nan"), "top1_on_target": False, "kept": 1}]
    s = summarise(rows)
    assert s["n"] == 2 and s["kept"] == 2.0 and s["auc_samples"] == 1 and s["score_auc"] == 1.0
    assert abs(s["instance_best_iou"] - 0.6) < 1e-12 and s["found_50"] == 2 / 3 and s["found_75"] == 1 / 3
    assert s["top1_on_target"] == 0.5


def test_the_report_runs_the_shipped_model_on_a_written_split(tmp_path, capsys):
    from training.tabletop import write_split

    split = write_split(tmp_path, "heldout", seeds=[900001, 900002], held_out=True)
    out = tmp_path / "report.json"
    assert main(["default", str(split), "--limit", "12", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["all"]["n"] == 12 and sum(r["n"] for k, r in report.items() if k != "all") == 12
    for row in report.values():
        for key in ("instance_best_iou", "found_50", "found_75", "score_auc", "top1_on_target"):
            assert row[key] is None or 0.0 <= row[key] <= 1.0, (key, row[key])  # JSON null: nothing to measure
    assert "instance_best_iou" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["default", str(tmp_path / "none.json")])
    assert "none.json not found" in capsys.readouterr().err
