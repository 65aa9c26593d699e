"""Configurations for the InstructSAM model and the inference engine, with named presets.

`InstructSamConfig` holds the InstructSAM-specific fields plus the two nested configs of
the stock transformers models it is built from (`vlm` for Qwen3-VL, `sam3` for SAM3), as
plain dicts so that a checkpoint's config.json rebuilds the whole model on its own.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

PHRASE_SOURCES = ("token_embeddings", "hidden_states", "hidden_states_and_embeddings")
FUSION_NORM_SCOPES = ("all", "decoder")  # see InstructSamConfig.fusion_norm_scope
GENERATION_COMPAT = ("release", "consistent")


def released_2b_vlm() -> dict[str, Any]:
    """Qwen3-VL-2B-Instruct's configuration, as published (what InstructSAM-2B is built on)."""
    return {
        "model_type": "qwen3_vl",
        "text_config": {
            "model_type": "qwen3_vl_text", "vocab_size": 151936, "hidden_size": 2048,
            "intermediate_size": 6144, "num_hidden_layers": 28, "num_attention_heads": 16,
            "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 262144,
            "rope_parameters": {"rope_type": "default", "rope_theta": 5_000_000.0,
                                "mrope_section": [24, 20, 20], "mrope_interleaved": True},
            "tie_word_embeddings": True,
        },
        "vision_config": {
            "model_type": "qwen3_vl_vision", "depth": 24, "hidden_size": 1024, "intermediate_size": 4096,
            "num_heads": 16, "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2,
            "out_hidden_size": 2048, "num_position_embeddings": 2304, "deepstack_visual_indexes": [5, 11, 17],
        },
        "image_token_id": 151655, "video_token_id": 151656,
        "vision_start_token_id": 151652, "vision_end_token_id": 151653,
        "tie_word_embeddings": True,
    }


@dataclass
class InstructSamConfig:
    """Everything needed to build an `InstructSam` model.

    Defaults reproduce the released InstructSAM-2B: `InstructSamConfig()` is its
    architecture (Qwen3-VL-2B + SAM3 at 1008 px, K=10).
    """

    num_queries: int = 10  # K: instance query slots per phrase (`max_seg_nums`)
    out_dim: int = 256  # width of SAM3's prompt/query space (its DETR hidden size)
    # Where the SAM3 prompt comes from: the phrase's input token embeddings (what the
    # released checkpoint was trained with), the LLM's last hidden states at the phrase, or
    # both summed ("hidden_states_and_embeddings": each token's embedding, RMS-normalised
    # to the hidden states' scale, added to its hidden state). A last hidden state is
    # trained to predict the next token, which need not keep the word it sits on ("red"),
    # so the sum gives the prompt each word's identity beside its context.
    phrase_source: str = "token_embeddings"
    max_phrase_tokens: int = 32  # phrase length cap, ref start/end tokens included
    # False: InstructSAM as released (no presence token; score = sigmoid(dot-product logit)).
    # True: keep SAM3's presence token and multiply its probability into the score.
    use_presence: bool = False
    # False: as SAM3 (its fusion encoder is pre-norm with no final norm, so the DETR decoder,
    # the scoring and the mask decoder read its image and prompt tokens at whatever scale
    # its residual stream reached). True: both layer-normalised (no learned scale) first, so
    # that a head trained from random weights cannot swamp its slots' own content (see
    # docs/training.md, "Where it stands"). A checkpoint trained with it must run with it.
    fusion_output_norm: bool = False
    # What reads the normalised tokens when `fusion_output_norm` is on: "all" (the DETR
    # decoder, the scoring and the mask decoder) or "decoder" (the DETR decoder and the
    # scoring; the mask decoder, and so the semantic head, keeps the encoder's own image
    # tokens and their per-token scale, which marks where the objects are).
    fusion_norm_scope: str = "all"
    # False: as SAM3 (the DETR decoder and the mask decoder read the fusion encoder's image
    # tokens). True: they read those plus the image tokens the encoder started from (its
    # FPN level), before `fusion_output_norm`. Trained from scratch, the probes find the
    # fine colour lost in the encoder's output though its input holds it (docs/training.md,
    # "A tenth round"); the second copy keeps it within the decoders' reach. Of two runs of
    # the whole plan with it (other seeds), the colours came apart in the first and not in
    # the second ("A thirteenth round"), so it is not in the shipped recipe. No parameters:
    # a checkpoint trained with it must run with it.
    fusion_image_skip: bool = False
    # How cached generation lays out positions and the query block's mask:
    # "release": as the released inference code (1-D positions 0..L-1 for the whole prompt,
    #   a query block's positions shifted by one, its queries also seeing <|mask_end|>);
    #   the published numbers were measured this way.
    # "consistent": as training (Qwen3-VL's 3-D M-RoPE, the hybrid mask); cached generation
    #   then equals one teacher-forced forward pass.
    generation_compat: str = "release"
    sam_image_size: int = 1008  # SAM3 input side (square)
    # Qwen3-VL image resize bounds in pixels (its processor's defaults; a checkpoint's
    # preprocessor_config.json overrides them).
    vlm_min_pixels: int = 65536
    vlm_max_pixels: int = 16777216
    vlm: dict[str, Any] = field(default_factory=released_2b_vlm)  # Qwen3VLConfig fields
    # Sam3Config fields; empty = Sam3Config() itself, SAM3's one (fixed) architecture.
    sam3: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_queries < 1:
            raise ValueError(f"num_queries must be >= 1, got {self.num_queries}")
        if self.phrase_source not in PHRASE_SOURCES:
            raise ValueError(f"phrase_source must be one of {PHRASE_SOURCES}, got {self.phrase_source!r}")
        if self.fusion_norm_scope not in FUSION_NORM_SCOPES:
            raise ValueError(f"fusion_norm_scope must be one of {FUSION_NORM_SCOPES}, got {self.fusion_norm_scope!r}")
        if self.generation_compat not in GENERATION_COMPAT:
            raise ValueError(f"generation_compat must be one of {GENERATION_COMPAT}, got {self.generation_compat!r}")
        if not self.vlm:
            raise ValueError("vlm is empty: give the Qwen3-VL config (leave it out for Qwen3-VL-2B's)")

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "InstructSamConfig":
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown InstructSamConfig fields: {unknown}")
        return cls(**copy.deepcopy(data))


