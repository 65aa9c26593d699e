"""The one place that constructs the InstructSAM model.

    built = build_model("tiny")                                  # a preset, random (seeded) weights
    built = build_model(InstructSamConfig(num_queries=20))       # a config, random weights
    built = build_model("/models/InstructSAM-2B", device="auto")  # a checkpoint directory
    built = build_model("default")                               # the shipped default model
    built = from_base_models("/models/Qwen3-VL-2B-Instruct", "/models/sam3")  # stage-1 start

`resolve_device` and `resolve_dtype` turn the names every entry point accepts ("auto",
"cuda:1", "bf16", ...) into torch objects, the same way for the engine, the node, the
CLI, the benchmarks and training.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoint import (CheckpointError, base_model_configs, check_token_ids, load_base_weights, load_weights,
                         read_model_config)
from .config import PRESETS, InstructSamConfig, preset
from .model.instructsam import InstructSam
from .processing import build_offline_qwen_tokenizer, load_tokenizer
from .tokens import ADDED_TOKENS, token_ids_from_tokenizer

# The model this package ships (a checkpoint directory inside it, trained by
# `make train-default` on the synthetic tabletop world): what every entry point loads
# when no checkpoint is given.
DEFAULT_MODEL = "default"
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "default_model"

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


@dataclass
class BuiltModel:
    """A constructed model and what goes with it.

    Attributes:
        model: the InstructSAM model, in eval mode, on `device` in `dtype`.
        tokenizer: its tokenizer (a checkpoint's own; for random weights the preset's:
            the world's for `small`, else the offline Qwen one).
        device, dtype: where and in what precision it lives.
        untrained: its weights are random (a preset or a config, or a stage-1 start whose
            projections are new), so its masks mean nothing.
    """

    model: InstructSam
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype
    untrained: bool


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """A torch device; "auto" is CUDA when available, else the CPU. Asking for CUDA on a
    machine without it is a ValueError saying so."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available on this machine; use device='cpu'")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """A torch dtype; None or "auto" is bfloat16 on CUDA and float32 elsewhere."""
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use auto or one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def default_model_dir() -> Path:
    """The shipped default model's checkpoint directory; FileNotFoundError saying how to
    make it when this install lacks its weights."""
    if not (DEFAULT_MODEL_DIR / "config.json").is_file():
        raise FileNotFoundError(f"the default model is not in this install ({DEFAULT_MODEL_DIR} has no "
                                "config.json); `make train-default` trains it, or pass a checkpoint directory")
    return DEFAULT_MODEL_DIR


def checkpoint_dir(source: str | os.PathLike | InstructSamConfig) -> Path | None:
    """The directory `build_model` loads `source` from ("default": the shipped model's),
    or None when `source` is a preset or a config (random weights, no directory)."""
    if isinstance(source, InstructSamConfig) or (isinstance(source, str) and source in PRESETS):
        return None
    return default_model_dir() if source == DEFAULT_MODEL else Path(source)


def build_model(source: str | os.PathLike | InstructSamConfig, device: str | torch.device = "auto",
                dtype: str | torch.dtype | None = None, seed: int | None = 0, tokenizer=None) -> BuiltModel:
    """The model from a preset name, a config, or a checkpoint directory.

    Arguments:
        source: a name in `config.PRESETS` or an `InstructSamConfig` (random weights),
            a checkpoint directory (config.json + safetensors + tokenizer; strict load), or
            "default", the checkpoint this package ships (`default_model_dir`).
        device, dtype: see `resolve_device` / `resolve_dtype`.
        seed: random weights are drawn from this seed (the same on every call for a
            device; CPU and CUDA generators differ), without touching the caller's random
            state; None draws from it. Ignored for checkpoints.
        tokenizer: for random weights, the tokenizer to pair them with (default: the
            offline Qwen tokenizer with InstructSAM's tokens).
    """
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    path = checkpoint_dir(source)
    if path is None:
        config = source if isinstance(source, InstructSamConfig) else preset(source)
        if tokenizer is None and isinstance(source, str):
            tokenizer = preset_tokenizer(source)
        model, tokenizer = _random_model(config, seed, tokenizer, dev)
        model.to(dtype=torch_dtype)
        return BuiltModel(model.eval(), tokenizer, dev, torch_dtype, untrained=True)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist "
                                f"(or give a preset name: {', '.join(sorted(PRESETS))})")
    config = read_model_config(path)
    tokenizer = load_tokenizer(str(path))
    token_ids = token_ids_from_tokenizer(tokenizer)
    check_token_ids(path, token_ids)
    with _uninitialised(torch_dtype), torch.device(dev):
        model = InstructSam(config, token_ids)
    if model.vlm.config.text_config.tie_word_embeddings or getattr(model.vlm.config, "tie_word_embeddings", False):
        # Tying happens in the initialisation skipped above.
        model.vlm.lm_head.weight = model.vlm.model.language_model.embed_tokens.weight
    load_weights(model, path)
    model.to(device=dev, dtype=torch_dtype)
    return BuiltModel(model.eval(), tokenizer, dev, torch_dtype, untrained=False)


