"""InstructSAM: Qwen3-VL with a bank of K learnable instance queries, projected into SAM3.

Composition, not inheritance: a stock `Qwen3VLForConditionalGeneration` and a stock
`Sam3Model` (see `sam3_head.build_sam3`) sit side by side with the InstructSAM parts:

- `mask_queries` `(K, H)`: the query bank, written over the input embeddings at the K
  `[SEG]` positions of `<|mask_start|>[SEG]xK<|mask_end|>`;
- `mask_hidden_fcs`: MLP from the LLM's last hidden states at those positions to SAM3's
  DETR query space;
- `text_hidden_fcs`: MLP from phrase features (token embeddings or hidden states of
  `<|object_ref_start|>phrase<|object_ref_end|>`) to SAM3's prompt space.

Attribute names follow the released checkpoint so that `checkpoint.py` maps keys by prefix.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

from ..config import InstructSamConfig
from ..tokens import TokenIds
from .attention import as_attention_bias, hybrid_attention_mask
from .positions import mrope_positions
from .sam3_head import HeadOutput, build_sam3, run_head


@dataclass
class VisionTokens:
    """Qwen3-VL vision tower output for one image (cached per frame).

    Attributes:
        embeds: `(N, H)` merged vision tokens, N = t * (h / 2) * (w / 2).
        deepstack: per deepstack layer, `(N, H)` features added to early LLM layers.
        grid_thw: `(t, h, w)` patch grid before merging.
    """

    embeds: torch.Tensor
    deepstack: list[torch.Tensor]
    grid_thw: tuple[int, int, int]


@dataclass
class SamFeatures:
    """SAM3 vision encoder FPN levels for a batch of images, each `(B, D, h_i, w_i)`."""

    fpn_hidden_states: tuple[torch.Tensor, ...]
    fpn_position_encoding: tuple[torch.Tensor, ...]

    def take(self, index: torch.Tensor) -> "SamFeatures":
        """Features of the images at `index` (repeats allowed), one row per entry."""
        return SamFeatures(tuple(f[index] for f in self.fpn_hidden_states),
                           tuple(p[index] for p in self.fpn_position_encoding))

    @staticmethod
    def cat(features: list["SamFeatures"]) -> "SamFeatures":
        """Stack the rows of several feature sets, in order."""
        return SamFeatures(tuple(torch.cat(level) for level in zip(*(f.fpn_hidden_states for f in features))),
                           tuple(torch.cat(level) for level in zip(*(f.fpn_position_encoding for f in features))))


@dataclass
class PhraseBlocks:
    """The query blocks of a batch of sequences, one per `[SEG]xK` run.

    Attributes:
        batch_index: `(P,)` row of each block.
        seg_positions: `(P, K)` positions of the K queries.
        phrase_positions: `(P, T)` positions of `<ref_start> phrase <ref_end>` (padded with 0).
        phrase_mask: `(P, T)` bool, True for real phrase positions.
    """

    batch_index: torch.Tensor
    seg_positions: torch.Tensor
    phrase_positions: torch.Tensor
    phrase_mask: torch.Tensor

    def __len__(self) -> int:
        return int(self.batch_index.shape[0])


@dataclass
class InstructSamOutput:
    """Training/teacher-forced forward output.

    Attributes:
        text_logits: `(B, L, V)` next-token logits.
        blocks: where each query block sits in the batch.
        head: per-block SAM3 predictions, `(P, K, ...)` (see `HeadOutput`).
    """

    text_logits: torch.Tensor
    blocks: PhraseBlocks
    head: HeadOutput | None = None
    extras: dict = field(default_factory=dict)


def _projector(in_dim: int, out_dim: int) -> nn.Sequential:
    # Indices 0 and 2 hold the weights, as in the released checkpoint.
    return nn.Sequential(nn.Linear(in_dim, in_dim), nn.ReLU(inplace=True), nn.Linear(in_dim, out_dim), nn.Dropout(0.0))


def find_phrase_blocks(input_ids: torch.Tensor, ids: TokenIds, num_queries: int, max_phrase_tokens: int) -> PhraseBlocks:
    """Locate every `[SEG]xK` run and the `<ref_start> phrase <ref_end>` span before it.

    Raises ValueError when a run is not exactly K long or has no phrase before it, naming
    the row and the position, as `get_placeholder_mask` does for image tokens.
    """
    batch_index, seg_positions, phrase_positions, phrase_masks = [], [], [], []
    for b, row in enumerate(input_ids.tolist()):
        pos = 0
        while pos < len(row):
            if row[pos] != ids.seg:
                pos += 1
                continue
            end = pos
            while end < len(row) and row[end] == ids.seg:
                end += 1
            if end - pos != num_queries:
                raise ValueError(f"row {b}: a run of {end - pos} [SEG] tokens at position {pos}; "
                                 f"the model has {num_queries} query slots")
            ref_end = max((i for i in range(pos) if row[i] == ids.ref_end), default=-1)
            ref_start = max((i for i in range(ref_end) if row[i] == ids.ref_start), default=-1)
            if ref_start < 0:
                raise ValueError(f"row {b}: the [SEG] run at position {pos} has no "
                                 f"<|object_ref_start|>phrase<|object_ref_end|> before it")
            span = list(range(ref_start, ref_end + 1))[:max_phrase_tokens]
            batch_index.append(b)
            seg_positions.append(list(range(pos, end)))
            phrase_positions.append(span + [0] * (max_phrase_tokens - len(span)))
            phrase_masks.append([True] * len(span) + [False] * (max_phrase_tokens - len(span)))
            pos = end
    device = input_ids.device
    k = num_queries
    return PhraseBlocks(
        batch_index=torch.tensor(batch_index, dtype=torch.long, device=device),
        seg_positions=torch.tensor(seg_positions, dtype=torch.long, device=device).reshape(-1, k),
        phrase_positions=torch.tensor(phrase_positions, dtype=torch.long, device=device).reshape(-1, max_phrase_tokens),
        phrase_mask=torch.tensor(phrase_masks, dtype=torch.bool, device=device).reshape(-1, max_phrase_tokens),
    )


class InstructSam(nn.Module):
    """The InstructSAM model. Build it with `instructsam_core.build` (the only constructor path).

    Arguments:
        config: the model configuration (nested Qwen3-VL and SAM3 configs included).
        token_ids: ids of the special tokens, from the tokenizer that goes with the weights.
    """

    def __init__(self, config: InstructSamConfig, token_ids: TokenIds):
        super().__init__()
        self.config = config
        self.token_ids = token_ids
        vlm_config = Qwen3VLConfig(**config.vlm)
        vlm_config._attn_implementation = "sdpa"
        vlm_config.text_config._attn_implementation = "sdpa"
        vlm_config.vision_config._attn_implementation = "sdpa"
        self.vlm = Qwen3VLForConditionalGeneration(vlm_config)
        hidden = vlm_config.text_config.hidden_size
        k = config.num_queries
        # The release zero-initialises the bank before stage 1 (see build.from_base_models);
        # a fresh model gets small random slots so that an untrained model's slots differ.
        self.mask_queries = nn.Parameter(torch.randn(k, hidden) * 0.02)
        self.mask_hidden_fcs = nn.ModuleList([_projector(hidden, config.out_dim)])
        self.text_hidden_fcs = nn.ModuleList([_projector(hidden, config.out_dim)])
        self.grounding_model = build_sam3(config.sam3, k, config.use_presence)
        sam_width = self.grounding_model.config.detr_decoder_config.hidden_size
        if sam_width != config.out_dim:
            raise ValueError(f"out_dim {config.out_dim} must equal SAM3's DETR width {sam_width}")

    # ---- pieces -------------------------------------------------------------------

    @property
    def language_model(self) -> nn.Module:
        return self.vlm.model.language_model

    @property
    def attn_implementation(self) -> str:
        return self.vlm.config.text_config._attn_implementation

    def encode_image_vlm(self, pixel_values: torch.Tensor, grid_thw: tuple[int, int, int]) -> VisionTokens:
        """Qwen3-VL vision tower on one image's patches `(N_patches, C*T*P*P)`."""
        return self.encode_images_vlm([pixel_values], [grid_thw])[0]

    def encode_images_vlm(self, pixel_values: list[torch.Tensor], grids: list[tuple[int, int, int]],
                          **grid_inputs) -> list[VisionTokens]:
        """Qwen3-VL vision tower on several images in one call (their patches concatenated).
        `grid_inputs`: what the tower would derive from the grids, precomputed (see
        `backends.compiled`; transformers' vision towers take them as keyword arguments)."""
        visual = self.vlm.model.visual
        device = pixel_values[0].device
        grid = torch.tensor([list(g) for g in grids], dtype=torch.long, device=device)
        out = visual(torch.cat(pixel_values).to(visual.dtype), grid_thw=grid, **grid_inputs)
        if isinstance(out, tuple):  # older transformers return (embeds, deepstack)
            embeds, deepstack = out
        else:
            embeds, deepstack = out.pooler_output, out.deepstack_features
        merge = self.vlm.config.vision_config.spatial_merge_size
        sizes = [t * h * w // merge**2 for t, h, w in grids]
        per_image = zip(torch.split(embeds, sizes), *(torch.split(d, sizes) for d in deepstack))
        return [VisionTokens(embeds=e, deepstack=list(ds), grid_thw=tuple(int(v) for v in g))
                for (e, *ds), g in zip(per_image, grids)]

    def encode_image_sam(self, pixel_values: torch.Tensor) -> SamFeatures:
        """SAM3 vision encoder on `(B, 3, S, S)` normalised images."""
        out = self.grounding_model.get_vision_features(pixel_values=pixel_values.to(self.mask_queries.dtype))
        return SamFeatures(tuple(out.fpn_hidden_states), tuple(out.fpn_position_encoding))

    def embed(self, input_ids: torch.Tensor, vision: list[VisionTokens | None] | None = None,
              ) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor] | None]:
        """Input embeddings with image tokens and query slots written in.

        Returns `(inputs_embeds (B, L, H), visual_pos_mask (B, L) or None, deepstack or None)`.
        """
        ids = self.token_ids
        n_seg, k = int((input_ids == ids.seg).sum()), self.config.num_queries
        if n_seg % k:
            raise ValueError(f"{n_seg} [SEG] tokens is not a multiple of the {k} query slots")
        embeds = self.embed_text(input_ids, n_seg // k)
        is_image = input_ids == ids.image
        n_image = int(is_image.sum())
        if not n_image:
            return embeds, None, None
        tokens = [v for v in (vision or []) if v is not None]
        n_features = sum(v.embeds.shape[0] for v in tokens)
        if n_features != n_image:
            raise ValueError(f"image features and image tokens do not match: {n_image} tokens, "
                             f"{n_features} features")
        image_embeds = torch.cat([v.embeds for v in tokens]).to(embeds.dtype)
        embeds = embeds.masked_scatter(is_image[..., None], image_embeds)
        deepstack = [torch.cat(layer).to(embeds.dtype) for layer in zip(*(v.deepstack for v in tokens))]
        return embeds, is_image, deepstack

    def embed_text(self, input_ids: torch.Tensor, num_blocks: int) -> torch.Tensor:
        """Embeddings of text tokens (no image) holding `num_blocks` query blocks.

        The decode loop's fast path: the caller knows the block count, so nothing is
        counted on the device (no host-device synchronisation per token).
        """
        embeds = self.language_model.embed_tokens(input_ids)
        if num_blocks:
            queries = self.mask_queries.to(embeds.dtype).repeat(num_blocks, 1)
            embeds = embeds.masked_scatter((input_ids == self.token_ids.seg)[..., None], queries)
        return embeds

    def run_language_model(self, inputs_embeds, attention_mask_4d, position_ids, past_key_values=None,
                           visual_pos_mask=None, deepstack=None) -> torch.Tensor:
        """The stock Qwen3-VL text stack with a prepared 4-D mask (None: plain causal);
        returns `(B, L, H)` states."""
        if attention_mask_4d is not None:
            attention_mask_4d = as_attention_bias(attention_mask_4d, self.attn_implementation, inputs_embeds.dtype)
        out = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask_4d,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=past_key_values is not None,
            visual_pos_masks=visual_pos_mask,
            deepstack_visual_embeds=deepstack,
        )
        return out.last_hidden_state

    def phrase_prompt(self, phrase_ids: torch.Tensor, phrase_mask: torch.Tensor,
                      phrase_hidden: torch.Tensor | None = None) -> torch.Tensor:
        """`(P, T, D)` SAM3 prompt from phrase token ids `(P, T)` (or their LLM states `(P, T, H)`)."""
        source = self.config.phrase_source
        if source != "token_embeddings" and phrase_hidden is None:
            raise ValueError(f"phrase_source {source!r} needs the phrase's LLM hidden states")
        if source == "hidden_states":
            features = phrase_hidden
        else:
            features = self.language_model.embed_tokens(phrase_ids)
            if source == "hidden_states_and_embeddings":  # the word itself beside its context, at one scale
                features = phrase_hidden + F.rms_norm(features, features.shape[-1:])
        prompt = self.text_hidden_fcs[0](features)
        return prompt * phrase_mask[..., None].to(prompt.dtype)

    def segment_blocks(self, query_states: torch.Tensor, prompt: torch.Tensor, prompt_mask: torch.Tensor,
                       sam_features: SamFeatures, reference_boxes: torch.Tensor | None = None) -> HeadOutput:
        """SAM3 head for P blocks: query states `(P, K, H)`, prompt `(P, T, D)`, one image each
        (`reference_boxes`: the slots' starting boxes, for training's denoising queries)."""
        queries = self.mask_hidden_fcs[0](query_states)
        return run_head(self.grounding_model, sam_features.fpn_hidden_states, sam_features.fpn_position_encoding,
                        prompt, prompt_mask, queries, self.config.use_presence, reference_boxes,
                        self.config.fusion_output_norm, self.config.fusion_norm_scope,
                        self.config.fusion_image_skip)

    def block_head_inputs(self, input_ids: torch.Tensor, hidden: torch.Tensor,
                          blocks: PhraseBlocks) -> tuple[torch.Tensor, torch.Tensor]:
        """From a teacher-forced pass: each block's query states `(P, K, H)` and prompt `(P, T, D)`."""
        rows = blocks.batch_index
        query_states = hidden[rows[:, None], blocks.seg_positions]
        phrase_ids = torch.gather(input_ids[rows], 1, blocks.phrase_positions)
        phrase_hidden = hidden[rows[:, None], blocks.phrase_positions]
        return query_states, self.phrase_prompt(phrase_ids, blocks.phrase_mask, phrase_hidden)

    # ---- teacher-forced forward (training, equivalence tests) --------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        vision: list[VisionTokens | None],
        sam_features: SamFeatures | None = None,
    ) -> InstructSamOutput:
        """One pass over full sequences (one image per row), then the SAM3 head per query block.

        Arguments:
            input_ids: `(B, L)` right-padded token ids with image placeholders and [SEG] runs.
            attention_mask: `(B, L)` 1 for real tokens, or None.
            vision: per row, its `VisionTokens` (or None for a text-only row).
            sam_features: SAM3 features, one row per sequence row; None skips the head.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        valid = attention_mask.bool()
        grids = [v.grid_thw if v is not None else None for v in vision]
        merge = self.vlm.config.vision_config.spatial_merge_size
        positions, _ = mrope_positions(input_ids, attention_mask, self.token_ids.image, grids, merge)
        embeds, visual_pos_mask, deepstack = self.embed(input_ids, vision)
        mask4d = hybrid_attention_mask(input_ids == self.token_ids.seg, valid)
        hidden = self.run_language_model(embeds, mask4d, positions, None, visual_pos_mask, deepstack)
        logits = self.vlm.lm_head(hidden)
        blocks = find_phrase_blocks(input_ids, self.token_ids, self.config.num_queries, self.config.max_phrase_tokens)
        head = None
        if sam_features is not None and len(blocks):
            query_states, prompt = self.block_head_inputs(input_ids, hidden, blocks)
            head = self.segment_blocks(query_states, prompt, blocks.phrase_mask, sam_features.take(blocks.batch_index))
        return InstructSamOutput(text_logits=logits, blocks=blocks, head=head, extras={"hidden_states": hidden})
