"""Denoising queries: the box noise, the head run from given reference boxes, and training
with them (the tiny model on the CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from instructsam_core.build import build_model
from instructsam_core.model.instructsam import SamFeatures
from training.config import load_config
from training.denoising import noised_boxes, xyxy_to_cxcywh
from training.eval.synthetic import write_roborefit_scenes
from training.train import train

CONFIGS = Path(__file__).resolve().parents[2] / "training" / "configs"


def test_noised_boxes_stay_in_the_image_within_the_noise_and_repeat_from_the_seed():
    boxes = xyxy_to_cxcywh(torch.tensor([[0.1, 0.2, 0.3, 0.6], [0.0, 0.0, 1.0, 1.0]]))
    assert torch.allclose(boxes[0], torch.tensor([0.2, 0.4, 0.2, 0.4]))
    torch.manual_seed(0)
    many = torch.stack([noised_boxes(boxes, 0.4) for _ in range(200)])  # (200, 2, 4)
    torch.manual_seed(0)
    assert torch.equal(noised_boxes(boxes, 0.4), many[0])
    assert float(many.min()) >= 1e-3 - 1e-6 and float(many.max()) <= 1 - 1e-3 + 1e-6
    first = many[:, 0]
    assert float((first[:, :2] - boxes[0, :2]).abs().max()) <= 0.4 * 0.4 / 2 + 1e-6  # centre: up to noise/2 of size
    assert float((first[:, 2:] / boxes[0, 2:] - 1).abs().max()) <= 0.4 + 1e-6  # size: up to 1 +- noise
    assert float(first.std(0).min()) > 0.01  # and it does move them
    assert torch.allclose(noised_boxes(boxes[:1], 0.0), boxes[:1])  # (the whole-image box is clamped inside)


def test_the_head_from_given_reference_boxes_equals_the_learned_ones_given_and_follows_others():
    model = build_model("tiny", device="cpu").model
    sam = model.encode_image_sam(torch.randn(1, 3, model.config.sam_image_size, model.config.sam_image_size))
    k, h = model.config.num_queries, model.vlm.config.text_config.hidden_size
    states, prompt = torch.randn(1, k, h), torch.randn(1, 3, model.config.out_dim)
    mask = torch.ones(1, 3, dtype=torch.bool)
    with torch.no_grad():
        learned = model.grounding_model.detr_decoder.reference_points.weight[:k].sigmoid()[None]
        plain = model.segment_blocks(states, prompt, mask, sam)
        given = model.segment_blocks(states, prompt, mask, sam, reference_boxes=learned)
        moved = model.segment_blocks(states, prompt, mask, sam, reference_boxes=learned.flip(1))
    torch.testing.assert_close(given.mask_logits, plain.mask_logits)
    torch.testing.assert_close(given.boxes, plain.boxes)
    assert not torch.allclose(moved.boxes, plain.boxes)  # the decoder starts from the boxes it is given
    with pytest.raises(ValueError, match="reference_boxes must be"):
        model.segment_blocks(states, prompt, mask, sam, reference_boxes=learned[:, :1])
    assert isinstance(sam, SamFeatures)


def test_training_with_denoising_logs_its_losses_and_they_fall(tmp_path):
    data = tmp_path / "rr"
    write_roborefit_scenes(data, n=4, size=(64, 64))
    run = tmp_path / "run"
    summary = train(load_config(CONFIGS / "tiny_stage1.yaml", [
        f"data.train=[{{kind: roborefit, path: {data}}}]", f"loop.out_dir={run}", "loop.max_steps=60",
        "loop.log_every=1", "loop.progress=false", "loop.tensorboard=false", "loss.num_points=64",
        "loss.denoise=1.0", "loss.box_l1=5.0", "loss.box_giou=2.0"]))
    assert summary["finished"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    for key in ("dn_mask_bce", "dn_mask_dice", "dn_box_l1", "dn_box_giou"):
        values = [r[key] for r in rows]
        assert all(np.isfinite(values)), key
    first = np.mean([r["dn_box_l1"] + r["dn_mask_dice"] for r in rows[:10]])
    last = np.mean([r["dn_box_l1"] + r["dn_mask_dice"] for r in rows[-10:]])
    assert last < 0.8 * first, (first, last)