@dataclass
class EngineConfig:
    """Inference settings of the `Segmenter` (not part of the model)."""

    score_threshold: float = 0.5  # keep slots with score above this (RoboRefIt protocol: 0.5)
    # Off (None) as in the release, which keeps every slot above the threshold; a value
    # drops a slot whose mask overlaps a better one above this IoU (0.7 is a sane choice).
    mask_nms_iou: float | None = None
    max_instances: int | None = None  # cap on instances per answer (best first)
    # Generation budget per instruction, the release's 1024; a lower value cuts long
    # answers: phrases past the budget are never generated, and a budget ending right after
    # a phrase gives the whole answer no mask (status "budget_cut"), as in the release.
    max_new_tokens: int = 1024
    max_instruction_chars: int = 2000  # longer instructions are rejected, not truncated
    system_prompt: str | None = None  # optional system turn of the chat template
    # How the instruction is put to the model, "{instruction}" marking where it goes, for a
    # checkpoint trained on one form of question (the default model's engine_config.json:
    # "Can you segment '{instruction}' in the image?"). An instruction already in that form
    # is left as it is. None (the release): the instruction as given.
    instruction_template: str | None = None
    batch_size: int = 8  # frames encoded together by segment_batch
    # Stream mode, off (0) as in the release: a generated answer is replayed for up to this
    # many further `segment` calls with the same instruction (one LLM pass, no decoding),
    # then generated afresh. Each frame still gets its own query states and masks; only
    # the answer's words are kept (see docs/benchmarks.md for the trade-off).
    phrase_reuse_frames: int = 0


# --------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------

def _tiny_vlm(vocab_size: int) -> dict[str, Any]:
    # Qwen3-VL with every width cut to 32 and one or two layers; ids as in the real vocab.
    return {
        "model_type": "qwen3_vl",
        "text_config": {
            "model_type": "qwen3_vl_text",
            "vocab_size": vocab_size,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 8,
            "max_position_embeddings": 4096,
            # mrope sections must sum to head_dim / 2
            "rope_parameters": {"rope_type": "default", "rope_theta": 5_000_000.0,
                                "mrope_section": [2, 1, 1], "mrope_interleaved": True},
            "tie_word_embeddings": True,
        },
        "vision_config": {
            "model_type": "qwen3_vl_vision",
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 4,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "out_hidden_size": 32,
            "num_position_embeddings": 64,  # an 8x8 learned grid, interpolated
            "deepstack_visual_indexes": [0],
        },
        "image_token_id": 151655,
        "video_token_id": 151656,
        "vision_start_token_id": 151652,
        "vision_end_token_id": 151653,
        "tie_word_embeddings": True,
    }


