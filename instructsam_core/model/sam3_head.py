"""SAM3's detector driven by external instance queries and external prompt features.

The stock `Sam3Model.forward` always decodes its own learned queries and takes prompt
features from its CLIP text encoder. InstructSAM replaces both: the K query slots come
from the LLM, the prompt from the target phrase. This module runs SAM3's own submodules
(fusion encoder, decoder layers, box head, dot-product scoring, mask decoder) in the same
order as `Sam3Model.forward`, with those two inputs swapped in. Nothing is forked: every
weight lives in the stock modules, so checkpoints keep transformers' key names.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Sam3Config, Sam3Model
from transformers.masking_utils import create_bidirectional_mask
from transformers.models.sam3.modeling_sam3 import box_cxcywh_to_xyxy, inverse_sigmoid

from ..outputs import HeadOutput

PRESENCE_MODULES = ("presence_token", "presence_head", "presence_layer_norm")


def build_sam3(sam3_config: dict, num_queries: int, use_presence: bool) -> Sam3Model:
    """A stock `Sam3Model` shaped as InstructSAM uses it.

    The DETR decoder gets `num_queries` slots; the CLIP text encoder is removed (its
    `text_projection` stays, as in the released checkpoint); without `use_presence` the
    presence token's modules are removed too, so the parameter set matches the release.
    """
    config = Sam3Config(**sam3_config) if sam3_config else Sam3Config()
    config.detr_decoder_config.num_queries = num_queries
    # Build CLIP as small as possible before throwing it away; its hidden size must stay,
    # since text_projection (kept) is sized by it.
    text = config.text_config
    text.num_hidden_layers, text.intermediate_size, text.vocab_size = 1, 8, 8
    text.bos_token_id = text.eos_token_id = text.pad_token_id = 0
    model = Sam3Model(config)
    del model.text_encoder
    if not use_presence:
        for name in PRESENCE_MODULES:
            delattr(model.detr_decoder, name)
    return model


def _decoder_layer(
    layer: nn.Module,
    hidden: torch.Tensor,
    query_pos: torch.Tensor,
    text_features: torch.Tensor,
    vision_features: torch.Tensor,
    vision_pos: torch.Tensor,
    text_attn_mask: torch.Tensor | None,
    vision_attn_mask: torch.Tensor | None,
) -> torch.Tensor:
    """One `Sam3DetrDecoderLayer` step without its built-in presence-row padding of `query_pos`.

    The stock layer always prepends a zero row to `query_pos` for the presence token; the
    caller pads it here when a presence token is present, so both cases share one path.
    """
    residual = hidden
    q = hidden + query_pos
    out, _ = layer.self_attn(query=q, key=q, value=hidden, attention_mask=None)
    hidden = layer.self_attn_layer_norm(residual + layer.self_attn_dropout(out))

    residual = hidden
    out, _ = layer.text_cross_attn(query=hidden + query_pos, key=text_features, value=text_features,
                                   attention_mask=text_attn_mask)
    hidden = layer.text_cross_attn_layer_norm(residual + layer.text_cross_attn_dropout(out))

    residual = hidden
    out, _ = layer.vision_cross_attn(query=hidden + query_pos, key=vision_features + vision_pos,
                                     value=vision_features, attention_mask=vision_attn_mask)
    hidden = layer.vision_cross_attn_layer_norm(residual + layer.vision_cross_attn_dropout(out))

    residual = hidden
    hidden = layer.mlp_layer_norm(residual + layer.mlp_dropout(layer.mlp(hidden)))
    return hidden


def decode_queries(
    decoder: nn.Module,
    queries: torch.Tensor,
    vision_features: torch.Tensor,
    vision_pos: torch.Tensor,
    text_features: torch.Tensor,
    text_mask: torch.Tensor | None,
    spatial_shape: tuple[int, int],
    use_presence: bool,
    reference_boxes: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Run SAM3's DETR decoder on external queries.

    Arguments:
        decoder: the stock `Sam3DetrDecoder` (its layers, heads and learned reference boxes).
        queries: `(B, K, D)` query contents (replacing `decoder.query_embed`).
        vision_features, vision_pos: `(B, HW, D)` fused image tokens and their positions.
        text_features: `(B, L, D)` prompt tokens after the fusion encoder.
        text_mask: `(B, L)` bool, True = valid prompt token.
        spatial_shape: `(h, w)` of the feature map, for the box relative position bias (plain
            ints: as tensors they would cost a host sync per layer and break compiled graphs).
        use_presence: prepend the learned presence token, as stock SAM3 does.
        reference_boxes: `(B, K, 4)` cxcywh boxes in (0, 1) the slots start from, in place
            of the decoder's learned ones (training's denoising queries start from noised
            ground-truth boxes); None = the learned boxes, as inference always runs.

    Returns:
        hidden: `(B, K, D)` normalised last-layer query states.
        layer_boxes: `(B, L, K, 4)` each layer's cxcywh box prediction (the reference
            boxes refined by the box head; the last one is the decoder's answer).
        presence_logits: `(B, 1)` last-layer presence logits, or None.
        layer_states: `(B, L, K, D)` each layer's normalised query states (what its box
            head reads; the last one is `hidden`).
    """
    B, K, _ = queries.shape
    if reference_boxes is None:
        ref_boxes = decoder.reference_points.weight[:K].unsqueeze(0).expand(B, -1, -1).sigmoid()
    else:
        if reference_boxes.shape != (B, K, 4):
            raise ValueError(f"reference_boxes must be {(B, K, 4)}, got {tuple(reference_boxes.shape)}")
        ref_boxes = reference_boxes.to(queries.dtype)
    hidden = queries
    if use_presence:
        hidden = torch.cat([decoder.presence_token.weight.unsqueeze(0).expand(B, -1, -1), hidden], dim=1)
    text_attn_mask = None
    if text_mask is not None:
        text_attn_mask = create_bidirectional_mask(decoder.config, hidden, text_mask,
                                                   encoder_hidden_states=text_features)
    pad = 1 if use_presence else 0
    presence_logits = None
    layer_boxes, layer_states = [], []
    for layer in decoder.layers:
        query_pos = decoder.ref_point_head(decoder.position_encoding.encode_boxes(ref_boxes))  # (B, K, D)
        rpb = decoder._get_rpb_matrix(ref_boxes, spatial_shape)  # (B, h, K, HW)
        if pad:
            query_pos = F.pad(query_pos, (0, 0, pad, 0))
            rpb = F.pad(rpb, (0, 0, pad, 0))
        hidden = _decoder_layer(layer, hidden, query_pos, text_features, vision_features, vision_pos,
                                text_attn_mask, rpb)
        slot_hidden = decoder.output_layer_norm(hidden[:, pad:])
        layer_states.append(slot_hidden)
        # Iterative box refinement; like stock SAM3, no gradient flows through the chain
        # (each layer's prediction trains the box head, the next layer starts from it detached).
        layer_boxes.append((decoder.box_head(slot_hidden) + inverse_sigmoid(ref_boxes)).sigmoid())
        ref_boxes = layer_boxes[-1].detach()
        if use_presence:
            presence_logits = decoder.presence_head(decoder.presence_layer_norm(hidden[:, :1])).squeeze(-1)
            presence_logits = presence_logits.clamp(-decoder.clamp_presence_logit_max_val,
                                                    decoder.clamp_presence_logit_max_val)
    return slot_hidden, torch.stack(layer_boxes, dim=1), presence_logits, torch.stack(layer_states, dim=1)


