"""Checkpoints: the released InstructSAM layout, safetensors only, strict loading.

A checkpoint directory holds `config.json` (a Qwen3-VL config plus InstructSAM's fields:
`max_seg_nums`, `seg_token_index`, `out_dim`, `seg_encoder`, `seg_decoder`,
`mask_decoder_model`), `model.safetensors` or shards with `model.safetensors.index.json`,
and the tokenizer files. Keys are those of the released InstructSAM-2B:

    model.visual.*               Qwen3-VL vision tower
    model.language_model.*       Qwen3-VL text model
    lm_head.weight               (absent when tied to the input embeddings)
    model.mask_queries           the K query slots
    model.mask_hidden_fcs.0.*    query states -> SAM3 queries
    model.text_hidden_fcs.0.*    phrase features -> SAM3 prompt
    model.grounding_model.model.*  SAM3 (transformers' Sam3Model names, no CLIP, no presence)

Checkpoints this project saves use the same layout and also embed the SAM3 config
(`sam3_config`) and the InstructSAM inference fields (`instructsam`), so they rebuild alone.
Released ones name a SAM3 checkpoint path (`mask_decoder_model`) that may not exist on the
user's machine; since SAM3's architecture is fixed, its default config is used then.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import EngineConfig, InstructSamConfig
from .fileio import atomic_directory
from .model.instructsam import InstructSam
from .tokens import TokenIds

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
# Optional: the inference settings a checkpoint was evaluated with (EngineConfig fields),
# as transformers' generation_config.json holds a model's generation settings.
ENGINE_CONFIG_NAME = "engine_config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
# config.json fields that belong to InstructSAM rather than to Qwen3VLConfig
_INSTRUCTSAM_FIELDS = ("max_seg_nums", "seg_token_index", "out_dim", "seg_encoder", "seg_decoder",
                       "mask_decoder_model", "sam3_config", "instructsam", "ref_start_token_index",
                       "ref_end_token_index", "seg_start_token_index", "seg_end_token_index")
_INFERENCE_FIELDS = ("phrase_source", "max_phrase_tokens", "use_presence", "fusion_output_norm",
                     "fusion_norm_scope", "fusion_image_skip", "generation_compat", "sam_image_size",
                     "vlm_min_pixels", "vlm_max_pixels")
_SHARD_BYTES = 2 * 1024**3


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded; the message names the file and key."""


# ---- key layout -----------------------------------------------------------------------

def to_released_key(key: str) -> str:
    """Our module's state-dict key -> the released checkpoint's key."""
    if key.startswith("vlm."):
        return key[len("vlm."):]
    if key.startswith("grounding_model."):
        return "model.grounding_model.model." + key[len("grounding_model."):]
    return "model." + key


def from_released_key(key: str) -> str:
    """The released checkpoint's key -> our module's state-dict key."""
    if key.startswith("lm_head.") or key.startswith(("model.visual.", "model.language_model.")):
        return "vlm." + key
    if key.startswith("model.grounding_model.model."):
        return "grounding_model." + key[len("model.grounding_model.model."):]
    if key.startswith("model."):
        return key[len("model."):]
    return key  # unknown: reported by the strict loader under its own name


def released_state_dict(model: InstructSam) -> dict[str, torch.Tensor]:
    """The model's tensors under released key names; a tied lm_head is left out."""
    state = {to_released_key(k): v for k, v in model.state_dict().items()}
    if _is_tied(model):
        state.pop("lm_head.weight", None)
    return state


def _is_tied(model: InstructSam) -> bool:
    return model.vlm.lm_head.weight is model.vlm.model.language_model.embed_tokens.weight


# ---- config ---------------------------------------------------------------------------

