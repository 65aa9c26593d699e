"""Re-initialisation for training from random weights (training/initialization.py)."""

from __future__ import annotations

import math

import torch

from instructsam_core.build import build_model
from training.config import ModelConfig
from training.train import build_start_model


def test_fan_in_init_redraws_layers_keeps_embeddings_and_is_seeded():
    before = build_model("tiny", device="cpu", seed=3).model
    embed_before = before.vlm.model.language_model.embed_tokens.weight.clone()
    a = build_start_model(ModelConfig(init="preset", preset="tiny", init_weights="fan_in", seed=3)).model
    b = build_start_model(ModelConfig(init="preset", preset="tiny", init_weights="fan_in", seed=3)).model
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name  # the same seed, the same weights
    proj = a.grounding_model.mask_decoder.instance_projection  # a 1x1 conv, fan-in 32
    assert abs(float(proj.weight.detach().std()) - 1 / math.sqrt(32)) < 0.03
    assert float(proj.bias.abs().max()) == 0.0
    linear = a.grounding_model.detr_decoder.box_head.layer1
    assert abs(float(linear.weight.std()) - 1 / math.sqrt(linear.in_features)) < 0.03
    embed = a.vlm.model.language_model.embed_tokens.weight
    assert torch.equal(embed, embed_before)  # embeddings (and the lm_head tied to them) stay
    assert a.vlm.lm_head.weight is embed
    assert abs(float(a.mask_queries.std()) - 1.0) < 0.2  # the bank at DETR's scale
    cos = torch.nn.functional.cosine_similarity(a.mask_queries[:, None], a.mask_queries[None], dim=-1)
    assert float((cos - torch.eye(len(cos))).abs().max()) < 0.9  # distinct slots


def test_transformers_init_is_the_built_model():
    built = build_start_model(ModelConfig(init="preset", preset="tiny")).model
    reference = build_model("tiny", device="cpu").model
    for (name, p), q in zip(built.named_parameters(), reference.parameters()):
        assert torch.equal(p, q), name