def _tiny_sam3(num_queries: int) -> dict[str, Any]:
    # SAM3 at 112 px (patch 14 -> an 8x8 grid), width 32, one layer per stage.
    width = 32
    return {
        "model_type": "sam3",
        "vision_config": {
            "model_type": "sam3_vision_model",
            "backbone_config": {
                "model_type": "sam3_vit_model",
                "hidden_size": width,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "image_size": 112,
                "patch_size": 14,
                "window_size": 4,
                "global_attn_indexes": [1],
                "pretrain_image_size": 56,
            },
            "fpn_hidden_size": width,
            "backbone_feature_sizes": [[32, 32], [16, 16], [8, 8]],
            "scale_factors": [4.0, 2.0, 1.0, 0.5],
        },
        # The CLIP text encoder is dropped after construction; only text_projection
        # (text hidden -> width) survives, as in the released checkpoint.
        "text_config": {"model_type": "clip_text_model", "vocab_size": 16, "hidden_size": 16,
                        "intermediate_size": 16, "projection_dim": 16, "num_hidden_layers": 1,
                        "num_attention_heads": 2, "max_position_embeddings": 32,
                        "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1},
        "geometry_encoder_config": {"hidden_size": width, "num_layers": 1, "num_attention_heads": 2,
                                    "intermediate_size": 64, "roi_size": 3},
        "detr_encoder_config": {"hidden_size": width, "num_layers": 1, "num_attention_heads": 2,
                                "intermediate_size": 64},
        "detr_decoder_config": {"hidden_size": width, "num_layers": 2, "num_queries": num_queries,
                                "num_attention_heads": 2, "intermediate_size": 64},
        "mask_decoder_config": {"hidden_size": width, "num_upsampling_stages": 3, "num_attention_heads": 2},
    }


TINY_VOCAB_SIZE = 151680  # Qwen's 151,643 BPE ranks + its specials + InstructSAM's 4 tokens


def tiny_config() -> InstructSamConfig:
    """The tiny model of tests and the CPU demo: widths 32, one or two layers, K=4,
    SAM3 at 112 px (patch 14: an 8x8 grid), the real Qwen vocabulary size."""
    k = 4
    return InstructSamConfig(num_queries=k, out_dim=32, sam_image_size=112,
                             vlm_min_pixels=4 * 32 * 32, vlm_max_pixels=128 * 96,
                             vlm=_tiny_vlm(TINY_VOCAB_SIZE), sam3=_tiny_sam3(k))


def small_config() -> InstructSamConfig:
    """The default model's architecture: the real Qwen3-VL and SAM3 classes, small enough to
    train on a CPU in an hour and ship in a few MB, large enough to learn the synthetic
    tabletop world (LLM 128 wide, 4 layers; SAM3 at 224 px with 64x64 masks; K=10), over
    the world's word-level tokenizer (`world.world_tokenizer`)."""
    from .tokens import token_ids_from_tokenizer
    from .world import world_tokenizer

    tokenizer = world_tokenizer()
    ids = token_ids_from_tokenizer(tokenizer)
    vocab = -(-len(tokenizer) // 64) * 64  # room for the tokenizer, a multiple of 64
    k, width = 10, 64
    vlm = {
        "model_type": "qwen3_vl",
        "text_config": {
            "model_type": "qwen3_vl_text", "vocab_size": vocab, "hidden_size": 128, "intermediate_size": 384,
            "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
            "max_position_embeddings": 4096,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10_000.0, "mrope_section": [8, 4, 4],
                                "mrope_interleaved": True},
            "tie_word_embeddings": True,
        },
        "vision_config": {
            "model_type": "qwen3_vl_vision", "depth": 2, "hidden_size": 64, "intermediate_size": 128,
            "num_heads": 4, "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2,
            "out_hidden_size": 128, "num_position_embeddings": 64, "deepstack_visual_indexes": [0],
        },
        "image_token_id": ids.image, "video_token_id": tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        "vision_start_token_id": ids.vision_start, "vision_end_token_id": ids.vision_end,
        "tie_word_embeddings": True,
    }
    sam3 = _tiny_sam3(k)
    sam3["vision_config"]["backbone_config"].update(hidden_size=width, intermediate_size=128, num_hidden_layers=2,
                                                    num_attention_heads=2, image_size=224, window_size=8,
                                                    pretrain_image_size=112)
    sam3["vision_config"].update(fpn_hidden_size=width, backbone_feature_sizes=[[64, 64], [32, 32], [16, 16]])
    for part in ("geometry_encoder_config", "detr_encoder_config", "detr_decoder_config"):
        sam3[part].update(hidden_size=width, num_attention_heads=4, intermediate_size=128)
    sam3["detr_encoder_config"]["num_layers"] = 2
    sam3["detr_decoder_config"]["num_layers"] = 3
    sam3["mask_decoder_config"].update(hidden_size=width, num_attention_heads=4)
    # Scenes are 160x120: 128x160 for Qwen3-VL (20 image tokens). Our own pipeline trains
    # with the consistent layout (M-RoPE, the hybrid mask), so the model generates with it.
    return InstructSamConfig(num_queries=k, out_dim=width, sam_image_size=224, vlm_min_pixels=4 * 32 * 32,
                             vlm_max_pixels=160 * 128, vlm=vlm, sam3=sam3, generation_compat="consistent",
                             phrase_source="hidden_states")


# Named model configurations: name -> a function returning a fresh config.
PRESETS: dict[str, Callable[[], InstructSamConfig]] = {
    "tiny": tiny_config,  # tests, the untrained CPU demo: 5.2 M parameters, 4.9 M of them the embedding
    "2b": InstructSamConfig,  # InstructSAM-2B as released: 2.13 B (Qwen3-VL-2B) + SAM3 without CLIP
    "small": small_config,  # the default model's architecture (the world's tokenizer)
}


def preset(name: str) -> InstructSamConfig:
    """A fresh configuration of a named preset (`PRESETS`)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {sorted(PRESETS)}")
    return PRESETS[name]()
