"""SAM3 driven through our external-query path equals stock SAM3."""

import pytest
import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from instructsam_core.config import InstructSamConfig, preset
from instructsam_core.model.sam3_head import PRESENCE_MODULES, build_sam3, run_head


def _inputs(batch=2, prompt_len=5, width=32, device="cpu"):
    torch.manual_seed(1)
    pixels = torch.randn(batch, 3, 112, 112)
    prompt = torch.randn(batch, prompt_len, width)
    mask = torch.ones(batch, prompt_len, dtype=torch.bool)
    mask[0, 3:] = False  # a padded prompt
    return pixels.to(device), prompt.to(device), mask.to(device)


def test_own_queries_with_presence_equal_sam3_forward_exactly(device):
    torch.manual_seed(0)
    sam3 = build_sam3(preset("tiny").sam3, num_queries=4, use_presence=True).eval().to(device)
    pixels, prompt, mask = _inputs(device=device)
    with torch.no_grad():
        vision = sam3.get_vision_features(pixel_values=pixels)
        ref = sam3(vision_embeds=vision, text_embeds=BaseModelOutputWithPooling(pooler_output=prompt),
                   attention_mask=mask.long())
        ours = run_head(sam3, vision.fpn_hidden_states, vision.fpn_position_encoding, prompt, mask,
                        queries=None, use_presence=True)
    assert torch.equal(ours.mask_logits, ref.pred_masks)
    assert torch.equal(ours.logits, ref.pred_logits)
    assert torch.equal(ours.boxes, ref.pred_boxes)
    assert torch.equal(ours.presence_logits, ref.presence_logits)


def _tiny_head_and_features():
    """A seeded tiny SAM3 without the presence token, a batch of two prompts (one padded)
    and the vision features of their images."""
    torch.manual_seed(0)
    sam3 = build_sam3(preset("tiny").sam3, num_queries=4, use_presence=False).eval()
    pixels, prompt, mask = _inputs()
    with torch.no_grad():
        vision = sam3.get_vision_features(pixel_values=pixels)
    return sam3, vision, prompt, mask


def test_external_queries_drive_the_slots():
    sam3, vision, prompt, mask = _tiny_head_and_features()
    with torch.no_grad():
        queries = torch.randn(2, 4, 32)
        a = run_head(sam3, vision.fpn_hidden_states, vision.fpn_position_encoding, prompt, mask, queries, False)
        queries2 = queries.clone()
        queries2[:, 2] += 1.0
        b = run_head(sam3, vision.fpn_hidden_states, vision.fpn_position_encoding, prompt, mask, queries2, False)
    assert a.presence_logits is None
    assert a.mask_logits.shape == (2, 4, 32, 32)
    assert not torch.allclose(a.mask_logits[:, 2], b.mask_logits[:, 2])
    torch.testing.assert_close(a.scores(), a.logits.sigmoid())


def test_released_sam3_has_no_presence_token_and_no_clip():
    sam3 = build_sam3(preset("tiny").sam3, num_queries=4, use_presence=False)
    keys = list(sam3.state_dict())
    assert not [k for k in keys if k.startswith("text_encoder.")]
    assert not [k for k in keys if any(m in k for m in PRESENCE_MODULES)]
    assert "text_projection.weight" in keys
    assert sam3.detr_decoder.query_embed.weight.shape[0] == 4


def test_prompt_padding_is_ignored():
    torch.manual_seed(0)
    sam3 = build_sam3(preset("tiny").sam3, num_queries=4, use_presence=False).eval()
    pixels, prompt, mask = _inputs(batch=1)
    mask[0, 3:] = False
    changed = prompt.clone()
    changed[0, 3:] = 100.0  # garbage in padded positions
    with torch.no_grad():
        vision = sam3.get_vision_features(pixel_values=pixels)
        q = torch.randn(1, 4, 32)
        a = run_head(sam3, vision.fpn_hidden_states, vision.fpn_position_encoding, prompt, mask, q, False)
        b = run_head(sam3, vision.fpn_hidden_states, vision.fpn_position_encoding, changed, mask, q, False)
    torch.testing.assert_close(a.mask_logits, b.mask_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=1e-5)


def _values_read_by_the_first_decoder_layer(sam3, run):
    """The keys/values the first decoder layer's text and image cross-attentions read."""
    seen = {}
    layer = sam3.detr_decoder.layers[0]

    def keep(name):
        def hook(module, args, kwargs):
            seen[name] = kwargs["value"].detach()
        return hook

    handles = [layer.text_cross_attn.register_forward_pre_hook(keep("prompt"), with_kwargs=True),
               layer.vision_cross_attn.register_forward_pre_hook(keep("image"), with_kwargs=True)]
    try:
        out = run()
    finally:
        for handle in handles:
            handle.remove()
    return out, seen


