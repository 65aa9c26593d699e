"""Re-initialisation for training from random weights (training/initialization.py)."""

from __future__ import annotations

import math

import pytest
import torch

from instructsam_core.build import build_model
from instructsam_core.checkpoint import save_checkpoint
from training.config import ConfigError, ModelConfig
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
    assert float(proj.bias.detach().abs().max()) == 0.0
    linear = a.grounding_model.detr_decoder.box_head.layer1
    assert abs(float(linear.weight.detach().std()) - 1 / math.sqrt(linear.in_features)) < 0.03
    embed = a.vlm.model.language_model.embed_tokens.weight
    assert torch.equal(embed, embed_before)  # embeddings (and the lm_head tied to them) stay
    assert a.vlm.lm_head.weight is embed
    assert abs(float(a.mask_queries.detach().std()) - 1.0) < 0.2  # the bank at DETR's scale
    cos = torch.nn.functional.cosine_similarity(a.mask_queries[:, None], a.mask_queries[None], dim=-1)
    assert float((cos.detach() - torch.eye(len(cos))).abs().max()) < 0.9  # distinct slots


def test_transformers_init_is_the_built_model():
    built = build_start_model(ModelConfig(init="preset", preset="tiny")).model
    reference = build_model("tiny", device="cpu").model
    for (name, p), q in zip(built.named_parameters(), reference.parameters()):
        assert torch.equal(p, q), name


def test_box_prior_spreads_the_slots_and_makes_them_look_inside_their_boxes():
    model = build_start_model(ModelConfig(init="preset", preset="tiny", init_weights="fan_in", box_prior=8.0)).model
    decoder = model.grounding_model.detr_decoder
    boxes = decoder.reference_points.weight.detach().sigmoid()  # (K, 4) cxcywh
    k = len(boxes)
    centres = boxes[:, :2]
    assert float(torch.cdist(centres, centres).add(torch.eye(k)).min()) > 0.05  # no two slots start together
    assert torch.allclose(boxes[:, 2:], torch.full((k, 2), 0.3))
    assert bool(((centres - 0.15 >= -1e-6) & (centres + 0.15 <= 1 + 1e-6)).all())  # whole boxes in the image
    with torch.no_grad():
        rpb = decoder._get_rpb_matrix(boxes[None], (16, 16))[0]  # (heads, K, 256)
    ys, xs = torch.meshgrid(torch.arange(16) / 16, torch.arange(16) / 16, indexing="ij")
    for slot, (cx, cy, w, h) in enumerate(boxes.tolist()):
        inside = ((xs >= cx - w / 2) & (xs <= cx + w / 2) & (ys >= cy - h / 2) & (ys <= cy + h / 2)).flatten()
        far = ((xs - cx).abs() > w / 2 + 0.25) | ((ys - cy).abs() > h / 2 + 0.25)
        assert float(rpb[:, slot, inside].abs().max()) < 1e-5  # no bias inside the box
        assert float(rpb[:, slot, far.flatten()].max()) < -4.0  # far outside: strongly suppressed
    plain = build_start_model(ModelConfig(init="preset", preset="tiny", init_weights="fan_in")).model
    plain_refs = plain.grounding_model.detr_decoder.reference_points.weight.detach().sigmoid()
    assert float((plain_refs - 0.5).abs().max()) < 0.1  # what the prior replaces: every slot at the centre


def test_head_options_build_the_preset_with_them_and_the_same_weights():
    normed = build_start_model(ModelConfig(init="preset", preset="tiny", init_weights="fan_in", seed=2,
                                           fusion_output_norm=True, head_dropout=0.0))
    plain = build_start_model(ModelConfig(init="preset", preset="tiny", init_weights="fan_in", seed=2))
    assert normed.model.config.fusion_output_norm and not plain.model.config.fusion_output_norm
    assert normed.model.config.fusion_norm_scope == "all"
    scoped = build_start_model(ModelConfig(init="preset", preset="tiny", fusion_output_norm=True,
                                           fusion_norm_scope="decoder"))
    assert scoped.model.config.fusion_norm_scope == "decoder"
    assert max(_dropouts(normed.model)) == 0.0 and max(_dropouts(plain.model)) == 0.1
    for (name, p), q in zip(normed.model.named_parameters(), plain.model.parameters()):
        assert torch.equal(p, q), name  # an option of the forward pass, not of the weights
    assert len(normed.tokenizer) == len(plain.tokenizer)
    small = build_start_model(ModelConfig(init="preset", preset="small", fusion_output_norm=True))
    assert len(small.tokenizer) == len(build_model("small", device="cpu").tokenizer)  # the world's vocabulary


def _dropouts(model) -> set[float]:
    head = model.grounding_model
    return {m.p for part in (head.detr_encoder, head.detr_decoder, head.dot_product_scoring)
            for m in part.modules() if isinstance(m, torch.nn.Dropout)}