def from_base_models(qwen_dir: str | os.PathLike, sam3_dir: str | os.PathLike | None = None,
                     device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
                     **config_fields) -> BuiltModel:
    """A stage-1 starting point: Qwen3-VL (e.g. Qwen3-VL-2B-Instruct) and SAM3 checkpoint
    directories, as transformers saves them, joined into an InstructSAM model.

    InstructSAM's tokens are added to the Qwen tokenizer; the query bank starts at zero and
    the two projections at random, as in the release. SAM3's DETR decoder keeps the first K
    of its learned queries and reference boxes; CLIP (and, without `use_presence`, the
    presence token) are dropped. Every other tensor of both models must load.

    Arguments:
        qwen_dir: Qwen3-VL directory (config.json, safetensors, tokenizer files).
        sam3_dir: SAM3 directory (image or video config), or None for SAM3's default
            architecture with random weights (tests, ablations).
        device, dtype: where the model ends up (built on the CPU in float32 first, since
            the new projections are initialised there).
        config_fields: `InstructSamConfig` fields (num_queries, phrase_source, ...).
    """
    vlm, sam3 = base_model_configs(qwen_dir, sam3_dir)
    config = InstructSamConfig(vlm=vlm, sam3=sam3, **config_fields)
    tokenizer = load_tokenizer(str(qwen_dir))
    missing_tokens = [t for t in ADDED_TOKENS if t not in tokenizer.get_vocab()]
    if missing_tokens:
        tokenizer.add_special_tokens({"additional_special_tokens": missing_tokens})
    model = InstructSam(config, token_ids_from_tokenizer(tokenizer))
    vocab = model.vlm.config.text_config.vocab_size
    if len(tokenizer) > vocab:
        raise CheckpointError(f"tokenizer has {len(tokenizer)} tokens with InstructSAM's, more than the "
                              f"embedding's {vocab} rows")
    load_base_weights(model, qwen_dir, sam3_dir)
    with torch.no_grad():
        model.mask_queries.zero_()
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    model.to(device=dev, dtype=torch_dtype)
    return BuiltModel(model.eval(), tokenizer, dev, torch_dtype, untrained=True)


def base_architecture(init: str, preset_name: str = "tiny", qwen_dir: str = "", sam3_dir: str = "",
                      checkpoint_dir: str = "") -> InstructSamConfig:
    """The architecture a model would have, read from configs only (no weights): a preset,
    a Qwen3-VL + SAM3 pair (`init="base"`), or a checkpoint directory. For counting
    parameters on the meta device."""
    if init == "preset":
        return preset(preset_name)
    if init == "base":
        vlm, sam3 = base_model_configs(qwen_dir, sam3_dir or None)
        return InstructSamConfig(vlm=vlm, sam3=sam3)
    if init == "checkpoint":
        return read_model_config(checkpoint_dir)
    raise ValueError(f"unknown init {init!r}; use preset, base or checkpoint")


def preset_tokenizer(name: str):
    """The tokenizer a preset's vocabulary is sized for: the world's for `small`, Qwen's
    (offline, with InstructSAM's tokens) for the others."""
    if name == "small":
        from .world import world_tokenizer

        return world_tokenizer()
    return build_offline_qwen_tokenizer()


def _random_model(config: InstructSamConfig, seed: int | None, tokenizer, device: torch.device):
    """Randomly initialised weights (float32, on `device`) and the tokenizer to go with them."""
    tokenizer = tokenizer or build_offline_qwen_tokenizer()
    token_ids = token_ids_from_tokenizer(tokenizer)
    vocab = config.vlm.get("text_config", {}).get("vocab_size", 151936)
    if max(len(tokenizer), token_ids.mask_end + 1) > vocab:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the model's vocabulary is {vocab}")
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=cuda):  # the caller's random state (CPU and CUDA) is left as it was
        if seed is not None:
            torch.manual_seed(seed)
        with torch.device(device):
            model = InstructSam(config, token_ids)
    return model, tokenizer


@contextlib.contextmanager
def _uninitialised(dtype: torch.dtype):
    """Build modules without random initialisation, in `dtype`: every parameter is
    overwritten by the strict load, so a 2B model is built in seconds and in half the memory."""
    from transformers.initialization import no_init_weights

    previous = torch.get_default_dtype()
    try:
        torch.set_default_dtype(dtype)
        with no_init_weights():
            yield
    finally:
        torch.set_default_dtype(previous)