def config_to_json(config: InstructSamConfig, token_ids) -> dict[str, Any]:
    """config.json content in the released layout (plus our embedded fields)."""
    data = dict(config.vlm)
    data.update({
        "architectures": ["InstructSAMForConditionalGeneration"],
        "max_seg_nums": config.num_queries,
        "seg_token_index": token_ids.seg,
        "seg_start_token_index": token_ids.mask_start,
        "seg_end_token_index": token_ids.mask_end,
        "ref_start_token_index": token_ids.ref_start,
        "ref_end_token_index": token_ids.ref_end,
        "out_dim": config.out_dim,
        "seg_encoder": "sam3",
        "seg_decoder": "sam3",
        "mask_decoder_model": "",
        "sam3_config": config.sam3,
        "instructsam": {f: getattr(config, f) for f in _INFERENCE_FIELDS},
    })
    return data


def config_from_json(data: dict[str, Any], source: str) -> InstructSamConfig:
    """Build the model config from a config.json (released or ours)."""
    if "max_seg_nums" not in data:
        raise CheckpointError(f"{source} has no 'max_seg_nums': not an InstructSAM checkpoint "
                              "(for a Qwen3-VL + SAM3 pair use build.from_base_models)")
    if data.get("seg_encoder", "sam3") != "sam3" or data.get("seg_decoder", "sam3") != "sam3":
        raise CheckpointError(f"{source}: only SAM3 segmenters are supported, got "
                              f"{data.get('seg_encoder')}/{data.get('seg_decoder')}")
    vlm = {k: v for k, v in data.items() if k not in _INSTRUCTSAM_FIELDS}
    sam3 = data.get("sam3_config") or _sam3_config_from_path(data.get("mask_decoder_model") or "")
    extra = {k: v for k, v in (data.get("instructsam") or {}).items() if k in _INFERENCE_FIELDS}
    return InstructSamConfig(num_queries=int(data["max_seg_nums"]), out_dim=int(data.get("out_dim", 256)),
                             vlm=vlm, sam3=sam3, **extra)


def _sam3_config_from_path(path: str) -> dict[str, Any]:
    config_file = os.path.join(path, CONFIG_NAME) if path else ""
    if config_file and os.path.isfile(config_file):
        with open(config_file) as f:
            data = json.load(f)
        return data.get("detector_config") or data
    if path:
        log.info("SAM3 config %s not found; using the default SAM3 architecture", config_file)
    return {}


# ---- reading --------------------------------------------------------------------------

def _weight_files(directory: Path) -> list[Path]:
    index = directory / INDEX_NAME
    if index.is_file():
        with open(index) as f:
            weight_map = json.load(f).get("weight_map", {})
        files = sorted({directory / name for name in weight_map.values()})
    elif (directory / WEIGHTS_NAME).is_file():
        files = [directory / WEIGHTS_NAME]
    else:
        bins = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pt*"))
        hint = f" (found {bins[:3]}: pickled weights are refused; convert them to safetensors)" if bins else ""
        raise CheckpointError(f"no {WEIGHTS_NAME} or {INDEX_NAME} in {directory}{hint}")
    for file in files:
        if not file.is_file():
            raise CheckpointError(f"{INDEX_NAME} in {directory} names {file.name}, which is missing")
    return files