def test_head_options_warm_start_a_trained_checkpoint_and_reach_its_next_checkpoint(tmp_path):
    trained = build_model("tiny", device="cpu", seed=4)
    save_checkpoint(trained.model, trained.tokenizer, tmp_path / "trained")
    start = ModelConfig(init="checkpoint", checkpoint=str(tmp_path / "trained"), fusion_output_norm=True,
                        head_dropout=0.0, box_prior=8.0, phrase_source="hidden_states_and_embeddings",
                        fusion_image_skip=True)
    warm = build_start_model(start).model
    assert warm.config.fusion_output_norm and max(_dropouts(warm)) == 0.0
    assert warm.config.fusion_image_skip and not trained.model.config.fusion_image_skip
    assert trained.model.config.phrase_source == "token_embeddings"
    assert warm.config.phrase_source == "hidden_states_and_embeddings"
    refs = warm.grounding_model.detr_decoder.reference_points.weight.detach().sigmoid()
    assert float(refs[:, 0].std()) > 0.1  # the slots' boxes spread over the image
    before = dict(trained.model.named_parameters())
    changed = {name for name, p in warm.named_parameters() if not torch.equal(p, before[name])}
    assert changed and all("detr_decoder" in name for name in changed), changed  # only the prior's modules
    # What the warm start trains on is what its checkpoints hold, so inference runs it too.
    save_checkpoint(warm, build_model("tiny", device="cpu").tokenizer, tmp_path / "warm")
    again = build_model(tmp_path / "warm", device="cpu").model
    assert again.config.fusion_output_norm and max(_dropouts(again)) == 0.0
    assert again.config.phrase_source == "hidden_states_and_embeddings" and again.config.fusion_image_skip
    # Unset, every option keeps the checkpoint's own.
    kept = build_start_model(ModelConfig(init="checkpoint", checkpoint=str(tmp_path / "warm"))).model
    assert kept.config.fusion_output_norm and max(_dropouts(kept)) == 0.0
    assert kept.config.phrase_source == "hidden_states_and_embeddings" and kept.config.fusion_image_skip
    assert max(_dropouts(build_start_model(ModelConfig(init="checkpoint",
                                                       checkpoint=str(tmp_path / "trained"))).model)) == 0.1


def test_bad_preset_options_are_config_errors():
    with pytest.raises(ConfigError, match="head_dropout must be in"):
        build_start_model(ModelConfig(init="preset", preset="tiny", head_dropout=1.5))
    with pytest.raises(ConfigError, match="fusion_norm_scope must be one of"):
        build_start_model(ModelConfig(init="preset", preset="tiny", fusion_norm_scope="pixels"))
    with pytest.raises(ConfigError, match="phrase_source must be one of"):
        build_start_model(ModelConfig(init="preset", preset="tiny", phrase_source="pixels"))
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        build_start_model(ModelConfig(init="preset", preset="huge"))
    with pytest.raises(ConfigError, match="applies to model.init 'preset' only"):
        build_start_model(ModelConfig(init="checkpoint", checkpoint="anywhere", init_weights="fan_in"))


def test_fusion_layers_deepen_the_presets_fusion_encoder_and_its_checkpoints_keep_the_depth(tmp_path):
    from training.config import TrainConfig
    from training.train import parameter_counts

    plain = build_start_model(ModelConfig(init="preset", preset="tiny", seed=1))
    deep = build_start_model(ModelConfig(init="preset", preset="tiny", seed=1, fusion_layers=3))
    assert len(deep.model.grounding_model.detr_encoder.layers) == 3
    assert len(plain.model.grounding_model.detr_encoder.layers) != 3
    added = sum(p.numel() for p in deep.model.parameters()) - sum(p.numel() for p in plain.model.parameters())
    per_layer = sum(p.numel() for p in plain.model.grounding_model.detr_encoder.layers[0].parameters())
    assert added == per_layer * (3 - len(plain.model.grounding_model.detr_encoder.layers))
    # Counted on the meta device as built: the training log's parameter table is the run's.
    counted = parameter_counts(TrainConfig(model=ModelConfig(init="preset", preset="tiny", fusion_layers=3)))
    baseline = parameter_counts(TrainConfig(model=ModelConfig(init="preset", preset="tiny")))
    assert counted["mask_decoder"] - baseline["mask_decoder"] == added
    save_checkpoint(deep.model, deep.tokenizer, tmp_path / "deep")
    again = build_start_model(ModelConfig(init="checkpoint", checkpoint=str(tmp_path / "deep"))).model
    assert len(again.grounding_model.detr_encoder.layers) == 3
    with pytest.raises(ConfigError, match="fusion_layers changes the architecture"):
        build_start_model(ModelConfig(init="checkpoint", checkpoint=str(tmp_path / "deep"), fusion_layers=2))
    with pytest.raises(ConfigError, match="fusion_layers must be at least 1"):
        build_start_model(ModelConfig(init="preset", preset="tiny", fusion_layers=0))


def test_fusion_ffn_widens_only_the_fusion_encoder_and_its_checkpoints_keep_the_width(tmp_path):
    plain = build_start_model(ModelConfig(init="preset", preset="tiny", seed=1)).model
    wide = build_start_model(ModelConfig(init="preset", preset="tiny", seed=1, fusion_ffn=96)).model
    for layer in wide.grounding_model.detr_encoder.layers:
        assert (layer.mlp.fc1.out_features, layer.mlp.fc2.in_features) == (96, 96)
    assert plain.grounding_model.detr_encoder.layers[0].mlp.fc1.out_features != 96
    # The decoder and every other part keep the preset's width: only the encoder's MLPs grow.
    plain_sizes = {name: p.shape for name, p in plain.named_parameters()}
    changed = {name for name, p in wide.named_parameters() if plain_sizes[name] != p.shape}
    assert changed and all(name.startswith("grounding_model.detr_encoder.") and ".mlp.fc" in name for name in changed)
    save_checkpoint(wide, build_start_model(ModelConfig(init="preset", preset="tiny")).tokenizer, tmp_path / "wide")
    again = build_start_model(ModelConfig(init="checkpoint", checkpoint=str(tmp_path / "wide"))).model
    assert again.grounding_model.detr_encoder.layers[0].mlp.fc1.out_features == 96
    with pytest.raises(ConfigError, match="fusion_ffn changes the architecture"):
        build_start_model(ModelConfig(init="checkpoint", checkpoint=str(tmp_path / "wide"), fusion_ffn=128))
    with pytest.raises(ConfigError, match="fusion_ffn must be at least 1"):
        build_start_model(ModelConfig(init="preset", preset="tiny", fusion_ffn=0))
