"""Tiny InstructSAM models for tests, demos and CI (no downloads, CPU, seconds).

`InstructSamModelTester` follows transformers' model-tester habit: tiny hyperparameters,
a builder for the config, and random inputs; `make_tiny_checkpoint` writes a tiny random
model in the released checkpoint layout, so tests load it through the user's code path.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .build import build_model
from .checkpoint import save_checkpoint
from .config import InstructSamConfig, preset
from .model.instructsam import InstructSam, SamFeatures, VisionTokens
from .processing import build_prompt_ids, encode_text, preprocess_sam, preprocess_vlm


class ScriptedAnswer:
    """A logits processor that makes generation emit exactly `tokens` (then repeat the last),
    so that cached generation and query injection run on random tiny weights."""

    def __init__(self, tokens: list[int]):
        self.tokens = list(tokens)
        self.step = 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        token = self.tokens[min(self.step, len(self.tokens) - 1)]
        self.step += 1
        forced = torch.full_like(scores, float("-inf"))
        forced[:, token] = 0.0
        return forced


def make_tiny_checkpoint(directory: str | Path, seed: int = 0, **config_overrides) -> Path:
    """Write a tiny random InstructSAM checkpoint (released layout) to `directory`."""
    config = preset("tiny")
    for name, value in config_overrides.items():
        setattr(config, name, value)
    built = build_model(InstructSamConfig.from_dict(config.to_dict()), device="cpu", seed=seed)
    return save_checkpoint(built.model, built.tokenizer, directory)


@dataclass
class TinyInputs:
    """One tiny sample: image, its encodings, and a teacher-forced sequence."""

    image: np.ndarray  # (H, W, 3) uint8
    vision: VisionTokens
    sam: SamFeatures
    prompt_ids: list[int]
    answer_ids: list[int]  # `<ref_start> phrase <ref_end><mask_start>[SEG]xK<mask_end>` per phrase, then <im_end>


class InstructSamModelTester:
    """Builds the tiny model and random inputs for it (K=4 slots, 112 px SAM3 input)."""

    def __init__(self, seed: int = 0, image_size: tuple[int, int] = (48, 64), **config_overrides):
        self.seed = seed
        self.image_size = image_size
        self.config_overrides = config_overrides

    def get_config(self) -> InstructSamConfig:
        config = preset("tiny")
        for name, value in self.config_overrides.items():
            setattr(config, name, value)
        return config

    def get_model(self) -> tuple[InstructSam, object]:
        built = build_model(self.get_config(), device="cpu", seed=self.seed)
        return built.model, built.tokenizer

    def phrase_block(self, model: InstructSam, tokenizer, phrase: str) -> list[int]:
        ids = model.token_ids
        return ([ids.ref_start] + encode_text(tokenizer, phrase) + [ids.ref_end, ids.mask_start]
                + [ids.seg] * model.config.num_queries + [ids.mask_end])

    def prepare_inputs(self, model: InstructSam, tokenizer, instruction: str = "the red mug",
                       phrases: tuple[str, ...] = ("red mug",), seed: int | None = None) -> TinyInputs:
        rng = np.random.default_rng(self.seed if seed is None else seed)
        h, w = self.image_size
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        cfg = model.config
        vlm = preprocess_vlm(image, min_pixels=cfg.vlm_min_pixels, max_pixels=cfg.vlm_max_pixels)
        with torch.no_grad():
            vision = model.encode_image_vlm(vlm.pixel_values, vlm.grid_thw)
            sam = model.encode_image_sam(preprocess_sam(image, cfg.sam_image_size))
        prompt = build_prompt_ids(tokenizer, instruction, vlm.num_tokens, model.token_ids)
        answer = [t for p in phrases for t in self.phrase_block(model, tokenizer, p)] + [model.token_ids.im_end]
        return TinyInputs(image=image, vision=vision, sam=sam, prompt_ids=prompt, answer_ids=answer)

    @staticmethod
    def check_output_shapes(output, num_blocks: int, num_queries: int, seq_len: int) -> None:
        """Assert the forward output's shapes (raises AssertionError naming the field)."""
        assert output.text_logits.shape[:2] == (1, seq_len), f"text_logits {tuple(output.text_logits.shape)}"
        assert len(output.blocks) == num_blocks, f"{len(output.blocks)} blocks, expected {num_blocks}"
        head = output.head
        assert head.mask_logits.shape[:2] == (num_blocks, num_queries), f"mask_logits {tuple(head.mask_logits.shape)}"
        assert head.logits.shape == (num_blocks, num_queries), f"logits {tuple(head.logits.shape)}"
        assert head.boxes.shape == (num_blocks, num_queries, 4), f"boxes {tuple(head.boxes.shape)}"


def sideways_jpeg_with_exif(upright: np.ndarray) -> tuple[bytes, np.ndarray]:
    """JPEG bytes storing `upright` turned 90 degrees, tagged EXIF orientation 6 ("rotate
    90 clockwise to view"), as phones write portrait photos. Returns the bytes and the
    stored pixels as decoded (the JPEG is lossy), turned upright: what a reader that
    honours the tag must return."""
    import io

    from PIL import Image

    stored = np.ascontiguousarray(np.rot90(upright, k=1))  # counter-clockwise: what the sensor saw
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    buf = io.BytesIO()
    Image.fromarray(stored).save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    with Image.open(io.BytesIO(buf.getvalue())) as im:
        decoded = np.asarray(im.convert("RGB"))
    return buf.getvalue(), np.ascontiguousarray(np.rot90(decoded, k=-1))