def load_weights(model: InstructSam, directory: Path) -> None:
    """Strictly load released-layout safetensors into `model` (in place).

    Every model tensor must be present (a tied lm_head excepted), no extra key may be
    present, and shapes must match; otherwise CheckpointError names the file and keys.
    """
    own = model.state_dict()
    seen: set[str] = set()
    unexpected: list[str] = []
    untie_head: torch.Tensor | None = None
    for file in _weight_files(directory):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                name = from_released_key(key)
                if name not in own:
                    unexpected.append(f"{file.name}:{key}")
                    continue
                tensor = f.get_tensor(key)
                if tuple(tensor.shape) != tuple(own[name].shape):
                    raise CheckpointError(f"{file.name}: {key} has shape {tuple(tensor.shape)}, the model expects "
                                          f"{tuple(own[name].shape)} (does config.json match the weights?)")
                if name == "vlm.lm_head.weight" and _is_tied(model):
                    untie_head = tensor  # applied after the embeddings are in
                else:
                    with torch.no_grad():
                        own[name].copy_(tensor)
                seen.add(name)
    missing = sorted(k for k in own if k not in seen and not (k == "vlm.lm_head.weight" and _is_tied(model)))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys, e.g. {[to_released_key(k) for k in missing[:5]]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys, e.g. {unexpected[:5]}")
        raise CheckpointError(f"checkpoint {directory} does not match the model: " + "; ".join(parts))
    if untie_head is not None and not torch.equal(untie_head, own["vlm.model.language_model.embed_tokens.weight"]):
        # A separately trained lm_head (the release fine-tunes it): give it its own parameter.
        model.vlm.lm_head.weight = torch.nn.Parameter(untie_head.clone())
        model.vlm.config.tie_word_embeddings = False


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in checkpoint directory {path}")
    try:
        with open(config_file) as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{config_file} is not valid JSON: {err}") from err


def read_engine_defaults(directory: str | os.PathLike) -> dict[str, Any]:
    """The engine settings a checkpoint recommends: its `engine_config.json` (fields of
    `EngineConfig`, e.g. `{"mask_nms_iou": 0.7}`), or {} when it has none (as released
    checkpoints). `Segmenter.from_pretrained` starts from these; options given there win."""
    path = Path(directory) / ENGINE_CONFIG_NAME
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: not readable JSON ({err})") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected an object of engine settings, got {type(data).__name__}")
    unknown = sorted(set(data) - set(EngineConfig.__dataclass_fields__))
    if unknown:
        raise CheckpointError(f"{path}: unknown engine settings {unknown}; known: "
                              f"{sorted(EngineConfig.__dataclass_fields__)}")
    return data


def _pixel_bounds(directory: Path) -> dict[str, int]:
    """Qwen3-VL resize bounds from a preprocessor_config.json, when the directory has one."""
    file = directory / "preprocessor_config.json"
    if not file.is_file():
        return {}
    with open(file) as f:
        data = json.load(f)
    size = data.get("size") or {}
    low = data.get("min_pixels", size.get("shortest_edge"))
    high = data.get("max_pixels", size.get("longest_edge"))
    bounds = {}
    if low is not None:
        bounds["vlm_min_pixels"] = int(low)
    if high is not None:
        bounds["vlm_max_pixels"] = int(high)
    return bounds


def read_model_config(directory: str | os.PathLike) -> InstructSamConfig:
    """The model configuration of a checkpoint directory. A released checkpoint's
    preprocessor_config.json sets the Qwen3-VL resize bounds."""
    path = Path(directory)
    data = read_config(path)
    config = config_from_json(data, str(path / CONFIG_NAME))
    if "instructsam" not in data:  # a released checkpoint: its processor config sets the resize
        for name, value in _pixel_bounds(path).items():
            setattr(config, name, value)
    return config


def check_token_ids(directory: str | os.PathLike, token_ids: TokenIds) -> None:
    """CheckpointError when config.json's [SEG] id is not the tokenizer's."""
    path = Path(directory)
    data = read_config(path)
    if "seg_token_index" in data and int(data["seg_token_index"]) != token_ids.seg:
        raise CheckpointError(f"{path / CONFIG_NAME}: seg_token_index {data['seg_token_index']} but the "
                              f"tokenizer's [SEG] is {token_ids.seg}")


# ---- writing --------------------------------------------------------------------------