def run_head(
    sam3: Sam3Model,
    fpn_hidden_states: tuple[torch.Tensor, ...],
    fpn_position_encoding: tuple[torch.Tensor, ...],
    prompt: torch.Tensor,
    prompt_mask: torch.Tensor | None,
    queries: torch.Tensor | None,
    use_presence: bool,
    reference_boxes: torch.Tensor | None = None,
    fusion_output_norm: bool = False,
    fusion_norm_scope: str = "all",
    fusion_image_skip: bool = False,
) -> HeadOutput:
    """SAM3 from image features to per-slot masks, with external prompt and queries.

    Arguments:
        sam3: the stock model from `build_sam3`.
        fpn_hidden_states, fpn_position_encoding: the vision encoder's FPN levels (all of
            them, as `Sam3VisionEncoderOutput` holds them; the coarsest is dropped here as
            SAM3 does), each `(B, D, h_i, w_i)`.
        prompt: `(B, L, D)` prompt features (replacing CLIP's projected text features).
        prompt_mask: `(B, L)` bool, True = valid token.
        queries: `(B, K, D)` external query contents, or None for SAM3's own learned queries.
        use_presence: decode with SAM3's presence token.
        reference_boxes: the slots' starting boxes (see `decode_queries`); None = learned.
        fusion_output_norm: layer-normalise the fusion encoder's image and prompt tokens
            before anything reads them (`InstructSamConfig.fusion_output_norm`).
        fusion_norm_scope: "all", or "decoder" for the mask decoder to read the encoder's
            own image tokens (`InstructSamConfig.fusion_norm_scope`).
        fusion_image_skip: add the fusion encoder's input image tokens to its output before
            the decoders read them (`InstructSamConfig.fusion_image_skip`).
    """
    fpn = fpn_hidden_states[:-1]
    fpn_pos = fpn_position_encoding[:-1]
    encoded = sam3.detr_encoder(vision_features=[fpn[-1]], text_features=prompt,
                                vision_pos_embeds=[fpn_pos[-1]], text_mask=prompt_mask)
    image_tokens, prompt_tokens = encoded.last_hidden_state, encoded.text_features
    if fusion_image_skip:
        # The encoder flattens its image level as (B, h*w, D), in this order.
        image_tokens = image_tokens + fpn[-1].flatten(2).transpose(1, 2)
    mask_decoder_tokens = image_tokens
    if fusion_output_norm:
        image_tokens = F.layer_norm(image_tokens, image_tokens.shape[-1:])
        prompt_tokens = F.layer_norm(prompt_tokens, prompt_tokens.shape[-1:])
        if fusion_norm_scope == "all":
            mask_decoder_tokens = image_tokens
        elif fusion_norm_scope != "decoder":
            raise ValueError(f"fusion_norm_scope must be 'all' or 'decoder', got {fusion_norm_scope!r}")
    decoder = sam3.detr_decoder
    if queries is None:
        queries = decoder.query_embed.weight.unsqueeze(0).expand(prompt.shape[0], -1, -1)
    hidden, layer_boxes, presence_logits, layer_states = decode_queries(
        decoder, queries, image_tokens, encoded.pos_embeds_flattened, prompt_tokens,
        prompt_mask, tuple(fpn[-1].shape[-2:]), use_presence, reference_boxes)
    layer_boxes = box_cxcywh_to_xyxy(layer_boxes)
    logits = sam3.dot_product_scoring(decoder_hidden_states=hidden[None], text_features=prompt_tokens,
                                      text_mask=prompt_mask)[0, ..., 0]  # (B, K)
    masks = sam3.mask_decoder(decoder_queries=hidden, backbone_features=list(fpn),
                              encoder_hidden_states=mask_decoder_tokens,
                              prompt_features=prompt, prompt_mask=prompt_mask)
    return HeadOutput(mask_logits=masks.pred_masks, logits=logits, boxes=layer_boxes[:, -1],
                      presence_logits=presence_logits, layer_boxes=layer_boxes,
                      semantic_logits=masks.semantic_seg[:, 0], layer_states=layer_states,
                      fusion_tokens=image_tokens)