def test_fusion_output_norm_feeds_the_decoder_unit_scale_tokens():
    sam3, vision, prompt, mask = _tiny_head_and_features()
    with torch.no_grad():
        queries = torch.randn(2, 4, 32)

        def run(norm):
            return lambda: run_head(sam3, vision.fpn_hidden_states, vision.fpn_position_encoding, prompt * 30,
                                    mask, queries, False, fusion_output_norm=norm)

        plain, plain_seen = _values_read_by_the_first_decoder_layer(sam3, run(False))
        normed, normed_seen = _values_read_by_the_first_decoder_layer(sam3, run(True))
    for name in ("image", "prompt"):
        tokens = normed_seen[name]
        if name == "prompt":
            tokens = tokens[mask]  # padded prompt tokens are masked out of the attention
        torch.testing.assert_close(tokens.mean(-1), torch.zeros(tokens.shape[:-1]), atol=1e-5, rtol=0)
        torch.testing.assert_close(tokens.var(-1, unbiased=False), torch.ones(tokens.shape[:-1]), atol=1e-3, rtol=0)
        # off: the decoder reads the encoder's own scale (here about 0.2 for the image, 30 for the prompt)
        assert abs(float(plain_seen[name].std()) - 1.0) > 0.5, name
    assert not torch.allclose(plain.mask_logits, normed.mask_logits)
    assert normed.layer_states.shape == (2, len(sam3.detr_decoder.layers), 4, 32)
    # the head hands out what the DETR decoder read (training's object-colour target reads it)
    torch.testing.assert_close(normed.fusion_tokens, normed_seen["image"])
    torch.testing.assert_close(plain.fusion_tokens, plain_seen["image"])


def _keep_mask_decoder_tokens(sam3, seen: dict, key: str):
    """Keep the image tokens the mask decoder reads in `seen[key]` (each call overwrites
    them); the hook's handle, to remove."""
    return sam3.mask_decoder.register_forward_pre_hook(
        lambda module, args, kwargs: seen.__setitem__(key, kwargs["encoder_hidden_states"].detach()),
        with_kwargs=True)


def test_the_decoder_scope_leaves_the_mask_decoder_the_encoders_own_tokens():
    sam3, vision, prompt, mask = _tiny_head_and_features()
    seen = {}
    handle = _keep_mask_decoder_tokens(sam3, seen, "tokens")
    queries = torch.randn(2, 4, 32)
    try:
        with torch.no_grad():
            def run(**options):
                return lambda: run_head(sam3, vision.fpn_hidden_states, vision.fpn_position_encoding, prompt * 30,
                                        mask, queries, False, **options)

            _, plain_seen = _values_read_by_the_first_decoder_layer(sam3, run(fusion_output_norm=False))
            raw = seen["tokens"]
            _, scoped_seen = _values_read_by_the_first_decoder_layer(
                sam3, run(fusion_output_norm=True, fusion_norm_scope="decoder"))
            scoped = seen["tokens"]
            run(fusion_output_norm=True, fusion_norm_scope="all")()
            normed = seen["tokens"]
            with pytest.raises(ValueError, match="fusion_norm_scope"):
                run(fusion_output_norm=True, fusion_norm_scope="pixels")()
    finally:
        handle.remove()
    torch.testing.assert_close(scoped, raw)  # the mask decoder reads the encoder's own scale ...
    torch.testing.assert_close(normed.var(-1, unbiased=False), torch.ones(normed.shape[:-1]), atol=1e-3, rtol=0)
    image = scoped_seen["image"]  # ... while the DETR decoder still reads unit-scale tokens
    torch.testing.assert_close(image.var(-1, unbiased=False), torch.ones(image.shape[:-1]), atol=1e-3, rtol=0)
    assert abs(float(plain_seen["image"].std()) - 1.0) > 0.5
    with pytest.raises(ValueError, match="fusion_norm_scope must be one of"):
        InstructSamConfig(fusion_norm_scope="pixels")


def test_the_fusion_image_skip_gives_both_decoders_the_encoders_input_beside_its_output():
    sam3, vision, prompt, mask = _tiny_head_and_features()
    seen = {}
    handle = _keep_mask_decoder_tokens(sam3, seen, "mask_decoder")
    queries = torch.randn(2, 4, 32)
    level = vision.fpn_hidden_states[-2]  # the level the fusion encoder reads (run_head drops the last)
    try:
        with torch.no_grad():
            encoded = sam3.detr_encoder(vision_features=[level], text_features=prompt,
                                        vision_pos_embeds=[vision.fpn_position_encoding[-2]], text_mask=mask)

            def run(skip):
                return lambda: run_head(sam3, vision.fpn_hidden_states, vision.fpn_position_encoding, prompt,
                                        mask, queries, False, fusion_image_skip=skip)

            plain, plain_seen = _values_read_by_the_first_decoder_layer(sam3, run(False))
            plain_mask_decoder = seen["mask_decoder"]
            skipped, skip_seen = _values_read_by_the_first_decoder_layer(sam3, run(True))
    finally:
        handle.remove()
    expected = encoded.last_hidden_state + level.flatten(2).transpose(1, 2)
    torch.testing.assert_close(plain_seen["image"], encoded.last_hidden_state)
    torch.testing.assert_close(plain_mask_decoder, encoded.last_hidden_state)
    torch.testing.assert_close(skip_seen["image"], expected)  # the DETR decoder ...
    torch.testing.assert_close(skipped.fusion_tokens, expected)  # (and what the head hands out)
    torch.testing.assert_close(seen["mask_decoder"], expected)  # ... and the mask decoder
    torch.testing.assert_close(skip_seen["prompt"], plain_seen["prompt"])  # the prompt tokens as before
    assert not torch.allclose(plain.mask_logits, skipped.mask_logits)