def save_checkpoint(model: InstructSam, tokenizer, directory: str | os.PathLike,
                    max_shard_bytes: int = _SHARD_BYTES) -> Path:
    """Write the model in the released layout, atomically (`fileio.atomic_directory`): a
    crash never leaves a half-written checkpoint under the final name."""
    state = {k: v.detach().contiguous().cpu() for k, v in released_state_dict(model).items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(state):
        nbytes = state[key].numel() * state[key].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = state[key]
        size += nbytes
    with atomic_directory(directory) as tmp:
        if len(shards) == 1:
            save_file(shards[0], str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / name), metadata={"format": "pt"})
                weight_map.update({k: name for k in shard})
            with open(tmp / INDEX_NAME, "w") as f:
                json.dump({"metadata": {"total_size": sum(v.numel() * v.element_size() for v in state.values())},
                           "weight_map": weight_map}, f, indent=2)
        with open(tmp / CONFIG_NAME, "w") as f:
            json.dump(config_to_json(model.config, model.token_ids), f, indent=2)
        tokenizer.save_pretrained(str(tmp))
    return Path(directory)


# ---- starting from the base models (training) ---------------------------------------

def _read_safetensors_dir(directory: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in _weight_files(directory):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    return tensors


def base_model_configs(qwen_dir: str | os.PathLike, sam3_dir: str | os.PathLike | None
                       ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The Qwen3-VL and SAM3 config dicts of two base-model directories (SAM3: {} when
    `sam3_dir` is None, its default architecture)."""
    qwen_path = Path(qwen_dir)
    vlm = read_config(qwen_path)
    if vlm.get("model_type") != "qwen3_vl":
        raise CheckpointError(f"{qwen_path / CONFIG_NAME}: model_type {vlm.get('model_type')!r}, expected 'qwen3_vl'")
    sam3: dict[str, Any] = {}
    if sam3_dir is not None:
        sam3 = read_config(sam3_dir)
        sam3 = sam3.get("detector_config") or sam3
    return vlm, sam3


def load_base_weights(model: InstructSam, qwen_dir: str | os.PathLike, sam3_dir: str | os.PathLike | None) -> None:
    """Load Qwen3-VL and SAM3 directories (as transformers saves them) into `model`.

    SAM3's DETR decoder keeps the first K of its learned queries and reference boxes;
    CLIP, the tracker and (without `use_presence`) the presence token are skipped. Every
    other tensor of both models must load; otherwise CheckpointError names what is wrong.
    """
    qwen_path = Path(qwen_dir)
    own = model.state_dict()
    loaded: set[str] = set()

    def put(name: str, tensor: torch.Tensor, source: str) -> None:
        if tuple(tensor.shape) != tuple(own[name].shape):
            raise CheckpointError(f"{source}: {name} has shape {tuple(tensor.shape)}, "
                                  f"expected {tuple(own[name].shape)}")
        with torch.no_grad():
            own[name].copy_(tensor)
        loaded.add(name)

    for key, tensor in _read_safetensors_dir(qwen_path).items():
        name = "vlm." + key
        if name not in own:
            raise CheckpointError(f"{qwen_path}: unexpected Qwen3-VL key {key}")
        put(name, tensor, str(qwen_path))
    k = model.config.num_queries
    if sam3_dir is not None:
        for key, tensor in _read_safetensors_dir(Path(sam3_dir)).items():
            key = key.removeprefix("detector_model.")
            if key.startswith(("text_encoder.", "tracker_model.", "tracker_neck.")):
                continue
            name = "grounding_model." + key
            if name not in own:
                if "presence" in key and not model.config.use_presence:
                    continue
                raise CheckpointError(f"{sam3_dir}: unexpected SAM3 key {key}")
            if key in ("detr_decoder.query_embed.weight", "detr_decoder.reference_points.weight"):
                tensor = tensor[:k]
            put(name, tensor, str(sam3_dir))
    expected = [n for n in own if n.startswith("vlm.") and not (n == "vlm.lm_head.weight" and _is_tied(model))]
    if sam3_dir is not None:
        expected += [n for n in own if n.startswith("grounding_model.")]
    missing = [n for n in expected if n not in loaded]
    if missing:
        raise CheckpointError(f"base models lack {len(missing)} tensors, e.g. {missing[:5]}")
