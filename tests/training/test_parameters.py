"""What trains: the release's parameter groups (2B counts on the meta device), LoRA and its merge."""

from __future__ import annotations

import torch

from instructsam_core.build import build_model
from training.config import ModelConfig
from training.parameters import apply_lora, detailed_counts, group_counts, lora_layers, merge_lora, set_trainable


def test_2b_group_counts_on_the_meta_device():
    model = build_model("2b", device="meta").model
    apply_lora(model, ModelConfig())
    parts = detailed_counts(model)
    assert parts["llm: LoRA"] == 25_690_112  # r 64 on q/k/v/o of 28 layers
    assert parts["mask_decoder: mask_hidden_fcs"] == parts["mask_decoder: text_hidden_fcs"] == 4_720_896
    assert parts["mask_decoder: mask_queries"] == 20_480
    assert parts["llm: embed_tokens"] == 311_164_928  # lm_head is tied in Qwen3-VL-2B: counted once
    assert "llm: lm_head (untied)" not in parts
    assert parts["projector: merger"] == 25_174_016  # LayerNorm(1024) + 4096x4096 + 4096x2048, with biases
    sam3 = sum(v for k, v in parts.items() if k.startswith("mask_decoder: SAM3"))
    assert sam3 == 32_693_309  # fusion encoder, DETR decoder, mask decoder, scoring, geometry encoder, text_projection
    counts = group_counts(model)
    assert counts["mask_decoder"] == 32_693_309 + 2 * 4_720_896 + 20_480 == 42_155_581
    assert counts["llm"] == 25_690_112 + 311_164_928


def test_frozen_parts_are_the_vision_towers_and_the_llm_weights():
    model = build_model("tiny", device="cpu").model
    apply_lora(model, ModelConfig(lora_r=4))
    set_trainable(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith("grounding_model.vision_encoder.") for n in trainable)
    assert not any(n.startswith("vlm.model.visual.blocks.") or "deepstack_merger" in n for n in trainable)
    assert not any(n.endswith("q_proj.base_layer.weight") for n in trainable)
    assert {"mask_queries", "vlm.model.language_model.embed_tokens.weight"} <= trainable
    assert any(".lora_A." in n for n in trainable) and any(n.startswith("vlm.model.visual.merger.") for n in trainable)


def test_merging_lora_keeps_the_outputs_and_restores_the_released_layout(tiny_tester):
    from instructsam_core.checkpoint import released_state_dict

    built = build_model("tiny", device="cpu", seed=0)
    model, tok = built.model, built.tokenizer
    keys_before = set(released_state_dict(model))
    apply_lora(model, ModelConfig(lora_r=4, lora_dropout=0.0))
    torch.manual_seed(1)
    for _, _, layer in lora_layers(model):  # LoRA B starts at zero: give it weight, so merging matters
        torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.5)
    model.eval()
    inputs = tiny_tester.prepare_inputs(model, tok)
    ids = torch.tensor([inputs.prompt_ids + inputs.answer_ids])
    with torch.no_grad():
        before = model(ids, None, [inputs.vision]).text_logits
        assert merge_lora(model) == 8  # q/k/v/o of two layers
        after = model(ids, None, [inputs.vision]).text_logits
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)
    assert set(released_state_dict(model)) == keys_before and not lora_layers(model)


def test_the_vision_towers_train_only_when_asked():
    model = build_model("tiny", device="cpu").model
    apply_lora(model, ModelConfig(lora_r=4))
    assert group_counts(model)["vision"] == 0  # the release: frozen
    groups = set_trainable(model, vision=True)
    names = {n for n, _ in groups["vision"]}
    assert any(n.startswith("grounding_model.vision_encoder.") for n in names)
    assert any(n.startswith("vlm.model.visual.blocks.") for n in names)
    assert not any(n.startswith("vlm.model.visual.merger.") for n in names)  # the projector group keeps it


def test_activation_checkpointing_switches_on_the_llm_layers():
    from training.train import enable_activation_checkpointing

    model = build_model("tiny", device="cpu").model
    llm = model.vlm.model.language_model
    assert not llm.gradient_checkpointing
    enable_activation_checkpointing(model)
    assert llm.gradient_checkpointing  # the flag transformers' decoder loop reads
